"""Load and save models: our Hugging Face-compatible directory, Meta's release format, GGUF."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from llama2.model import ModelConfig, Transformer

from . import hf, meta
from .errors import CheckpointError

__all__ = ["CheckpointError", "load_model", "save_model", "load_state", "load_tokenizer", "convert", "detect_format"]


def detect_format(path: str | os.PathLike) -> str:
    """'hf' for a config.json directory, 'meta' for params.json + consolidated.NN.pth."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a model is a directory (config.json or params.json inside)")
    if (path / "config.json").is_file():
        return "hf"
    if meta.is_meta_dir(path):
        return "meta"
    raise CheckpointError(f"{path}: neither config.json (Hugging Face) nor params.json (Meta) found")


def load_state(path: str | os.PathLike) -> tuple[ModelConfig, dict, Iterator[tuple[str, torch.Tensor]]]:
    """(config, raw config dict, lazy iterator of (our name, tensor)) for either format."""
    path = Path(path)
    if detect_format(path) == "hf":
        raw = hf.read_config(path)
        cfg = hf.config_from_hf(raw, path / "config.json")
        return cfg, raw, ((hf.from_hf_name(n), t) for n, t in hf.iter_hf_tensors(path))
    cfg = meta.read_params(path)
    return cfg, {"params": meta.meta_params(cfg)}, meta.iter_meta_tensors(path, cfg)


def load_into(module: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], source: Path, dtype=None) -> None:
    """Assign checkpoint tensors to a module built on the meta device, checking names and shapes."""
    expected = dict(module.state_dict())
    state = {}
    for name, t in tensors:
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} (not part of this model)")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(t.shape)}, the config implies "
                f"{tuple(expected[name].shape)}"
            )
        state[name] = t.to(dtype) if dtype is not None else t
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}")
    module.load_state_dict(state, assign=True)


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu") -> Transformer:
    """Load a Llama model from our/HF directory or Meta's format; weights keep their dtype
    unless ``dtype`` is given."""
    path = Path(path)
    cfg, _, tensors = load_state(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    load_into(model, tensors, path, dtype)
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None):
    """The tokenizer that belongs to a model directory; checks it matches the model's vocabulary."""
    from llama2.tokenizer import Tokenizer

    path = Path(path)
    file = meta.find_tokenizer(path) if path.is_dir() else path
    if file is None:
        raise CheckpointError(f"{path}: no tokenizer.model in the model directory")
    tok = Tokenizer(file)
    if vocab_size is not None and tok.vocab_size != vocab_size:
        raise CheckpointError(
            f"{file}: tokenizer has {tok.vocab_size} pieces but the model's vocabulary is {vocab_size}"
        )
    return tok


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES,
    architecture: str = "LlamaForCausalLM",
    extra_config: dict | None = None,
) -> Path:
    """Write a Hugging Face-compatible model directory. ``model`` is a Transformer or any module
    whose ``config`` is a ModelConfig and whose parameter names are ours (plus e.g. ``score``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.config
    sd = model.state_dict()
    store_dtype = dtype or next(iter(sd.values())).dtype

    def tensors():
        for name, t in sd.items():
            yield hf.to_hf_name(name), t.detach().to("cpu", store_dtype)

    if tokenizer is not None and tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(
            f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} pieces, model vocabulary is {cfg.vocab_size}"
        )
    hf.write_safetensors(path, tensors(), max_shard_bytes)
    _write_metadata(path, cfg, store_dtype, tokenizer, architecture, extra_config)
    return path


def _write_metadata(path: Path, cfg: ModelConfig, dtype, tokenizer, architecture="LlamaForCausalLM",
                    extra_config: dict | None = None) -> None:
    hf.write_json(path / "config.json", hf.hf_config(cfg, architecture, dtype, **(extra_config or {})))
    hf.write_json(path / "generation_config.json", {
        "bos_token_id": 1, "eos_token_id": 2, "do_sample": True,
        "temperature": 0.6, "top_p": 0.9, "max_length": cfg.max_seq_len,  # Meta's chat defaults
    })
    if tokenizer is not None:
        hf.write_tokenizer_files(path, tokenizer, cfg.max_seq_len)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, n_shards: int = 1,
            max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Convert between formats without materialising two copies of the weights.

    ``to='hf'``: Meta (or HF) -> our HF-compatible directory. ``to='meta'``: -> Meta's format
    with ``n_shards`` model-parallel files.
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"{dst}: output directory must differ from the input")
    cfg, _, tensors = load_state(src)
    dst.mkdir(parents=True, exist_ok=True)
    tok_file = meta.find_tokenizer(src)
    if to == "hf":
        first = next(tensors)
        hf.write_safetensors(dst, ((hf.to_hf_name(n), t) for n, t in itertools.chain([first], tensors)),
                             max_shard_bytes)
        tokenizer = load_tokenizer(tok_file, cfg.vocab_size) if tok_file is not None else None
        _write_metadata(dst, cfg, first[1].dtype, tokenizer)
    elif to == "meta":
        meta.save_meta(lambda: load_state(src)[2], cfg, dst, n_shards, tok_file)
    else:
        raise ValueError(f"unknown target format {to!r}; use 'hf' or 'meta'")
    return dst
