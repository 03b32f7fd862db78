"""What a model directory holds: its format (ours/Hugging Face or Meta's) and its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

from llama2.tokenizer import Tokenizer

from . import meta
from .errors import CheckpointError


def detect_format(path: str | os.PathLike) -> str:
    """'hf' for a config.json directory, 'meta' for params.json + consolidated.NN.pth, 'peft' for
    a LoRA adapter directory (adapter_config.json)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a model is a directory (config.json or params.json inside)")
    if (path / "config.json").is_file():
        return "hf"
    if meta.is_meta_dir(path):
        return "meta"
    if (path / "adapter_config.json").is_file():
        return "peft"
    raise CheckpointError(f"{path}: neither config.json (Hugging Face), params.json (Meta) nor "
                          "adapter_config.json (a LoRA adapter) found")


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None):
    """The tokenizer that belongs to a model directory; checks it matches the model's vocabulary."""
    path = Path(path)
    file = meta.find_tokenizer(path) if path.is_dir() else path
    if file is None and path.is_dir() and (path / "adapter_config.json").is_file():
        from . import peft  # an adapter saved without a tokenizer uses its base model's

        try:
            base = peft.resolve_base(path, peft.read_adapter_config(path))
        except CheckpointError:
            base = None
        if base is not None:
            return load_tokenizer(base, vocab_size)
    if file is None:
        raise CheckpointError(f"{path}: no tokenizer.model in the model directory")
    tok = Tokenizer(file)
    if vocab_size is not None and tok.vocab_size != vocab_size:
        raise CheckpointError(
            f"{file}: tokenizer has {tok.vocab_size} pieces but the model's vocabulary is {vocab_size}"
        )
    return tok
