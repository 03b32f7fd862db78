"""Our native model directory, which is a Hugging Face ``LlamaForCausalLM`` directory.

``config.json`` + ``model.safetensors`` (or shards + ``model.safetensors.index.json``) +
``generation_config.json`` + ``tokenizer.model`` + ``tokenizer_config.json``: transformers,
vLLM and llama.cpp's converter read it as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from llama2.chat import CHAT_TEMPLATE
from llama2.model import ModelConfig

from .errors import CheckpointError

SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# sha256 of each weight file, written with them and checked before they are read: flipped bytes
# in a float tensor load without any error and only show up as garbage output. transformers
# ignores the extra file.
CHECKSUMS = "checksums.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# our parameter name -> transformers' name (one regex each, applied to the whole name)
_TO_HF = [
    (r"^tok_embeddings\.", "model.embed_tokens."),
    (r"^norm\.", "model.norm."),
    (r"^output\.", "lm_head."),
    (r"^layers\.(\d+)\.attention\.w([qkvo])\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w1\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w2\.", r"model.layers.\1.mlp.down_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w3\.", r"model.layers.\1.mlp.up_proj."),
    (r"^layers\.(\d+)\.attention_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
]
_FROM_HF = [
    (r"^model\.embed_tokens\.", "tok_embeddings."),
    (r"^model\.norm\.", "norm."),
    (r"^lm_head\.", "output."),
    (r"^model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.", r"layers.\1.attention.w\2."),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.", r"layers.\1.feed_forward.w1."),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"layers.\1.feed_forward.w2."),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"layers.\1.feed_forward.w3."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attention_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
]


def _rename(name: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name  # e.g. a reward model's "score.weight" is the same in both


def to_hf_name(name: str) -> str:
    return _rename(name, _TO_HF)


def from_hf_name(name: str) -> str:
    return _rename(name, _FROM_HF)


# -- config -----------------------------------------------------------------------------
def hf_config(cfg: ModelConfig, architecture: str = "LlamaForCausalLM", dtype=torch.float32, **extra) -> dict:
    return {
        "architectures": [architecture],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        # Position interpolation (Chen et al. 2023) as transformers' and vLLM's "linear" RoPE type.
        "rope_scaling": None if cfg.rope_scaling is None else {"rope_type": "linear", "factor": cfg.rope_scaling},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
        # multiple_of / ffn_dim_multiplier are not HF fields; intermediate_size carries the width.
        "llama2": {"multiple_of": cfg.multiple_of, "ffn_dim_multiplier": cfg.ffn_dim_multiplier},
        **extra,
    }


def rope_scaling_from_hf(cfg: dict, source: Path | str = "config.json") -> float | None:
    """The linear position-interpolation factor of a config.json, or None. transformers v4 and
    vLLM write ``rope_scaling``, v5 ``rope_parameters`` (which also holds rope_theta); the
    types Llama 2 has no counterpart for (llama3, dynamic NTK, YaRN, ...) would load silently
    and give wrong outputs, so they are refused."""
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(scaling, dict):
        raise CheckpointError(f"{source}: rope_scaling {scaling!r} is not an object")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "linear":
        raise CheckpointError(f"{source}: RoPE scaling type {kind!r} is not supported (only 'linear', "
                              f"position interpolation)")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor >= 1:
        raise CheckpointError(f"{source}: linear RoPE scaling needs a factor >= 1, got {factor!r}")
    return None if factor == 1 else float(factor)


def config_from_hf(cfg: dict, source: Path | str = "config.json") -> ModelConfig:
    try:
        if cfg.get("model_type", "llama") != "llama":
            raise CheckpointError(f"{source}: model_type {cfg['model_type']!r} is not a Llama model")
        # Features Llama 2 does not have would otherwise load silently and give wrong outputs.
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (Llama uses silu)")
        rope_scaling = rope_scaling_from_hf(cfg, source)
        if cfg.get("tie_word_embeddings"):
            raise CheckpointError(f"{source}: tie_word_embeddings is not supported (Llama 2 has an untied output)")
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        extra = cfg.get("llama2", {})
        model_cfg = ModelConfig(
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            vocab_size=cfg["vocab_size"],
            multiple_of=extra.get("multiple_of", 256),
            ffn_dim_multiplier=extra.get("ffn_dim_multiplier"),
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_seq_len=cfg.get("max_position_embeddings", 4096),
        )
        if cfg.get("head_dim") not in (None, model_cfg.head_dim):
            raise CheckpointError(f"{source}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    want = cfg.get("intermediate_size")
    if want is not None and want != model_cfg.hidden_dim:
        model_cfg.ffn_hidden = want  # a width Meta's (multiple_of, multiplier) rule did not give
    return model_cfg


def read_json_object(file: Path, what: str) -> dict:
    """A JSON object from ``file``; a missing file, bad JSON or a non-object is one line naming
    it (``what``: what the directory is not when the file is missing)."""
    try:
        obj = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found (not {what})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return obj


def read_config(path: Path) -> dict:
    return read_json_object(path / "config.json", "a model directory")


# -- weights ----------------------------------------------------------------------------
def weight_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: invalid index ({e!r})") from None
        files = [path / n for n in names]
    else:
        files = [path / SAFETENSORS]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: weight file not found")
    return files


def _open_error(file: Path, e: Exception) -> CheckpointError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CheckpointError(f"{file}: cannot read safetensors ({first})")


def read_checksums(path: Path) -> dict[str, str] | None:
    """{weight file name: sha256} from the directory's manifest; None when it has none (a
    directory written by transformers or another tool)."""
    file = path / CHECKSUMS
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError("expected {\"algorithm\": \"sha256\", \"files\": {name: hex digest}}")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: invalid checksum manifest ({e})") from None
    return files


def sha256_file(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_file(file: Path, checksums: dict[str, str] | None) -> None:
    """Raise one line naming ``file`` when it does not match the directory's manifest."""
    if checksums is None:
        return
    manifest = file.parent / CHECKSUMS
    want = checksums.get(file.name)
    if want is None:
        raise CheckpointError(f"{file}: not listed in {manifest} (rewritten by another tool? delete {CHECKSUMS} "
                              f"to accept the new weights, or pass --no-verify)")
    if sha256_file(file) != want:
        raise CheckpointError(f"{file}: does not match its sha256 in {manifest}: the file is corrupt (if another "
                              f"tool rewrote it, delete {CHECKSUMS}; --no-verify skips the check)")


def iter_hf_tensors(path: Path, verify: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, tensor) pairs, read lazily one tensor at a time. With ``verify``, each
    weight file is checked against ``checksums.json`` (if the directory has one) before any
    tensor of it is read."""
    checksums = read_checksums(path) if verify else None
    for file in weight_files(path):
        verify_file(file, checksums)
        # safetensors raises its own SafetensorError (an Exception) for truncated/corrupt files.
        try:
            handle = safe_open(str(file), framework="pt")
            f = handle.__enter__()
            names = list(f.keys())
        except Exception as e:  # noqa: BLE001
            raise _open_error(file, e) from None
        try:
            for name in names:
                try:
                    t = f.get_tensor(name)
                except Exception as e:  # noqa: BLE001
                    raise _open_error(file, e) from None
                yield name, t
        finally:
            handle.__exit__(None, None, None)


def write_safetensors(
    path: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> None:
    """Write (name, tensor) pairs as ``model.safetensors`` or as shards with an index.

    Tensors are consumed one shard at a time, so a lazy iterator never holds more than one
    shard in memory. ``checksums.json`` (each file's sha256, computed as it is written) is
    written last.
    """
    (path / CHECKSUMS).unlink(missing_ok=True)  # a stale manifest must not outlive the files it describes
    digests: dict[str, str] = {}
    shards: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0
    current: dict[str, torch.Tensor] = {}
    current_bytes = 0

    def flush() -> None:
        nonlocal current, current_bytes
        name = f"model-{len(shards) + 1:05d}.safetensors.part"
        digests[name] = _atomic_save(current, path / name)
        shards.append(name)
        for k in current:
            weight_map[k] = name
        current, current_bytes = {}, 0

    for name, t in tensors:
        size = t.numel() * t.element_size()
        if current and current_bytes + size > max_shard_bytes:
            flush()
        current[name] = t.contiguous()
        current_bytes += size
        total += size
    if not shards:  # everything fits in one file
        digest = _atomic_save(current, path / SAFETENSORS)
        (path / INDEX).unlink(missing_ok=True)
        write_json(path / CHECKSUMS, {"algorithm": "sha256", "files": {SAFETENSORS: digest}})
        return
    flush()
    n = len(shards)
    renamed = {old: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, old in enumerate(shards)}
    for old, new in renamed.items():
        os.replace(path / old, path / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    _atomic_write_text(path / INDEX, json.dumps(index, indent=2))
    (path / SAFETENSORS).unlink(missing_ok=True)
    write_json(path / CHECKSUMS, {"algorithm": "sha256",
                                  "files": {new: digests[old] for old, new in renamed.items()}})


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_safetensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str] | None = None) -> str:
    """Write a .safetensors file straight from the tensors' memory; returns its sha256, hashed
    from the bytes as they are written (reading the file back would cost another pass).

    ``safetensors.torch.save_file`` first copies every tensor into a ``bytes`` object, which
    doubles the peak memory of a shard; this writes the same format without that copy.
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    h = hashlib.sha256()
    with open(file, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            h.update(chunk)
        for t in tensors.values():
            if t.numel():
                data = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                f.write(data)
                h.update(data)
    return h.hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], file: Path) -> str:
    tmp = file.with_name(file.name + ".tmp")
    digest = save_safetensors(tensors, tmp)
    os.replace(tmp, file)
    return digest


def _atomic_write_text(file: Path, text: str) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, file)


def write_json(file: Path, obj) -> None:
    _atomic_write_text(file, json.dumps(obj, indent=2) + "\n")


def write_tokenizer_files(path: Path, tokenizer, max_len: int) -> None:
    """Copy ``tokenizer.model`` and describe it for transformers (with the chat template)."""
    src = Path(tokenizer.path)
    if src.resolve() != (path / "tokenizer.model").resolve():
        shutil.copyfile(src, path / "tokenizer.model")
    write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "add_prefix_space": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    })
    write_json(path / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
