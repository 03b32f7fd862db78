"""SentencePiece BPE tokenizer: Meta's ``tokenizer.model`` and new ones trained with Llama 2's settings,
and Code Llama's vocabulary for infilling (Code Llama §2.3).

Code Llama's ``tokenizer.model`` is Llama 2's 32,000 pieces plus 16 appended ones (ids
32000..32015, :data:`INFILL_PIECES`): four sentinels, ``▁<PRE>`` 32007, ``▁<SUF>`` 32008,
``▁<MID>`` 32009 and ``▁<EOT>`` 32010, and the intermediate BPE pieces that build them
(``▁<SU``, ``▁<SUF`` ...) plus runs of ``<EOT>``. They are ordinary BPE pieces, not
user-defined symbols: the intermediate pieces exist only so that merges can reach the
sentinels, which is why the text prompt "<PRE> {pre} <SUF>{suf} <MID>" works with Code Llama's
plain tokenizer, and why " <SUF>" (with its space) encodes to the ``▁<SUF>`` id while "<SUF>"
without a preceding space does not. Their scores in Meta's file are not published; here they
continue Llama 2's merge ranks (see :func:`add_infilling_pieces`). :func:`add_infilling_pieces` appends them to any BPE
model the same way, and :func:`infill_tokens` lays out the prefix-suffix-middle prompt.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from llama2.corpus import iter_documents

# Code Llama §2.3: the 16 pieces Code Llama's vocabulary appends to Llama 2's, in id order
# (offset k = id - 32000 there). Offsets 7..10 are the infilling sentinels; the others are the
# BPE pieces on the way to them and runs of <EOT>, kept so that ids line up with Code Llama's.
INFILL_PIECES: tuple[str, ...] = (
    "▁<SU", "▁<SUF", "▁<PRE", "▁<M", "▁<MID", "▁<E", "▁<EOT",
    "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>",
    *("▁" + "<EOT>" * n for n in range(2, 7)),
)
PREFIX_PIECE, SUFFIX_PIECE, MIDDLE_PIECE, EOT_PIECE = "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"


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
        # Infilling sentinels (Code Llama §2.3); None when the vocabulary has none (Llama 2's).
        self.prefix_id: int | None = self._piece_id(PREFIX_PIECE)
        self.suffix_id: int | None = self._piece_id(SUFFIX_PIECE)
        self.middle_id: int | None = self._piece_id(MIDDLE_PIECE)
        self.eot_id: int | None = self._piece_id(EOT_PIECE)
        self._sp_no_prefix: spm.SentencePieceProcessor | None = None

    def _piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)  # unknown pieces map to <unk>: check the round trip
        return i if self.sp.id_to_piece(i) == piece else None

    @property
    def has_infilling(self) -> bool:
        """Whether the vocabulary has Code Llama's four infilling sentinels."""
        return None not in (self.prefix_id, self.suffix_id, self.middle_id, self.eot_id)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])
                for ids in self.sp.encode(list(texts))]

    def encode_infilling(self, text: str) -> list[int]:
        """``text``'s pieces without SentencePiece's dummy-prefix space: the suffix of an infilling
        prompt continues the text mid-line (Code Llama §2.3), so "  x" keeps exactly its two spaces.

        Meta encodes "☺" + text and drops the first two ids; that relies on "☺" being one piece
        that merges with nothing, true of Llama 2's vocabulary but not of one trained here. The
        same model with ``add_dummy_prefix`` off gives the same ids for any vocabulary.
        """
        return self._no_dummy_prefix().encode(text)

    def decode_infilling(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` that continue a text (an infilled middle): a leading "▁" is a real space,
        where :meth:`decode` drops it as the dummy prefix. Sentinels are skipped as in :meth:`decode`."""
        sentinels = {self.prefix_id, self.suffix_id, self.middle_id, self.eot_id}
        return self._no_dummy_prefix().decode(
            [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in sentinels])

    def _no_dummy_prefix(self) -> spm.SentencePieceProcessor:
        if self._sp_no_prefix is None:
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self.sp.serialized_model_proto())
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp_no_prefix = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return self._sp_no_prefix

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``. Ids outside the vocabulary and the infilling sentinels (PRE, SUF, MID,
        EOT) are skipped: they are ordinary BPE pieces to SentencePiece, which would print them as
        " <EOT>", but to an infilling model they are structure, not text (an infilled middle ends
        at EOT, Code Llama §2.3)."""
        sentinels = {self.prefix_id, self.suffix_id, self.middle_id, self.eot_id}
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in sentinels])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def same_pieces(self, other: Tokenizer) -> bool:
        """Whether ``other`` has the very same pieces at the same ids (a draft model for
        speculative decoding must: its token ids are the model's)."""
        return self.vocab_size == other.vocab_size and all(
            self.id_to_piece(i) == other.id_to_piece(i) for i in range(self.vocab_size))

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
    infilling: bool = False,
) -> Tokenizer:
    """Train a SentencePiece BPE model with Llama 2's settings; writes ``out_dir/tokenizer.model``.

    ``inputs`` are text, ``.gz``/``.xz`` text or JSONL (``{"text": ...}``) files. ``infilling``
    appends Code Llama's 16 pieces (:data:`INFILL_PIECES`) after the ``vocab_size`` trained
    ones, as Code Llama's 32,016 = 32,000 + 16 (Code Llama §2.3).
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
        data = model.getvalue()
        if infilling:
            data = _with_infilling_pieces(_parse_model(data, "the trained tokenizer"), "the trained tokenizer")
        (out_dir / "tokenizer.model").write_bytes(data)
    return Tokenizer(out_dir / "tokenizer.model")


def _parse_model(data: bytes, where: str) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # protobuf's DecodeError; the message is binary noise
        proto = None
    if proto is None or not proto.pieces:
        raise ValueError(f"{where}: not a SentencePiece model")
    return proto


_MERGE_LAST = -1e9  # the score SentencePiece gives whitespace-only pieces


def _with_infilling_pieces(proto: sentencepiece_model_pb2.ModelProto, where: str) -> bytes:
    """``proto`` serialised with :data:`INFILL_PIECES` appended as normal BPE pieces."""
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ValueError(f"{where}: Code Llama's infilling pieces are BPE pieces; this model is "
                         f"{sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)}")
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    clash = next((p for p in INFILL_PIECES if p in ids), None)
    if clash is not None:
        raise ValueError(f"{where}: already has infilling piece {clash!r} (id {ids[clash]})")
    # Scores continue the base vocabulary's merge ranks downwards, in id order (Llama 2's last
    # piece, id 31999, scores -31740; these get -31741..-31756): BPE applies these merges after
    # every ordinary merge of the base vocabulary, so text without them encodes as before.
    # Whitespace-run pieces ("▁▁", "▁▁▁▁" ...) sit apart at -1e9 (merged last of all); they are
    # skipped here, and float32 could not order 16 scores below -1e9 anyway.
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    lowest = min((p.score for p in proto.pieces if p.type == normal and p.score > _MERGE_LAST), default=0.0)
    for k, piece in enumerate(INFILL_PIECES):
        proto.pieces.add(piece=piece, score=lowest - 1 - k, type=normal)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto.SerializeToString()


def add_infilling_pieces(src: str | os.PathLike, out: str | os.PathLike) -> Tokenizer:
    """Write ``out`` (a ``.model`` file, or a directory that gets ``tokenizer.model``): the
    SentencePiece BPE model ``src`` with Code Llama's 16 pieces appended at ids
    vocab..vocab+15. From Llama 2's ``tokenizer.model`` this gives Code Llama's 32,016-piece
    vocabulary (Code Llama §2.3)."""
    src = Path(src)
    if src.is_dir():
        src = src / "tokenizer.model"
    if not src.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {src}")
    data = _with_infilling_pieces(_parse_model(src.read_bytes(), str(src)), str(src))
    out = Path(out)
    if out.suffix != ".model":
        out.mkdir(parents=True, exist_ok=True)
        out = out / "tokenizer.model"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return Tokenizer(out)


def infill_tokens(tok: Tokenizer, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
    """The infilling prompt of Code Llama §2.3; the model then writes the middle and ends it with EOT.

    PSM (prefix-suffix-middle): BOS PRE prefix SUF suffix MID.
    SPM (``suffix_first``): BOS PRE SUF suffix MID prefix, so that the middle continues the prefix
    directly. The prefix keeps the dummy-prefix space (it starts a text); the suffix does not
    (:meth:`Tokenizer.encode_infilling`), as in Meta's reference implementation.
    """
    if not tok.has_infilling:
        raise ValueError(f"{tok.path}: no infilling pieces (PRE/SUF/MID/EOT); build Code Llama's vocabulary "
                         "with `llama2 tokenizer code-llama` or train with --infilling")
    if suffix_first:
        return ([tok.bos_id, tok.prefix_id, tok.suffix_id] + tok.encode_infilling(suffix)
                + [tok.middle_id] + tok.encode(prefix))
    return ([tok.bos_id, tok.prefix_id] + tok.encode(prefix) + [tok.suffix_id]
            + tok.encode_infilling(suffix) + [tok.middle_id])
