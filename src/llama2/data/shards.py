"""Pretraining data: ``llama2 prepare`` (text -> token shards) and the packed-sequence loader.

A prepared data directory::

    index.json          dtype, vocabulary, tokenizer hash, shards per split, document counts,
                        malformed lines per input file, fill-in-the-middle settings (when on)
    tokenizer.model     the tokenizer the shards were made with (so the directory is self-contained)
    train-00000.bin     raw little-endian uint16 token ids (uint32 when the vocabulary needs it)
    train-00000.json    the shard's sidecar: its content key, token and document counts
    train-00000.mask    only for a shard with prompt/completion documents: one byte per token,
                        0 for a prompt's token (no target of the loss), 2 for a completion's,
                        1 for a plain text's
    val-00000.bin ...   the held-out validation split

Each document is wrapped ``BOS ... EOS`` and documents are concatenated. The split is decided
per document from a hash of its text, so it does not depend on the order of the inputs or
the number of workers. Documents are grouped in input order into shards of about
``shard_chars`` characters; each shard is tokenized by a worker process and written
atomically with a sidecar holding a hash of its input, so re-running ``prepare`` skips
the shards that are complete and the output is byte-identical for the same input.

With ``fim_rate > 0`` (Code Llama §2.3) each document is, with that probability, turned into
a fill-in-the-middle example by :func:`llama2.data.fim.fim_tokens` (its docstring has the
layout; it is still framed ``BOS ... EOS``; ``fim_unit`` says whether the cuts fall anywhere or
at line starts), and ``index.json`` records the settings under ``"fim"``. The transformation is static: applied once, here, to both splits (so the
validation loss measures the same mixture), with draws fixed by ``fim_seed``, the shard and
the document's place in it, so every epoch sees the same cut of a document. That keeps the
shards plain token arrays that the loader reads as before; new cuts each epoch would need the
text at training time. A small corpus read for many epochs thus repeats its cuts; more
documents give more cuts (``code_world_documents`` makes as many as asked, each cut afresh). ``fim_rate = 0`` (the default) gives exactly the shards and index made
without it.

A JSONL row ``{"prompt": ..., "completion": ...}`` (TRL's prompt-completion format) is one
document, the prompt then the completion, whose loss covers only the completion's tokens and the
EOS (the completion-only loss of TRL and of the SFT stage, torchtune's ``train_on_input: False``):
the shard gets a ``.mask`` file and the loader sets the labels of the prompt's tokens to -100
(and, with ``completion_weight``, weighs a completion's tokens against plain text's in a mixture).
Such a document is never FIM-transformed (it is a task, asked in its order). A row has either a
``text`` or a ``prompt`` and a ``completion``.

The loader cuts the concatenated stream of a split into windows of ``seq_len + 1`` tokens
(inputs and next-token labels; consecutive windows share one token), shuffles the windows
once per epoch with a seeded permutation and deals each global batch out to the
data-parallel ranks. Windows cross document boundaries, as usual for pretraining (no
per-document attention mask). Its position (epoch, windows consumed) is part of every
checkpoint, so a resumed run reads exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import lzma
import multiprocessing as mp
import os
import shutil
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llama2.corpus import code_corpus_files
from llama2.data.code_world import code_documents
from llama2.data.fim import check_infilling, check_rates, document_rng, fim_tokens
from llama2.data.world import World
from llama2.recipe import add_config_args, load_config, setting
from llama2.tokenizer import Tokenizer

INDEX = "index.json"
FORMAT = "llama2-token-shards"
SPLITS = ("train", "val")
IGNORE_INDEX = -100  # the label cross-entropy skips (train.core's)
COMPLETION = 2  # a completion's token in a .mask file (0: a prompt's, 1: a plain text's)


# ==========================================================================================
# prepare
# ==========================================================================================

@dataclass
class InputStats:
    path: str
    documents: int = 0
    malformed: int = 0
    first_malformed: list[str] = field(default_factory=list)  # "file:line: why", a few examples

    def bad(self, line: int, why: str) -> None:
        self.malformed += 1
        if len(self.first_malformed) < 3:
            self.first_malformed.append(f"{self.path}:{line}: {why}")


def _open_binary(path: Path):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    for ext in (".gz", ".xz", ".bz2"):
        name = name.removesuffix(ext)
    return name.endswith((".jsonl", ".json"))


class PromptCompletion(str):
    """A document whose loss covers only its completion: the text is ``prompt + completion``
    (so everything that reads documents as text reads it whole), ``prompt`` is its first part."""

    prompt: str

    def __new__(cls, prompt: str, completion: str) -> PromptCompletion:
        doc = super().__new__(cls, prompt + completion)
        doc.prompt = prompt
        return doc

    def __reduce__(self):  # to the tokenizer processes
        return PromptCompletion, (self.prompt, self[len(self.prompt):])


def read_documents(path: str | os.PathLike, stats: InputStats | None = None) -> Iterator[str]:
    """Documents of one input file. JSONL: one ``{"text": ...}`` per line, or one
    ``{"prompt": ..., "completion": ...}`` (a :class:`PromptCompletion`); a line that is not
    JSON, not an object or has neither is counted in ``stats`` as malformed, never silently
    dropped. Text files: as ``llama2.corpus.iter_documents`` splits them."""
    path = Path(path)
    stats = stats if stats is not None else InputStats(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if not _is_jsonl(path):
        from llama2.corpus import iter_documents

        for doc in iter_documents(path):
            if doc:
                stats.documents += 1
                yield doc
        return
    with _open_binary(path) as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.bad(n, "not UTF-8")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                stats.bad(n, f"invalid JSON ({e.msg})")
                continue
            text = obj.get("text") if isinstance(obj, dict) else None
            if isinstance(obj, dict) and "text" not in obj and ("prompt" in obj or "completion" in obj):
                prompt, completion = obj.get("prompt"), obj.get("completion")
                if not (isinstance(prompt, str) and isinstance(completion, str) and completion):
                    stats.bad(n, 'a prompt/completion row needs a string "prompt" and a non-empty string '
                                 '"completion"')
                    continue
                text = PromptCompletion(prompt, completion)
            if not isinstance(text, str):
                stats.bad(n, 'no string "text" field (nor "prompt" and "completion")')
                continue
            if text:
                stats.documents += 1
                yield text


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids < 65536 (Llama 2's 32k vocabulary); larger vocabularies need uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def in_validation(text: str, val_fraction: float) -> bool:
    """Deterministic per-document split: a hash of the text, not its position."""
    return zlib.crc32(text.encode("utf-8")) % 1_000_000 < val_fraction * 1_000_000


def prepare(inputs: Sequence[str | os.PathLike], tokenizer: str | os.PathLike, out: str | os.PathLike,
            val_fraction: float = 0.01, workers: int | None = None, shard_chars: int = 8_000_000,
            progress: bool = True, log=None, fim_rate: float = 0.0, fim_spm_rate: float = 0.5,
            fim_seed: int = 0, fim_unit: str = "char") -> dict:
    """Tokenize ``inputs`` into ``out`` (see the module docstring); returns the index.
    ``fim_rate``, ``fim_spm_rate``, ``fim_unit``: Code Llama's infilling transformation (off at 0)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    paths = _input_paths(inputs)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    check_rates(fim_rate, fim_spm_rate, fim_unit)
    tok = Tokenizer(tokenizer)  # validates the file before any work
    if fim_rate > 0:
        check_infilling(tok, f"--fim-rate {fim_rate}")
    # The unit joins the tuple (and so the shards' cache key) only when it is not the default,
    # so shards made before it existed are reused.
    fim = ((fim_rate, fim_spm_rate, fim_seed) + (() if fim_unit == "char" else (fim_unit,))) if fim_rate > 0 else None
    out = Path(out)
    tok_sha = _copy_tokenizer(tok, out)
    dtype = token_dtype(tok.vocab_size)
    workers = max(1, workers if workers is not None else min(8, os.cpu_count() or 1))
    stats = [InputStats(str(p)) for p in paths]
    jobs = (_job(out, split, name, texts, tok_sha, dtype, fim)
            for split, name, texts in _shard_documents(paths, stats, val_fraction, shard_chars))
    shards, reused = _run_jobs(jobs, workers, dtype.itemsize, progress)
    _remove_stale_shards(out, shards)
    index = _index(tok, tok_sha, dtype, val_fraction, shards, stats, fim)
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
    os.replace(tmp, out / INDEX)
    _log_summary(log, out, index, reused, stats)
    return index


def _input_paths(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("prepare: no input files given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input file not found: {p}")
    return paths


def _copy_tokenizer(tok: Tokenizer, out: Path) -> str:
    """Put the tokenizer in ``out`` (the directory is self-contained); returns its SHA-256."""
    out.mkdir(parents=True, exist_ok=True)
    if tok.path.resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tok.path, out / "tokenizer.model")
    return _sha256_file(out / "tokenizer.model")


def _shard_documents(paths: Sequence[Path], stats: Sequence[InputStats], val_fraction: float,
                     shard_chars: int) -> Iterator[tuple[str, str, list[str]]]:
    """(split, shard file name, documents), the documents read lazily in input order: a split's
    shard is cut once it holds ``shard_chars`` characters; both splits' last shards come at the end."""
    pending: dict[str, list[str]] = {s: [] for s in SPLITS}
    size = dict.fromkeys(SPLITS, 0)
    count = dict.fromkeys(SPLITS, 0)
    for p, st in zip(paths, stats):
        for doc in read_documents(p, st):
            split = "val" if in_validation(doc, val_fraction) else "train"
            pending[split].append(doc)
            size[split] += len(doc)
            if size[split] >= shard_chars:
                yield split, f"{split}-{count[split]:05d}.bin", pending[split]
                pending[split], size[split] = [], 0
                count[split] += 1
    for split in SPLITS:
        if pending[split]:
            yield split, f"{split}-{count[split]:05d}.bin", pending[split]


def _job(out: Path, split: str, name: str, texts: list[str], tok_sha: str, dtype: np.dtype,
         fim: tuple | None = None) -> tuple[str, tuple]:
    """(split, the job of :func:`_encode_shard`). The key hashes all a shard's bytes depend on
    (tokenizer, dtype, FIM settings, its documents), so a complete shard with the same key can
    be reused."""
    # Without FIM the key is the one made before FIM existed, so old shards are reused.
    h = hashlib.sha256(f"{tok_sha} {dtype.name}".encode() + (f" fim {fim}".encode() if fim else b""))
    for t in texts:
        h.update(len(t).to_bytes(8, "little"))
        h.update(t.encode("utf-8"))
        if isinstance(t, PromptCompletion):  # (plain texts hash as before, so old shards are reused)
            h.update(b" completion after %d" % len(t.prompt))
    tok_file = str((out / "tokenizer.model").resolve())
    return split, (tok_file, texts, str(out / name), dtype.name, h.hexdigest(), fim)


def _run_jobs(jobs: Iterable[tuple[str, tuple]], workers: int, itemsize: int,
              progress: bool) -> tuple[dict[str, list[dict]], int]:
    """Each split's shard sidecars sorted by file, and how many complete shards were reused."""
    bar = tqdm(desc="prepare", unit=" shards", disable=not progress or not sys.stderr.isatty())
    shards: dict[str, list[dict]] = {s: [] for s in SPLITS}
    reused = 0
    # fork: workers need only numpy and SentencePiece, and must not re-run the caller's script.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = mp.get_context(method).Pool(workers) if workers > 1 else None
    try:
        for split, meta, was_done in _results(jobs, pool, workers, itemsize):
            shards[split].append(meta)
            reused += was_done
            bar.update(1)
            bar.set_postfix(tokens=f"{sum(m['tokens'] for s in SPLITS for m in shards[s]):,}")
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    for split in SPLITS:
        shards[split].sort(key=lambda m: m["file"])
    return shards, reused


def _results(jobs: Iterable[tuple[str, tuple]], pool, workers: int,
             itemsize: int) -> Iterator[tuple[str, dict, bool]]:
    """(split, sidecar, reused) for every job: a complete shard is reused, the others are encoded
    here (no pool) or by the pool, at most ``2 * workers`` in flight to bound the texts held in memory."""
    in_flight = []
    for split, job in jobs:
        done = _shard_done(Path(job[2]), job[4], itemsize)
        if done is not None:
            yield split, done, True
        elif pool is None:
            yield split, _encode_shard(job), False
        else:
            in_flight.append((split, pool.apply_async(_encode_shard, (job,))))
            while len(in_flight) > 2 * workers:
                s, r = in_flight.pop(0)
                yield s, r.get(), False
    for s, r in in_flight:
        yield s, r.get(), False


def _shard_done(out_file: Path, key: str, itemsize: int) -> dict | None:
    """The sidecar of a complete shard made from the same key, or None."""
    side = out_file.with_suffix(".json")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or not out_file.is_file() or out_file.stat().st_size != meta["tokens"] * itemsize:
        return None
    mask = out_file.with_name(meta["mask"]) if "mask" in meta else None
    if mask is not None and (not mask.is_file() or mask.stat().st_size != meta["tokens"]):
        return None
    return meta


_TOKENIZERS: dict[str, Tokenizer] = {}


def completion_tokens(tok: Tokenizer, doc: PromptCompletion) -> tuple[list[int], int]:
    """``BOS prompt completion EOS`` and how many of its first tokens are the prompt's: those its
    own encoding shares with the whole (a piece that straddles the seam is the completion's)."""
    ids = tok.encode(doc, bos=True, eos=True)
    prompt = tok.encode(doc.prompt, bos=True)
    n = 0
    while n < min(len(prompt), len(ids)) and ids[n] == prompt[n]:
        n += 1
    return ids, n


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _encode_shard(job: tuple) -> dict:
    """Worker: tokenize one shard's documents (BOS ... EOS each, or FIM examples) and write it
    atomically; with prompt/completion documents, its loss mask too."""
    tok_path, texts, out_file, dtype, key = job[:5]
    fim = job[5] if len(job) > 5 else None
    tok = _TOKENIZERS.get(tok_path)
    if tok is None:
        tok = _TOKENIZERS[tok_path] = Tokenizer(tok_path)
    if fim is None:
        encoded = tok.encode_batch(texts, bos=True, eos=True)
    else:
        rate, spm_rate, seed, *unit = fim
        name = Path(out_file).name
        encoded = [None if isinstance(t, PromptCompletion) else
                   fim_tokens(tok, t, document_rng(seed, name, i), rate, spm_rate, *unit) for i, t in enumerate(texts)]
    masks = [None] * len(texts)
    for i, t in enumerate(texts):
        if isinstance(t, PromptCompletion):
            encoded[i], n = completion_tokens(tok, t)
            masks[i] = np.concatenate([np.zeros(n, np.uint8), np.full(len(encoded[i]) - n, COMPLETION, np.uint8)])
    arrays = [np.asarray(ids, dtype=dtype) for ids in encoded]
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    out = Path(out_file)
    _write_atomic(out, tokens.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes())
    meta = {"file": out.name, "key": key, "tokens": int(tokens.size), "documents": len(texts)}
    completions = sum(m is not None for m in masks)
    if completions:
        mask = np.concatenate([m if m is not None else np.ones(a.size, np.uint8) for m, a in zip(masks, arrays)])
        _write_atomic(out.with_suffix(".mask"), mask.tobytes())
        meta.update(mask=out.with_suffix(".mask").name, completions=completions)
    _write_atomic(out.with_suffix(".json"), json.dumps(meta).encode())  # last: a sidecar means the shard is complete
    return meta


def _remove_stale_shards(out: Path, shards: dict[str, list[dict]]) -> None:
    """Shards left over from an earlier, larger input."""
    for split in SPLITS:
        expected = {m["file"] for m in shards[split]}
        masks = {m["mask"] for m in shards[split] if "mask" in m}
        for stale in out.glob(f"{split}-*.bin"):
            if stale.name not in expected:
                stale.unlink()
                stale.with_suffix(".json").unlink(missing_ok=True)
        for stale in out.glob(f"{split}-*.mask"):
            if stale.name not in masks:
                stale.unlink()


def _index(tok: Tokenizer, tok_sha: str, dtype: np.dtype, val_fraction: float, shards: dict[str, list[dict]],
           stats: Sequence[InputStats], fim: tuple | None = None) -> dict:
    """The contents of index.json (see the module docstring). ``"fim"``, only when the
    infilling transformation was on (so an index made without it is the one made before it
    existed; read it with :func:`fim_settings`): its rates, seed and sentinel ids."""
    index = {
        "format": FORMAT, "version": 1, "dtype": dtype.name, "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id, "eos_id": tok.eos_id, "tokenizer": "tokenizer.model",
        "tokenizer_sha256": tok_sha, "val_fraction": val_fraction,
        "splits": {s: [{k: m[k] for k in ("file", "tokens", "documents", "mask") if k in m} for m in shards[s]]
                   for s in SPLITS},
        "tokens": {s: sum(m["tokens"] for m in shards[s]) for s in SPLITS},
        "documents": {s: sum(m["documents"] for m in shards[s]) for s in SPLITS},
        "inputs": [{"path": st.path, "documents": st.documents, "malformed": st.malformed} for st in stats],
        "malformed": sum(st.malformed for st in stats),
    }
    completions = {s: sum(m.get("completions", 0) for m in shards[s]) for s in SPLITS}
    if any(completions.values()):  # (absent otherwise: an index as before prompt/completion rows existed)
        index["completions"] = completions
    if fim is not None:
        index["fim"] = {"rate": fim[0], "spm_rate": fim[1], "seed": fim[2], "unit": (fim[3:] or ("char",))[0],
                        "static": True,
                        "prefix_id": tok.prefix_id, "suffix_id": tok.suffix_id, "middle_id": tok.middle_id,
                        "eot_id": tok.eot_id}
    return index


def fim_settings(index: dict) -> dict:
    """The fill-in-the-middle settings a data index records; ``{"rate": 0.0}`` when off."""
    return index.get("fim") or {"rate": 0.0}


def _log_summary(log, out: Path, index: dict, reused: int, stats: Sequence[InputStats]) -> None:
    log(f"prepared {out}: train {index['tokens']['train']:,} tokens / {index['documents']['train']:,} docs, "
        f"val {index['tokens']['val']:,} tokens / {index['documents']['val']:,} docs, {index['dtype']}"
        + (f" ({reused} complete shard(s) reused)" if reused else ""))
    if index.get("completions"):
        log(f"completion-only loss on {sum(index['completions'].values()):,} prompt/completion document(s)")
    fim = fim_settings(index)
    if fim["rate"]:
        log(f"fill-in-the-middle: rate {fim['rate']}, SPM share {fim['spm_rate']}, cut at {fim.get('unit', 'char')} "
            f"boundaries (static, seed {fim['seed']})")
    for st in stats:
        if st.malformed:
            log(f"warning: {st.path}: {st.malformed} malformed line(s) skipped, e.g. {st.first_malformed[0]}")


# ==========================================================================================
# Reading: memory-mapped shards and packed sequences
# ==========================================================================================

def read_index(data_dir: str | os.PathLike) -> dict:
    data_dir = Path(data_dir)
    file = data_dir / INDEX
    if not file.is_file():
        raise FileNotFoundError(
            f"{data_dir}: no {INDEX} (not a prepared data directory; run `llama2 prepare --tokenizer T "
            f"--input FILES --out {data_dir}`)")
    try:
        index = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if index.get("format") != FORMAT:
        raise ValueError(f"{file}: not a {FORMAT} index")
    return index


class TokenStream:
    """One split of a data directory: its shards memory-mapped and read as one token array."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
        self.dir = Path(data_dir)
        self.index = read_index(self.dir)
        if split not in self.index["splits"]:
            raise ValueError(f"{self.dir}: no split {split!r}")
        dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.arrays, self.masks = [], []
        for shard in self.index["splits"][split]:
            path = self.dir / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise FileNotFoundError(f"{path}: shard missing or incomplete; re-run `llama2 prepare`")
            mask = path.parent / Path(shard["mask"]).name if "mask" in shard else None
            if mask is not None and (not mask.is_file() or mask.stat().st_size != shard["tokens"]):
                raise FileNotFoundError(f"{mask}: loss mask missing or incomplete; re-run `llama2 prepare`")
            if shard["tokens"]:
                self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))
                self.masks.append(np.memmap(mask, dtype=np.uint8, mode="r") if mask is not None else None)
        self.offsets = np.cumsum([0] + [a.size for a in self.arrays])
        self.masked = any(m is not None for m in self.masks)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int64, across shard boundaries."""
        parts = [a[lo:hi] for a, _, lo, hi in self._pieces(start, stop)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def read_mask(self, start: int, stop: int) -> np.ndarray:
        """Each token of [start, stop): 0 a prompt's (no target), 1 a plain text's, 2 a completion's."""
        parts = [m[lo:hi] if m is not None else np.ones(hi - lo, np.uint8) for _, m, lo, hi in self._pieces(start, stop)]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint8)

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[np.ndarray, np.ndarray | None, int, int]]:
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            base = int(self.offsets[i])
            end = min(stop, int(self.offsets[i + 1]))
            yield self.arrays[i], self.masks[i], start - base, end - base
            start, i = end, i + 1


class PackedSequences:
    """Windows of ``seq_len + 1`` tokens: window i = tokens[i*seq_len : (i+1)*seq_len + 1].
    ``completion_weight``: with prompt/completion documents, the loss weight of a completion's
    token against a plain text's (batches then carry ``"weights"``)."""

    def __init__(self, stream: TokenStream, seq_len: int, completion_weight: float = 1.0):
        if not completion_weight > 0:
            raise ValueError(f"completion_weight must be > 0, got {completion_weight}")
        self.stream, self.seq_len, self.completion_weight = stream, seq_len, completion_weight

    def __len__(self) -> int:
        return max(0, (len(self.stream) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(i) * self.seq_len
        return self.stream.read(start, start + self.seq_len + 1)

    def batch(self, indices) -> dict:
        import torch

        rows = torch.from_numpy(np.stack([self[i] for i in indices]))
        batch = {"tokens": rows[:, :-1], "labels": rows[:, 1:]}
        if self.stream.masked:  # a prompt's tokens are no targets (completion-only loss)
            kind = torch.from_numpy(np.stack([self.stream.read_mask(int(i) * self.seq_len + 1,
                                                                    (int(i) + 1) * self.seq_len + 1)
                                              for i in indices]))
            batch["labels"] = batch["labels"].masked_fill(kind == 0, IGNORE_INDEX)
            if self.completion_weight != 1.0:
                batch["weights"] = torch.where(kind == COMPLETION, self.completion_weight, 1.0)
        return batch


class PackedLoader:
    """Endless shuffled micro-batches for one data-parallel rank, resumable.

    Each optimizer step consumes ``batch_size * grad_accum * world_size`` windows of the epoch's
    permutation; micro-batch ``m`` of rank ``r`` takes the ``(m * world_size + r)``-th slice of
    ``batch_size`` of them. So the global batch of a step is the same set of windows whatever
    the number of ranks, no window repeats within an epoch, and the leftover windows that do
    not fill a step are skipped until the next epoch's permutation.
    """

    def __init__(self, sequences: PackedSequences, batch_size: int, *, grad_accum: int = 1, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.seqs, self.batch_size, self.grad_accum = sequences, batch_size, grad_accum
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_batch = batch_size * grad_accum * world_size
        self.n = len(sequences)
        if self.n < self.global_batch:
            raise ValueError(
                f"{getattr(sequences, 'name', None) or sequences.stream.dir}: {self.n} sequences of {sequences.seq_len} tokens, fewer than one global "
                f"batch of {self.global_batch}; use more data or a smaller batch_size/seq_len")
        self.epoch, self.position, self.micro = 0, 0, 0
        self._perm: np.ndarray | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return self._perm

    def next_indices(self) -> np.ndarray:
        if self.micro == 0 and self.position + self.global_batch > self.n:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        start = self.position + (self.micro * self.world_size + self.rank) * self.batch_size
        idx = self._permutation()[start:start + self.batch_size]
        self.micro += 1
        if self.micro == self.grad_accum:
            self.micro, self.position = 0, self.position + self.global_batch
        return idx

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict:
        return self.seqs.batch(self.next_indices())

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "micro": self.micro,
                "n_sequences": self.n, "seq_len": self.seqs.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if (state["n_sequences"], state["seq_len"]) != (self.n, self.seqs.seq_len):
            raise ValueError(
                f"checkpoint data position is for {state['n_sequences']} sequences of {state['seq_len']} tokens, "
                f"this data has {self.n} of {self.seqs.seq_len}: the data or seq_len changed")
        self.seed, self.epoch, self.position, self.micro = state["seed"], state["epoch"], state["position"], \
            state["micro"]
        self._perm = None


class EvalBatches:
    """The first ``max_batches`` validation micro-batches in order, dealt round-robin to the
    ranks (global batch k goes to rank k % world_size), so the set evaluated does not depend
    on the number of ranks; each ``iter()`` starts over."""

    def __init__(self, sequences: PackedSequences, batch_size: int, rank: int = 0, world_size: int = 1,
                 max_batches: int | None = None):
        self.seqs, self.batch_size, self.rank, self.world_size = sequences, batch_size, rank, world_size
        total = len(sequences) // batch_size
        self.total = total if max_batches is None else min(total, max_batches)

    def __len__(self) -> int:
        """Micro-batches this rank evaluates."""
        return len(range(self.rank, self.total, self.world_size))

    def __iter__(self) -> Iterator[dict]:
        for k in range(self.rank, self.total, self.world_size):
            yield self.seqs.batch(range(k * self.batch_size, (k + 1) * self.batch_size))


# ==========================================================================================
# CLI: llama2 prepare
# ==========================================================================================

@dataclass
class PrepareConfig:
    """The flags of ``llama2 prepare`` and the ``data`` stage of a ``llama2 run`` recipe."""
    val_fraction: float = setting(0.01, "share of documents held out for validation")
    workers: int | None = setting(None, "tokenizer processes (default: CPU count, at most 8)")
    shard_chars: int = setting(8_000_000, "characters of text per shard (~2M tokens)")
    knowledge_repeats: int = setting(0, "also add the bundled assistant world's fact sheet, this many times (the "
                                        "base model's 'knowledge', what `llama2 run` does); 0: the inputs alone")
    world_seed: int = setting(0, "seed of the bundled assistant and code worlds")
    code_corpus: bool = setting(False, "also add the bundled code corpus (Python's standard library, "
                                       "llama2/resources/code) for Code Llama style training")
    code_world_documents: int = setting(0, "also add this many train-split functions of the bundled code world "
                                           "(llama2.data.code_world); 0: none")
    code_world_tests: bool = setting(True, "end each code world document with its test (asserts); off, a document "
                                           "ends with the function, as an infilling task's suffix does")
    fim_rate: float = setting(0.0, "share of documents turned into fill-in-the-middle examples (Code Llama §2.3 "
                                   "uses 0.9; needs a tokenizer with infilling pieces); 0: off")
    fim_spm_rate: float = setting(0.5, "share of the fill-in-the-middle examples in suffix-prefix-middle order "
                                       "(Code Llama §2.3: 0.5)")
    fim_seed: int = setting(0, "seed of the fill-in-the-middle draws (which documents, where they are cut)")
    fim_unit: str = setting("char", "where the fill-in-the-middle cuts fall: char (anywhere, Code Llama §2.3) or "
                                    "line (at line starts: every middle is whole lines)", choices=("char", "line"))
    progress: bool = setting(True, "show a progress bar")


def prepare_from_config(cfg: PrepareConfig, inputs: Sequence[str | os.PathLike], tokenizer: str | os.PathLike,
                   out: str | os.PathLike, log=None) -> dict:
    """``prepare`` as ``cfg`` says: the world's fact sheet written to ``out/knowledge.txt`` and
    the code world's functions to ``out/code-world.jsonl`` first, the bundled code corpus added."""
    inputs = list(inputs)
    if cfg.code_world_documents < 0:
        raise ValueError(f"code_world_documents must be non-negative, got {cfg.code_world_documents}")
    if cfg.code_corpus:
        inputs.extend(code_corpus_files())
    if cfg.code_world_documents:
        Path(out).mkdir(parents=True, exist_ok=True)
        code_world = Path(out) / "code-world.jsonl"
        docs = code_documents(cfg.world_seed, "train", cfg.code_world_documents, tests=cfg.code_world_tests)
        code_world.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        inputs.append(code_world)
    if cfg.knowledge_repeats:
        Path(out).mkdir(parents=True, exist_ok=True)
        knowledge = Path(out) / "knowledge.txt"
        # Repeated so the facts weigh something next to the novels.
        text = World(cfg.world_seed).knowledge_text()
        knowledge.write_text("\n\n".join([text] * cfg.knowledge_repeats), encoding="utf-8")
        inputs.append(knowledge)
    return prepare(inputs, tokenizer, out, val_fraction=cfg.val_fraction, workers=cfg.workers,
                   shard_chars=cfg.shard_chars, progress=cfg.progress, log=log, fim_rate=cfg.fim_rate,
                   fim_spm_rate=cfg.fim_spm_rate, fim_seed=cfg.fim_seed, fim_unit=cfg.fim_unit)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, metavar="T",
                        help="tokenizer.model (or a directory holding one)")
    parser.add_argument("--input", required=True, nargs="+", metavar="FILE",
                        help="text (.txt, .gz, .xz) or JSONL files: {\"text\": ...} lines, or {\"prompt\": ..., "
                             "\"completion\": ...} lines trained on the completion alone")
    parser.add_argument("--out", required=True, metavar="DIR", help="output data directory")
    add_config_args(parser, PrepareConfig, config_flag=False)


def main(args: argparse.Namespace) -> int:
    prepare_from_config(load_config(PrepareConfig, args), args.input, args.tokenizer, args.out)
    return 0
