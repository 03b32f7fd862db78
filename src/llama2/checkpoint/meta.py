"""Meta's release format: ``params.json`` + ``consolidated.NN.pth`` (one file per model-parallel rank).

Shards are merged by how Meta's model-parallel layers split each weight (fairscale's column/row-parallel linears), and the
rows of wq/wk are permuted between Meta's adjacent-pair RoPE and our rotate-half layout.
Everything is read memory-mapped and written one tensor or one shard at a time.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from llama2.model import ModelConfig

from .errors import CheckpointError

# Weights whose output features are split across ranks (ColumnParallelLinear): concat on dim 0.
_DIM0 = re.compile(r"(attention\.w[qkv]|feed_forward\.w[13])\.weight$|^output\.weight$")
# Weights split on the input features (RowParallelLinear) and the parallel embedding: dim 1.
_DIM1 = re.compile(r"(attention\.wo|feed_forward\.w2)\.weight$|^tok_embeddings\.weight$")


def shard_dim(name: str) -> int | None:
    """Dimension along which Meta splits ``name`` across ranks; None when it is replicated."""
    if _DIM0.search(name):
        return 0
    if _DIM1.search(name):
        return 1
    return None


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta row 2i+c of each head becomes row c*head_dim/2 + i (adjacent pairs -> rotate half)."""
    out_features, dim = w.shape
    head_dim = out_features // n_heads
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(out_features, dim)


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_features, dim = w.shape
    head_dim = out_features // n_heads
    return w.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(out_features, dim)


_LAYER_ORDER = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm"]


def meta_order(name: str) -> tuple:
    """Sort key giving the tensor order of Meta's own files (its modules' registration order)."""
    m = re.match(r"^layers\.(\d+)\.(.+)\.weight$", name)
    if m and m.group(2) in _LAYER_ORDER:
        return (1, int(m.group(1)), _LAYER_ORDER.index(m.group(2)), "")
    top = {"tok_embeddings.weight": 0, "norm.weight": 2, "output.weight": 3}
    return (top.get(name, 4), 0, 0, name)


def is_meta_dir(path: Path) -> bool:
    return (path / "params.json").is_file()


def shard_files(path: Path) -> list[Path]:
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{path}: no consolidated.NN.pth files next to params.json")
    return files


def find_tokenizer(path: Path) -> Path | None:
    """Meta's downloads keep tokenizer.model beside the weights or one folder up."""
    for candidate in (path / "tokenizer.model", path.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def read_params(path: Path) -> ModelConfig:
    file = path / "params.json"
    try:
        params = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(params, dict):
        raise CheckpointError(f"{file}: expected a JSON object of model hyperparameters")
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
             "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len", "max_batch_size"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise CheckpointError(f"{file}: unknown field(s) {', '.join(unknown)}")
    params.pop("max_batch_size", None)
    if params.get("vocab_size", -1) == -1:
        # -1 means "as many as the tokenizer has"; the embedding's shape says the same.
        first = shard_files(path)[0]
        emb = _load_shard(first).get("tok_embeddings.weight")
        if emb is None or emb.dim() != 2:
            raise CheckpointError(f"{first}: no 2-D tok_embeddings.weight to take vocab_size -1 from")
        params["vocab_size"] = emb.shape[0]
    try:
        return ModelConfig(**params)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def _load_shard(file: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object: never load it any other way
        raise CheckpointError(f"{file}: refused: it holds Python objects, not only tensors; nothing in it "
                              f"was loaded") from None
    except Exception as e:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{file}: cannot read checkpoint ({str(e).splitlines()[0]})") from None


def iter_meta_tensors(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Merged tensors under our names, in our (rotate-half) layout, one at a time."""
    shards = [_load_shard(f) for f in shard_files(path)]  # memory-mapped: nothing is read yet
    for name in shards[0]:
        if name == "rope.freqs":  # a precomputed buffer in some files, not a weight
            continue
        parts = []
        for f, shard in zip(shard_files(path), shards):
            if name not in shard:
                raise CheckpointError(f"{f}: missing tensor {name!r} present in the first shard")
            parts.append(shard[name])
        dim = shard_dim(name)
        t = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
        if name.endswith("attention.wq.weight"):
            t = meta_to_hf_rows(t, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = meta_to_hf_rows(t, cfg.n_kv_heads)
        yield name, t


def ffn_params(dim: int, hidden: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that Meta's rule turns into ``hidden``.

    A Hugging Face config stores only the width (``intermediate_size``): 70B's 28672 comes back
    as Meta's (4096, 1.3), Code Llama 34B's 22016 as (256, None). Widths no released model uses
    get multiple_of = the width itself, which the rule rounds up to exactly that width."""
    def width(multiple_of: int, multiplier: float | None) -> int:
        return ModelConfig(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=multiplier).hidden_dim

    for multiplier in (None, 1.3, 1.0):
        for multiple_of in (256, 4096, 1024, 512, 128, 64, 32, 16, 8):
            if width(multiple_of, multiplier) == hidden:
                return multiple_of, multiplier
    base = int(2 * 4 * dim / 3)
    multiplier = None if hidden >= base else (hidden + 0.5) / base  # int(multiplier * base) == hidden
    if width(hidden, multiplier) != hidden:  # never write params that would load as another shape
        raise CheckpointError(f"intermediate size {hidden} cannot be written as Meta's multiple_of/ffn_dim_multiplier")
    return hidden, multiplier


def meta_params(cfg: ModelConfig) -> dict:
    if cfg.rope_scaling is not None:  # Meta's model code has no position interpolation
        raise CheckpointError(f"rope_scaling={cfg.rope_scaling} cannot be written to Meta's params.json (it has no "
                              f"such field); export to the Hugging Face format or GGUF instead")
    multiple_of, multiplier = cfg.multiple_of, cfg.ffn_dim_multiplier
    if cfg.ffn_hidden is not None:
        multiple_of, multiplier = ffn_params(cfg.dim, cfg.ffn_hidden)
    params = {"dim": cfg.dim, "multiple_of": multiple_of, "n_heads": cfg.n_heads,
              "n_layers": cfg.n_layers, "norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size}
    if cfg.n_kv_heads != cfg.n_heads:
        params["n_kv_heads"] = cfg.n_kv_heads
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    if cfg.rope_theta != 10000.0:
        params["rope_theta"] = cfg.rope_theta
    return params


def save_meta(
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]],
    cfg: ModelConfig,
    path: Path,
    n_shards: int = 1,
    tokenizer_path: Path | None = None,
) -> None:
    """Write Meta's format. ``tensors()`` yields (our name, tensor) in our layout; it is called
    once per output shard so that only one shard is ever materialised."""
    params = meta_params(cfg)  # a config params.json cannot hold is refused before anything is written
    path.mkdir(parents=True, exist_ok=True)
    heads = {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}
    for rank in range(n_shards):
        shard: dict[str, torch.Tensor] = {}
        for name, t in tensors():
            kind = name.split(".")[-2] if name.count(".") >= 2 else ""
            if kind in heads and ".attention." in name:
                t = hf_to_meta_rows(t, heads[kind])
            dim = shard_dim(name)
            if dim is not None and n_shards > 1:
                if t.shape[dim] % n_shards:
                    raise CheckpointError(f"{name}: size {t.shape[dim]} does not split into {n_shards} shards")
                t = t.chunk(n_shards, dim=dim)[rank]
            shard[name] = t.clone()  # own storage: torch.save would otherwise write the whole base
        tmp = path / f"consolidated.{rank:02d}.pth.tmp"
        torch.save(dict(sorted(shard.items(), key=lambda kv: meta_order(kv[0]))), tmp)
        os.replace(tmp, path / f"consolidated.{rank:02d}.pth")
        del shard
    for stale in path.glob("consolidated.*.pth"):
        if int(stale.name.split(".")[1]) >= n_shards:
            stale.unlink()
    (path / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    if tokenizer_path is not None and Path(tokenizer_path).resolve() != (path / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer_path, path / "tokenizer.model")
