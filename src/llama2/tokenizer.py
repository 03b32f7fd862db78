"""SentencePiece BPE tokenizer: Meta's ``tokenizer.model`` and new ones trained with Llama 2's settings."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from llama2.corpus import iter_documents


class Tokenizer:
    """``encode(s, bos, eos)`` = optional BOS + SentencePiece pieces + optional EOS."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()  # -1 for Llama 2: it has no pad token
        self.unk_id: int = self.sp.unk_id()
        self.vocab_size: int = self.sp.vocab_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])
                for ids in self.sp.encode(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


# Llama 2's trainer settings (paper §2.1): BPE, digits split into single tokens, unknown bytes
# decomposed into <0xNN> pieces, no normalisation, a dummy prefix space, whitespace kept.
LLAMA2_TRAINER_SETTINGS = dict(
    model_type="bpe",
    split_digits=True,
    byte_fallback=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    max_sentencepiece_length=16,
    character_coverage=0.99995,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)


def train_tokenizer(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    vocab_size: int = 32000,
    max_sentence_length: int = 16384,
    input_sentence_size: int = 2_000_000,
    num_threads: int | None = None,
    verbose: bool = True,
) -> Tokenizer:
    """Train a SentencePiece BPE model with Llama 2's settings; writes ``out_dir/tokenizer.model``.

    ``inputs`` are text, ``.gz``/``.xz`` text or JSONL (``{"text": ...}``) files.
    """
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer training input not found: {p}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # SentencePiece reads plain text, one sentence per line: flatten every input into one file.
        flat = Path(tmp) / "input.txt"
        n_lines = 0
        with open(flat, "w", encoding="utf-8") as f:
            for p in paths:
                for doc in iter_documents(p):
                    for line in doc.splitlines():
                        if line.strip():
                            f.write(line + "\n")
                            n_lines += 1
        if n_lines == 0:
            raise ValueError(f"no text found in {', '.join(map(str, paths))}")
        if verbose:
            print(f"training a {vocab_size}-piece BPE tokenizer on {n_lines:,} lines ...", flush=True)
        # Fed as an iterator and written through model_writer so that the model file records no
        # temporary paths: the same inputs give the same tokenizer.model, byte for byte.
        model = io.BytesIO()
        with open(flat, encoding="utf-8") as f:
            spm.SentencePieceTrainer.train(
                sentence_iterator=(line.rstrip("\n") for line in f),
                model_writer=model,
                vocab_size=vocab_size,
                max_sentence_length=max_sentence_length,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                num_threads=num_threads or os.cpu_count() or 1,
                minloglevel=0 if verbose else 2,
                **LLAMA2_TRAINER_SETTINGS,
            )
        (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    return Tokenizer(out_dir / "tokenizer.model")
