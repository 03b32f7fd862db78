"""LoRA adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor names are PEFT's (``base_model.model.`` + transformers' module name + ``.lora_A.weight``),
so ``PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter_dir)`` reads what
we write, and we read what PEFT writes. A reward model's adapter is PEFT's ``SEQ_CLS`` task with
``score`` in ``modules_to_save`` (its whole head is stored).

An adapter directory is a model for every ``llama2`` command: ``checkpoint.load_state`` streams
its base (``base_model_name_or_path``) with ``W + scaling * B @ A`` folded in, tensor by tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor

from llama2.model.lora import TARGETS, parse_targets

from . import hf
from .errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# What we record beyond PEFT's config (the training method, a reward model's kind) lives in the
# safetensors header's metadata, where PEFT does not look, and reads back as config["llama2"].
OURS = "llama2"


def is_adapter_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_config(rank: int, alpha: float, dropout: float, targets, base: str, task_type: str = "CAUSAL_LM",
                   use_rslora: bool = False, **ours) -> dict:
    """PEFT's LoraConfig as JSON (the keys PEFT needs to rebuild the adapter) plus our own block."""
    short = parse_targets(targets)
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
        "target_modules": [TARGETS[t][1] for t in short], "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": ["score"] if task_type == "SEQ_CLS" else None, "init_lora_weights": True,
        "inference_mode": True, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, **({OURS: ours} if ours else {}),
    }


def save_adapter(path: str | os.PathLike, tensors: dict[str, Tensor], config: dict, tokenizer=None,
                 max_len: int = 4096) -> Path:
    """Write the adapter directory: ``tensors`` by our parameter names (``layers.0.attention.wq.
    lora_A.weight``, ``score.weight``), ``config`` from :func:`adapter_config`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    named = {PREFIX + hf.to_hf_name(n): t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    config = dict(config)
    ours = config.pop(OURS, None)
    meta = {"format": "pt", **({OURS: json.dumps(ours)} if ours else {})}
    hf.save_safetensors(named, path / ADAPTER_WEIGHTS, metadata=meta)
    hf.write_json(path / ADAPTER_CONFIG, config)
    if tokenizer is not None:
        hf.write_tokenizer_files(path, tokenizer, max_len)
    return path


def read_adapter_config(path: Path) -> dict:
    file = Path(path) / ADAPTER_CONFIG
    cfg = hf.read_json_object(file, "an adapter directory")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: peft_type {cfg.get('peft_type')!r} is not supported (LoRA only)")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(key) == bad:
            raise CheckpointError(f"{file}: {key}={bad} is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise CheckpointError(f"{file}: per-layer {key} is not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise CheckpointError(f"{file}: adapters with trained biases are not supported (bias={cfg.get('bias')!r})")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise CheckpointError(f"{file}: {key} must be a positive number, got {cfg.get(key)!r}")
    return cfg


def scaling(cfg: dict) -> float:
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, tuple[Tensor, Tensor, float]], dict[str, Tensor]]:
    """(adapter_config, {our linear name: (A, B, scaling)}, other tensors by our name, e.g.
    ``score.weight``). Names PEFT writes with or without an adapter name (``.default``) both read."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    cfg = read_adapter_config(path)
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        bin_file = path / "adapter_model.bin"
        hint = " (a pickled adapter_model.bin is not read: it could run code; re-save with safetensors)" \
            if bin_file.is_file() else ""
        raise CheckpointError(f"{file}: not found{hint}")
    try:
        raw = load_file(file)
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
        if OURS in header:
            cfg[OURS] = json.loads(header[OURS])
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid {OURS} metadata ({e})") from None
    pairs: dict[str, dict[str, Tensor]] = {}
    others: dict[str, Tensor] = {}
    s = scaling(cfg)
    for key, t in raw.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".default.", ".").replace(".modules_to_save.", ".")
        for part in ("lora_A", "lora_B"):
            tail = f".{part}.weight"
            if name.endswith(tail):
                linear = hf.from_hf_name(name[: -len(tail)] + ".weight")[: -len(".weight")]
                pairs.setdefault(linear, {})[part] = t
                break
        else:
            if "lora_" in name:
                raise CheckpointError(f"{file}: tensor {key!r} is not a LoRA A/B matrix this loader knows")
            others[hf.from_hf_name(name)] = t
    layers = {}
    for linear, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{file}: {linear} has {sorted(ab)} but needs both lora_A and lora_B")
        A, B = ab["lora_A"], ab["lora_B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise CheckpointError(f"{file}: {linear}: lora_B {tuple(B.shape)} @ lora_A {tuple(A.shape)} do not "
                                  "multiply")
        layers[linear] = (A, B, s)
    if not layers:
        raise CheckpointError(f"{file}: no LoRA tensors found")
    return cfg, layers, others


def resolve_base(path: Path, cfg: dict, base: str | os.PathLike | None = None) -> Path:
    """The base model directory: ``base`` if given, else ``base_model_name_or_path`` as written
    (absolute, or relative to the working directory), else relative to the adapter directory."""
    if base is not None:
        return Path(base)
    name = cfg.get("base_model_name_or_path")
    if not name:
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path; pass the base model "
                              "(e.g. --model BASE --adapter DIR)")
    for candidate in (Path(name), path / name):
        if candidate.exists():
            return candidate
    raise CheckpointError(f"{path / ADAPTER_CONFIG}: base model {name!r} not found (no model downloads here); "
                          "pass the base model directory (e.g. --model BASE --adapter DIR)")


def merge_stream(tensors: Iterator[tuple[str, Tensor]], layers: dict[str, tuple[Tensor, Tensor, float]],
                 others: dict[str, Tensor], source: Path, scalar: bool) -> Iterator[tuple[str, Tensor]]:
    """The base's tensors with each adapter folded in (``W + scaling * B @ A`` in float32, stored
    in ``W``'s dtype); a reward adapter's ``score`` replaces the language-model head."""
    seen = set()
    for name, t in tensors:
        linear = name[: -len(".weight")] if name.endswith(".weight") else None
        if linear in layers:
            A, B, s = layers[linear]
            if (B.shape[0], A.shape[1]) != tuple(t.shape):
                raise CheckpointError(f"{source / ADAPTER_WEIGHTS}: adapter for {linear} is "
                                      f"{(B.shape[0], A.shape[1])} but the base weight is {tuple(t.shape)}")
            t = (t.float() + (B.float() @ A.float()) * s).to(t.dtype)
            seen.add(linear)
        if scalar and name == "output.weight":
            continue  # a reward model has a score head instead
        if name in others:
            t = others[name].to(t.dtype)
            seen.add(name)
        yield name, t
    for name, t in others.items():  # e.g. score.weight, absent from a chat model's base
        if name not in seen:
            yield name, t
    missing = sorted(set(layers) - seen)
    if missing:
        raise CheckpointError(f"{source / ADAPTER_WEIGHTS}: adapter targets {missing[0]}, which the base model has not")
