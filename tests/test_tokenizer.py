"""Tokenizer: Meta's vocabulary encodes as Meta's does; new tokenizers get Llama 2's settings."""

import pytest

from llama2 import Tokenizer, train_tokenizer


def test_special_ids_match_llama2(llama_tokenizer):
    tok = llama_tokenizer
    assert (tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 0, 1, 2, -1)


@pytest.mark.parametrize(
    "text,ids",
    [
        ("Hello world", [15043, 3186]),
        (" Hello world", [29871, 15043, 3186]),
        ("[INST]", [518, 25580, 29962]),
        ("[/INST]", [518, 29914, 25580, 29962]),
        ("<<SYS>>", [3532, 14816, 29903, 6778]),
        ("\n", [29871, 13]),
    ],
)
def test_known_ids_of_the_real_vocabulary(llama_tokenizer, text, ids):
    assert llama_tokenizer.encode(text) == ids


def test_bos_and_eos_are_optional_wrappers(llama_tokenizer):
    assert llama_tokenizer.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]


def test_digits_are_split(llama_tokenizer):
    ids = llama_tokenizer.encode("I have 3 apples")
    assert [29871, 29941] == ids[2:4]
    assert len(llama_tokenizer.encode("12345")) == 6  # dummy-prefix space + one piece per digit


def test_decode_round_trips_and_bytes_fall_back(llama_tokenizer):
    text = "Grüße 🦙 — tab\tand  two spaces"
    ids = llama_tokenizer.encode(text)
    assert llama_tokenizer.decode(ids) == text
    assert any(3 <= i <= 258 for i in ids)  # the emoji is spelled with <0xNN> byte pieces


def test_missing_or_corrupt_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(bad)


def test_training_a_tokenizer_uses_llama2_settings(tmp_path):
    import sentencepiece.sentencepiece_model_pb2 as pb

    text = tmp_path / "corpus.txt"
    lines = [f"The llama number {i} walked {i * 7} miles across the Andes, said Ana." for i in range(400)]
    text.write_text("\n".join(lines) + "\n")
    tok = train_tokenizer([text], tmp_path / "tok", vocab_size=300, verbose=False)
    assert tok.vocab_size == 300 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)
    proto = pb.ModelProto()
    proto.ParseFromString((tmp_path / "tok" / "tokenizer.model").read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    assert spec.model_type == pb.TrainerSpec.BPE
    assert spec.split_digits and spec.byte_fallback and spec.allow_whitespace_only_pieces
    assert norm.name == "identity" and norm.add_dummy_prefix and not norm.remove_extra_whitespaces
    # digits split, unseen characters survive through byte pieces, whitespace is kept
    assert all(tok.id_to_piece(i).strip("▁").isdigit() or tok.id_to_piece(i) == "▁" for i in tok.encode("2023"))
    assert tok.decode(tok.encode("llama  Ω 42")) == "llama  Ω 42"


def test_training_on_empty_input_fails_clearly(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no text found"):
        train_tokenizer([empty], tmp_path / "tok", vocab_size=300, verbose=False)
