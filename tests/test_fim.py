"""Fill-in-the-middle training documents (Code Llama §2.3): the PSM and SPM layouts, their
prompt part equal to the inference prompt, uniform seeded cuts, the document recoverable from
the pieces, `llama2 prepare --fim-rate`, and the refusal of a tokenizer without infilling pieces."""

import json
import random
from collections import Counter

import numpy as np
import pytest

from llama2.corpus import code_corpus_files, iter_documents
from llama2.data.fim import fim_tokens, line_split_points, split_points
from llama2.data.shards import TokenStream, fim_settings, prepare, read_documents
from llama2.tokenizer import Tokenizer, infill_tokens, train_tokenizer

from .conftest import run_cli


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    """60 documents of the bundled code corpus as JSONL, and a 400-piece infilling tokenizer trained on them."""
    root = tmp_path_factory.mktemp("fim")
    docs = [d for _, d in zip(range(60), iter_documents(code_corpus_files()[0]))]
    jsonl = root / "code.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = train_tokenizer([jsonl], root / "tok", vocab_size=400, verbose=False, infilling=True)
    return {"docs": docs, "jsonl": jsonl, "tok": tok}


DOC = 'def add(a, b):\n    """Return a plus b."""\n    return a + b\n\n\nprint(add(1, 2))'


def cut(seed: int, text: str, spm_rate: float = 0.5) -> tuple[str, str, str, bool]:
    """The prefix, middle, suffix and order fim_tokens draws with rate 1 from Random(seed)."""
    rng = random.Random(seed)
    rng.random()  # the FIM-or-not draw
    i, j = split_points(len(text), rng)
    return text[:i], text[i:j], text[j:], rng.random() < spm_rate


def continuation(tok: Tokenizer, ids: list[int]) -> str:
    """Text of pieces that continue a text (no dummy-prefix space to strip)."""
    text = tok.decode_infilling(ids)
    assert text == tok.decode(tok.encode("a") + list(ids))[1:]  # the same, decoded after a word
    return text


def test_rate_zero_gives_the_plain_document(code):
    tok = code["tok"]
    for seed in range(20):
        assert fim_tokens(tok, DOC, random.Random(seed), fim_rate=0.0) == tok.encode(DOC, bos=True, eos=True)


def test_psm_layout_sentinels_in_order_eot_then_eos_last(code):
    tok = code["tok"]
    for seed in range(30):
        ids = fim_tokens(tok, DOC, random.Random(seed), fim_rate=1.0, spm_rate=0.0)
        assert ids[:2] == [tok.bos_id, tok.prefix_id] and ids[-2:] == [tok.eot_id, tok.eos_id]
        for sentinel in (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id, tok.bos_id, tok.eos_id):
            assert ids.count(sentinel) == 1
        assert 1 < ids.index(tok.suffix_id) < ids.index(tok.middle_id) < len(ids) - 2


def test_spm_layout_starts_with_pre_suf_and_ends_with_eot_eos(code):
    tok = code["tok"]
    for seed in range(30):
        ids = fim_tokens(tok, DOC, random.Random(seed), fim_rate=1.0, spm_rate=1.0)
        assert ids[:3] == [tok.bos_id, tok.prefix_id, tok.suffix_id] and ids[-2:] == [tok.eot_id, tok.eos_id]
        for sentinel in (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id):
            assert ids.count(sentinel) == 1
        assert 2 < ids.index(tok.middle_id) < len(ids) - 2


@pytest.mark.parametrize("spm", [False, True])
def test_everything_before_the_middle_is_the_inference_prompt(code, spm):
    tok = code["tok"]
    for seed, text in enumerate(code["docs"][:20]):
        ids = fim_tokens(tok, text, random.Random(seed), fim_rate=1.0, spm_rate=float(spm))
        prefix, middle, suffix, _ = cut(seed, text, float(spm))
        prompt = infill_tokens(tok, prefix, suffix, suffix_first=spm)
        # Meta's codellama layout, spelled out independently of infill_tokens.
        if spm:
            spelled = ([tok.bos_id, tok.prefix_id, tok.suffix_id] + tok.encode_infilling(suffix) + [tok.middle_id]
                       + tok.encode(prefix))
        else:
            spelled = ([tok.bos_id, tok.prefix_id] + tok.encode(prefix) + [tok.suffix_id]
                       + tok.encode_infilling(suffix) + [tok.middle_id])
        assert prompt == spelled
        assert ids == prompt + tok.encode_infilling(middle) + [tok.eot_id, tok.eos_id]


def test_the_pieces_decode_back_to_the_document(code):
    tok = code["tok"]
    for seed, text in enumerate(code["docs"] * 2):
        ids = fim_tokens(tok, text, random.Random(seed), fim_rate=1.0, spm_rate=0.5)
        mid = ids.index(tok.middle_id)
        if ids[2] == tok.suffix_id:  # SPM: suffix, then the prefix and the middle as one text
            suffix, prefix_and_middle = ids[3:mid], ids[mid + 1:-2]
            assert tok.decode(prefix_and_middle) + continuation(tok, suffix) == text, seed
        else:
            suf = ids.index(tok.suffix_id)
            prefix, suffix, middle = ids[2:suf], ids[suf + 1:mid], ids[mid + 1:-2]
            assert tok.decode(prefix) + continuation(tok, middle) + continuation(tok, suffix) == text, seed


def test_the_middle_keeps_its_leading_spaces(code):
    tok = code["tok"]
    text = "x = 1\n    y = 2"
    ids = fim_tokens(tok, text, random.Random(0), fim_rate=1.0, spm_rate=0.0)
    prefix, middle, suffix, _ = cut(0, text, 0.0)
    assert ids[ids.index(tok.middle_id) + 1:-2] == tok.encode_infilling(middle)
    assert continuation(tok, tok.encode_infilling("  y")) == "  y"


def test_cuts_are_uniform_sorted_and_may_leave_parts_empty():
    rng = random.Random(0)
    n, draws = 100, 20_000
    cuts = [split_points(n, rng) for _ in range(draws)]
    assert all(0 <= i <= j <= n for i, j in cuts)
    # Each of two uniform draws: the smaller has mean n/3, the larger 2n/3.
    assert abs(np.mean([i for i, _ in cuts]) - n / 3) < 1.5 and abs(np.mean([j for _, j in cuts]) - 2 * n / 3) < 1.5
    # The middle's length of two uniform cuts: P(len <= n/2) = 3/4.
    assert abs(np.mean([j - i <= n / 2 for i, j in cuts]) - 0.75) < 0.02
    assert any(i == j for i, j in cuts) and any(i == 0 for i, _ in cuts) and any(j == n for _, j in cuts)


def test_fim_and_spm_shares_follow_the_rates(code):
    tok = code["tok"]
    kinds = Counter()
    for seed in range(1000):
        ids = fim_tokens(tok, DOC, random.Random(seed), fim_rate=0.9, spm_rate=0.5)
        kinds["plain" if tok.prefix_id not in ids else "spm" if ids[2] == tok.suffix_id else "psm"] += 1
    assert 0.87 < (kinds["psm"] + kinds["spm"]) / 1000 < 0.93
    assert 0.44 < kinds["spm"] / (kinds["psm"] + kinds["spm"]) < 0.56


def test_same_seed_same_tokens_other_seed_other_cut(code):
    tok = code["tok"]
    text = code["docs"][0]
    a = fim_tokens(tok, text, random.Random(7), fim_rate=1.0)
    assert fim_tokens(tok, text, random.Random(7), fim_rate=1.0) == a
    assert any(fim_tokens(tok, text, random.Random(s), fim_rate=1.0) != a for s in range(8, 12))


def test_prepare_with_fim_rate_records_it_and_writes_fim_documents(code, tmp_path):
    out = tmp_path / "data"
    index = prepare([code["jsonl"]], code["tok"].path, out, val_fraction=0.0, workers=1, log=lambda m: None,
                    fim_rate=1.0, fim_spm_rate=0.5, fim_seed=3)
    tok = code["tok"]
    assert fim_settings(index) == {"rate": 1.0, "spm_rate": 0.5, "seed": 3, "unit": "char", "static": True,
                                   "prefix_id": tok.prefix_id, "suffix_id": tok.suffix_id,
                                   "middle_id": tok.middle_id, "eot_id": tok.eot_id}
    assert json.loads((out / "index.json").read_text())["fim"]["rate"] == 1.0
    ids = TokenStream(out, "train").read(0, index["tokens"]["train"])
    n = index["documents"]["train"]
    assert n == len(code["docs"])
    for sentinel in (tok.bos_id, tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id, tok.eos_id):
        assert (ids == sentinel).sum() == n
    # Deterministic: the same settings give the same bytes; another seed cuts elsewhere.
    prepare([code["jsonl"]], code["tok"].path, tmp_path / "again", val_fraction=0.0, workers=1, log=lambda m: None,
            fim_rate=1.0, fim_seed=3)
    assert (tmp_path / "again" / "train-00000.bin").read_bytes() == (out / "train-00000.bin").read_bytes()
    prepare([code["jsonl"]], code["tok"].path, tmp_path / "other", val_fraction=0.0, workers=1, log=lambda m: None,
            fim_rate=1.0, fim_seed=4)
    assert (tmp_path / "other" / "train-00000.bin").read_bytes() != (out / "train-00000.bin").read_bytes()


def test_prepare_without_fim_records_nothing_and_writes_plain_documents(code, tmp_path):
    index = prepare([code["jsonl"]], code["tok"].path, tmp_path, val_fraction=0.0, workers=1, log=lambda m: None)
    assert "fim" not in index and fim_settings(index) == {"rate": 0.0}
    tok = code["tok"]
    ids = TokenStream(tmp_path, "train").read(0, index["tokens"]["train"])
    expected = [i for d in read_documents(code["jsonl"]) for i in tok.encode(d, bos=True, eos=True)]
    assert ids.tolist() == expected


def test_prepare_command_takes_fim_flags(code, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "prepare", "--tokenizer", code["tok"].path, "--input", code["jsonl"],
                         "--out", tmp_path, "--val-fraction", "0", "--workers", "1", "--fim-rate", "0.9",
                         "--fim-spm-rate", "0.25", "--no-progress")
    assert rc == 0, err
    fim = json.loads((tmp_path / "index.json").read_text())["fim"]
    assert (fim["rate"], fim["spm_rate"], fim["static"]) == (0.9, 0.25, True)
    assert "fill-in-the-middle: rate 0.9" in err


def test_a_tokenizer_without_infilling_pieces_is_refused(llama_tokenizer, code, tmp_path):
    with pytest.raises(ValueError, match="no infilling pieces") as e:
        fim_tokens(llama_tokenizer, DOC, random.Random(0), fim_rate=0.5)
    assert "\n" not in str(e.value) and str(llama_tokenizer.path) in str(e.value)
    with pytest.raises(ValueError, match="no infilling pieces.*--fim-rate 0.5"):
        prepare([code["jsonl"]], llama_tokenizer.path, tmp_path, workers=1, log=lambda m: None, fim_rate=0.5)
    assert not (tmp_path / "index.json").exists()
    # Without FIM the same tokenizer is fine.
    assert fim_tokens(llama_tokenizer, DOC, random.Random(0), fim_rate=0.0) == llama_tokenizer.encode(DOC, True, True)


@pytest.mark.parametrize("field,value", [("fim_rate", 1.5), ("fim_spm_rate", -0.1)])
def test_rates_outside_zero_one_are_refused(code, field, value):
    rates = {"fim_rate": 0.5, "spm_rate": 0.5}
    rates["fim_rate" if field == "fim_rate" else "spm_rate"] = value
    with pytest.raises(ValueError, match=f"{field} must be in \\[0, 1\\], got {value}"):
        fim_tokens(code["tok"], DOC, random.Random(0), **rates)


def test_fim_shards_do_not_depend_on_the_number_of_workers(code, tmp_path):
    kw = dict(val_fraction=0.1, shard_chars=8_000, log=lambda m: None, fim_rate=0.9, progress=False)
    one = prepare([code["jsonl"]], code["tok"].path, tmp_path / "one", workers=1, **kw)
    two = prepare([code["jsonl"]], code["tok"].path, tmp_path / "two", workers=2, **kw)
    assert len(one["splits"]["train"]) > 2 and one == {**two, "inputs": one["inputs"]}
    for shard in one["splits"]["train"] + one["splits"]["val"]:
        assert (tmp_path / "one" / shard["file"]).read_bytes() == (tmp_path / "two" / shard["file"]).read_bytes()


def test_turning_fim_on_re_encodes_shards_made_without_it(code, tmp_path):
    tok = code["tok"]
    prepare([code["jsonl"]], tok.path, tmp_path, val_fraction=0.0, workers=1, log=lambda m: None)
    index = prepare([code["jsonl"]], tok.path, tmp_path, val_fraction=0.0, workers=1, log=lambda m: None, fim_rate=1.0)
    ids = TokenStream(tmp_path, "train").read(0, index["tokens"]["train"])
    assert (ids == tok.prefix_id).sum() == index["documents"]["train"]


def test_line_cuts_fall_at_line_starts_so_every_middle_is_whole_lines():
    text = "a = 1\nb = 2\n\nc = 3\nd = 4"
    starts = {0, 6, 12, 13, 19, len(text)}
    seen = set()
    for seed in range(400):
        i, j = line_split_points(text, random.Random(seed))
        assert i < j and {i, j} <= starts  # never an empty middle
        seen |= {i, j}
    assert seen == starts  # every line start (and the end) is drawn
    assert line_split_points("", random.Random(0)) == (0, 0)


def test_line_unit_fim_documents_decode_to_whole_line_pieces(code):
    tok = code["tok"]
    for seed in range(20):
        ids = fim_tokens(tok, DOC, random.Random(seed), fim_rate=1.0, spm_rate=0.0, unit="line")
        middle = continuation(tok, ids[ids.index(tok.middle_id) + 1:ids.index(tok.eot_id)])
        prefix = tok.decode(ids[ids.index(tok.prefix_id) + 1:ids.index(tok.suffix_id)])
        assert prefix in ("", DOC) or prefix.endswith("\n")
        assert middle and (middle.endswith("\n") or DOC.endswith(middle))
        assert middle in DOC


def test_an_unknown_fim_unit_is_refused(code):
    with pytest.raises(ValueError, match="fim_unit must be one of char, line, got 'word'"):
        fim_tokens(code["tok"], DOC, random.Random(0), fim_rate=1.0, unit="word")


def test_prepare_records_the_fim_unit(code, tmp_path):
    index = prepare([code["jsonl"]], code["tok"].path, tmp_path / "d", workers=1, progress=False, log=lambda m: None,
                    fim_rate=0.9, fim_unit="line")
    assert fim_settings(index)["unit"] == "line"
    char = prepare([code["jsonl"]], code["tok"].path, tmp_path / "c", workers=1, progress=False, log=lambda m: None,
                   fim_rate=0.9)
    assert fim_settings(char)["unit"] == "char"
