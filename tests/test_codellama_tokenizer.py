"""Code Llama's vocabulary and infilling prompt (Code Llama §2.3): Llama 2's 32,000 pieces plus 16,
the PRE/SUF/MID/EOT sentinels at Meta's ids, and the PSM/SPM prompt laid out as Meta's reference does."""

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from llama2.tokenizer import (
    INFILL_PIECES,
    Tokenizer,
    add_infilling_pieces,
    infill_tokens,
    train_tokenizer,
)
from tests.conftest import FIXTURE_TOKENIZER, run_cli

# Prefix/suffix pairs: leading spaces, newlines first, runs of spaces, unicode, empty sides.
PAIRS = [
    ("def f():\n", "\n    return x\n"),
    ('def remove_non_ascii(s: str) -> str:\n    """ ', "\n    return result\n"),
    ("x = 1", " y"),
    ("  lead", "  trail"),
    ("a  b", "c   d"),
    ("\n\nx", "\n"),
    ("héllo wörld ☃ ", "ünïcode\n"),
    ("", "b"),
    ("a", ""),
]


@pytest.fixture(scope="module")
def code_model(tmp_path_factory):
    """Llama 2's tokenizer.model extended with Code Llama's 16 pieces."""
    out = tmp_path_factory.mktemp("codellama") / "tokenizer.model"
    add_infilling_pieces(FIXTURE_TOKENIZER, out)
    return out


@pytest.fixture(scope="module")
def code_tok(code_model):
    return Tokenizer(code_model)


@pytest.fixture(scope="module")
def raw_sp(code_model):
    """Plain SentencePiece on the same file: the independent reference for Meta's formula."""
    return spm.SentencePieceProcessor(model_file=str(code_model))


def meta_encode_infilling(sp, s):
    """Meta's codellama reference: encode "☺" + s and drop "▁" and "☺" (one piece each in Llama 2)."""
    return sp.encode("☺" + s)[2:]


# -- the vocabulary ------------------------------------------------------------------------

def test_pieces_land_at_code_llamas_ids(code_tok):
    assert code_tok.vocab_size == 32016 == 32000 + len(INFILL_PIECES)
    assert (code_tok.prefix_id, code_tok.suffix_id, code_tok.middle_id, code_tok.eot_id) == (32007, 32008, 32009, 32010)
    assert [code_tok.id_to_piece(32000 + k) for k in range(16)] == list(INFILL_PIECES)
    assert code_tok.has_infilling


def test_pieces_are_normal_bpe_pieces_ranked_after_llama2s_merges(code_model):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(code_model.read_bytes())
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    added = proto.pieces[32000:]
    assert all(p.type == normal for p in added)
    assert proto.pieces[31999].score == -31740  # Llama 2's last merge: score = -(id - 259)
    assert [p.score for p in added] == [-31741.0 - k for k in range(16)]


def test_llama2_has_no_infilling(llama_tokenizer):
    assert not llama_tokenizer.has_infilling
    assert (llama_tokenizer.prefix_id, llama_tokenizer.suffix_id,
            llama_tokenizer.middle_id, llama_tokenizer.eot_id) == (None, None, None, None)


def test_llama2_text_encodes_to_the_same_ids(llama_tokenizer, code_tok):
    text = "Hello world! def f(x):\n    return x < 3 and y > 2  # <b>ünïcode</b> 12345\t☃"
    assert code_tok.encode(text, bos=True) == llama_tokenizer.encode(text, bos=True)


def test_sentinel_text_after_a_space_merges_into_the_sentinel(code_tok):
    # Ordinary BPE pieces, as Code Llama's: " <SUF>" reaches ▁<SUF> through ▁<SU and ▁<SUF.
    assert code_tok.encode("<PRE> x <SUF>y <MID>") == [32007, 921, 32008, 29891, 32009]
    assert 32008 not in code_tok.encode("x<SUF>")


def test_decode_skips_the_sentinels(code_tok):
    ids = code_tok.encode("def f():") + [code_tok.eot_id]
    assert code_tok.decode([code_tok.prefix_id, *ids, code_tok.middle_id]) == "def f():"


# -- encode_infilling ----------------------------------------------------------------------

@pytest.mark.parametrize("text", ["  x = 1", "\nfoo", "x", "", "☺a", "(a)", "    return result\n", "ünï"])
def test_encode_infilling_equals_metas_trick(code_tok, raw_sp, text):
    assert code_tok.encode_infilling(text) == meta_encode_infilling(raw_sp, text)


def test_encode_infilling_drops_only_the_dummy_prefix_space(code_tok):
    assert [code_tok.id_to_piece(i) for i in code_tok.encode_infilling("  x = 1")] == ["▁", "▁x", "▁=", "▁", "1"]
    assert [code_tok.id_to_piece(i) for i in code_tok.encode("  x = 1")] == ["▁▁", "▁x", "▁=", "▁", "1"]
    assert code_tok.encode_infilling("x") == [code_tok.sp.piece_to_id("x")]
    assert code_tok.encode("x") == [code_tok.sp.piece_to_id("▁x")]
    assert code_tok.encode_infilling("\n") == [13]  # <0x0A>, no "▁" before it
    assert code_tok.encode_infilling("") == []


def test_decode_infilling_keeps_a_leading_space(code_tok):
    ids = code_tok.encode_infilling("  x = 1") + [code_tok.eot_id]
    assert code_tok.decode_infilling(ids) == "  x = 1"
    assert code_tok.decode(ids) == " x = 1"  # the first space read as the dummy prefix


# -- the prompt ----------------------------------------------------------------------------

@pytest.mark.parametrize("prefix,suffix", PAIRS)
def test_psm_prompt_is_metas(code_tok, raw_sp, prefix, suffix):
    pre, suf, mid = (raw_sp.piece_to_id(p) for p in ("▁<PRE>", "▁<SUF>", "▁<MID>"))
    expected = [raw_sp.bos_id(), pre] + raw_sp.encode(prefix) + [suf] + meta_encode_infilling(raw_sp, suffix) + [mid]
    assert infill_tokens(code_tok, prefix, suffix) == expected


@pytest.mark.parametrize("prefix,suffix", PAIRS)
def test_spm_prompt_is_metas(code_tok, raw_sp, prefix, suffix):
    pre, suf, mid = (raw_sp.piece_to_id(p) for p in ("▁<PRE>", "▁<SUF>", "▁<MID>"))
    expected = [raw_sp.bos_id(), pre, suf] + meta_encode_infilling(raw_sp, suffix) + [mid] + raw_sp.encode(prefix)
    assert infill_tokens(code_tok, prefix, suffix, suffix_first=True) == expected


# -- parity with transformers' CodeLlamaTokenizer ------------------------------------------
# transformers 4.x (slow CodeLlamaTokenizer, legacy=False) gives exactly Meta's ids on every pair
# above with a non-empty suffix. transformers 5 rebuilt it on the `tokenizers` backend and differs
# on purpose-less details, each pinned below so that a change shows up: it keeps the dummy-prefix
# space on the suffix, and its BPE runs over whole whitespace runs (SentencePiece splits "  b" as
# "▁" + "▁b", it as "▁▁" + "b"). Where neither applies the ids are equal.

@pytest.fixture(scope="module")
def hf(code_model):
    transformers = pytest.importorskip("transformers")
    return transformers.CodeLlamaTokenizer.from_pretrained(str(code_model.parent), local_files_only=True)


def hf_major():
    import transformers

    return int(transformers.__version__.split(".")[0])


def test_transformers_finds_the_sentinels(hf):
    assert (hf.prefix_id, hf.suffix_id, hf.middle_id, hf.eot_id) == (32007, 32008, 32009, 32010)


@pytest.mark.parametrize("prefix,suffix", [("x = 1", " y"), ("def f(a, b):\n", " return a\n"),
                                           ("héllo wörld ☃ ", " ünïcode\n")])
@pytest.mark.parametrize("suffix_first", [False, True])
def test_transformers_fill_me_prompt_matches(code_tok, hf, prefix, suffix, suffix_first):
    ids = hf(prefix + "<FILL_ME>" + suffix, suffix_first=suffix_first).input_ids
    assert ids == infill_tokens(code_tok, prefix, suffix, suffix_first=suffix_first)


def test_transformers_treats_an_empty_suffix_as_plain_completion(code_tok, hf):
    assert hf("a<FILL_ME>").input_ids == code_tok.encode("a", bos=True)
    assert infill_tokens(code_tok, "a", "") == [1, 32007, *code_tok.encode("a"), 32008, 32009]


@pytest.mark.parametrize("prefix,suffix", [("def f():\n", "\nreturn x\n"), ("x = 1", "y"), ("\n\nx", "\n")])
def test_transformers_5_keeps_the_dummy_prefix_on_the_suffix(code_tok, hf, prefix, suffix):
    if hf_major() < 5:
        pytest.skip("transformers 4 encodes the suffix without the dummy prefix, as Meta")
    ids = hf(prefix + "<FILL_ME>" + suffix).input_ids
    assert ids != infill_tokens(code_tok, prefix, suffix)
    assert ids == [1, 32007, *code_tok.encode(prefix), 32008, *code_tok.encode(suffix), 32009]


def test_transformers_5_merges_whitespace_runs_unlike_sentencepiece(code_tok, hf):
    if hf_major() < 5:
        pytest.skip("transformers 4's slow tokenizer is SentencePiece itself")
    assert code_tok.encode("a  b") == [263, 29871, 289]  # ▁a ▁ ▁b
    assert hf("a  b", add_special_tokens=False).input_ids == [263, 259, 29890]  # ▁a ▁▁ b


# -- bad input -----------------------------------------------------------------------------

def test_infill_tokens_on_llama2_is_refused(llama_tokenizer):
    with pytest.raises(ValueError, match="no infilling pieces") as e:
        infill_tokens(llama_tokenizer, "a", "b")
    assert "\n" not in str(e.value)


def test_a_non_sentencepiece_file_is_refused(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model at all\x00\xff")
    with pytest.raises(ValueError, match="bad.model: not a SentencePiece model"):
        add_infilling_pieces(bad, tmp_path / "out")


def test_an_extended_model_is_refused(code_model, tmp_path):
    with pytest.raises(ValueError, match=r"already has infilling piece '▁<SU' \(id 32000\)"):
        add_infilling_pieces(code_model, tmp_path / "again")


def test_a_unigram_model_is_refused(tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(f"hello world {i}" for i in range(100)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "t.txt"), model_prefix=str(tmp_path / "uni"),
                                   model_type="unigram", vocab_size=25, minloglevel=2)
    with pytest.raises(ValueError, match="uni.model: .* BPE pieces; this model is UNIGRAM"):
        add_infilling_pieces(tmp_path / "uni.model", tmp_path / "out")


def test_a_missing_source_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        add_infilling_pieces(tmp_path / "nothing.model", tmp_path / "out")


# -- training and the CLI ------------------------------------------------------------------

def test_training_with_infilling_appends_the_pieces(tmp_path):
    text = tmp_path / "code.txt"
    text.write_text("\n".join(f"def f{i}(x):\n    return x * {i} + 1" for i in range(200)))
    tok = train_tokenizer([text], tmp_path / "tok", vocab_size=300, verbose=False, infilling=True)
    assert tok.vocab_size == 316
    assert (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id) == (307, 308, 309, 310)
    plain = train_tokenizer([text], tmp_path / "plain", vocab_size=300, verbose=False)
    assert tok.encode("def f3(x):") == plain.encode("def f3(x):")


def test_cli_code_llama_writes_32016_pieces(capsys, tmp_path):
    rc, out, _ = run_cli(capsys, "tokenizer", "code-llama", FIXTURE_TOKENIZER, tmp_path / "cl")
    assert rc == 0 and "32016 pieces" in out
    assert Tokenizer(tmp_path / "cl").vocab_size == 32016


def test_cli_encodes_an_infilling_prompt(capsys, code_model, code_tok):
    rc, out, _ = run_cli(capsys, "tokenizer", "encode", "--tokenizer", code_model, "--json",
                         "--infill-suffix", "\n    return x", "def f():")
    assert rc == 0
    assert out.strip() == str(infill_tokens(code_tok, "def f():", "\n    return x"))
