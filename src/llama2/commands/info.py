"""``llama2 info PRESET|DIR``: exact parameter count, weight and KV-cache memory, the config.

    llama2 info 7b
    llama2 info 70b --context 4096 --batch 8 --dtype bf16
    llama2 info llama-2-13b/ --json

The KV cache holds K and V for every layer: 2 * n_layers * context * n_kv_heads * head_dim
* batch * bytes per element; grouped-query attention (70B, Code Llama 34B) shrinks it by
n_heads / n_kv_heads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llama2.checkpoint import detect_format, load_state, meta
from llama2.model import PRESETS, ModelConfig

BYTES = {"f32": 4, "f16": 2, "bf16": 2, "fp8": 1, "int8": 1}
_FROM_TORCH = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="PRESET|DIR",
                   help=f"a preset ({', '.join(PRESETS)}) or a model directory (ours/HF or Meta's)")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="tokens per sequence held in the KV cache (default: the model's max_seq_len)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="sequences decoded at once (default 1)")
    p.add_argument("--dtype", choices=tuple(BYTES), default=None,
                   help="weight dtype (default: a directory's stored dtype; bf16 for presets)")
    p.add_argument("--kv-dtype", choices=tuple(BYTES), default=None,
                   help="KV-cache dtype (default: --dtype)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def param_breakdown(cfg) -> dict[str, int]:
    """Parameters by component; sums to ``cfg.num_params()``."""
    d, hd, L = cfg.dim, cfg.head_dim, cfg.n_layers
    q = cfg.n_heads * hd
    kv = cfg.n_kv_heads * hd
    return {
        "embeddings": cfg.vocab_size * d,
        "attention": L * (d * q + 2 * d * kv + q * d),
        "feed_forward": L * 3 * d * cfg.hidden_dim,
        "norms": (2 * L + 1) * d,
        "output": cfg.vocab_size * d,
    }


def kv_cache_bytes(cfg, context: int, batch: int = 1, bytes_per_element: float = 2) -> int:
    return int(2 * cfg.n_layers * context * cfg.n_kv_heads * cfg.head_dim * batch * bytes_per_element)


def _resolve(model: str):
    """(config, description, stored dtype name or None) for a preset name or a directory."""
    path = Path(model)
    if model.lower() in PRESETS and not path.exists():
        return ModelConfig.from_preset(model), f"preset {model.lower()}", None
    if not path.exists():
        raise ValueError(f"{model}: neither a preset ({', '.join(PRESETS)}) nor an existing model directory")
    fmt = detect_format(path)
    cfg, raw, _ = load_state(path)  # the tensor iterator is lazy: nothing is read
    stored = None
    if fmt == "hf":
        stored = _FROM_TORCH.get(str(raw.get("torch_dtype") or raw.get("dtype") or ""))
    else:
        emb = meta._load_shard(meta.shard_files(path)[0]).get("tok_embeddings.weight")  # memory-mapped
        if emb is not None:
            stored = _FROM_TORCH.get(str(emb.dtype).removeprefix("torch."))
    return cfg, f"{path} ({'Meta' if fmt == 'meta' else 'Hugging Face'} format)", stored


def gather(model: str, context: int | None = None, batch: int = 1, dtype: str | None = None,
           kv_dtype: str | None = None) -> dict:
    cfg, source, stored = _resolve(model)
    if context is not None and context <= 0:
        raise ValueError(f"--context must be positive, got {context}")
    if batch <= 0:
        raise ValueError(f"--batch must be positive, got {batch}")
    dtype = dtype or stored or "bf16"
    kv_dtype = kv_dtype or dtype
    context = context or cfg.max_seq_len
    params = cfg.num_params()
    weight_bytes = params * BYTES[dtype]
    kv = kv_cache_bytes(cfg, context, batch, BYTES[kv_dtype])
    return {
        "source": source,
        "config": {**cfg.to_dict(), "head_dim": cfg.head_dim, "hidden_dim": cfg.hidden_dim},
        "params": params,
        "params_breakdown": param_breakdown(cfg),
        "dtype": dtype,
        "weight_bytes": weight_bytes,
        "kv_cache": {"context": context, "batch": batch, "dtype": kv_dtype, "bytes": kv,
                     "bytes_per_token": kv // (context * batch)},
        "total_bytes": weight_bytes + kv,
    }


def _size(n: float) -> str:
    return f"{n / 1024**3:,.2f} GiB ({n / 1e9:,.2f} GB)" if n >= 1024**3 else f"{n / 1024**2:,.1f} MiB"


def render(info: dict) -> str:
    c = info["config"]
    kv = info["kv_cache"]
    ffn = f"{c['hidden_dim']}" + (f" (multiple_of {c['multiple_of']}, x{c['ffn_dim_multiplier']})"
                                  if c["ffn_dim_multiplier"] else f" (multiple_of {c['multiple_of']})")
    attn = "MHA" if c["n_kv_heads"] == c["n_heads"] else f"GQA, {c['n_heads'] // c['n_kv_heads']} q heads per kv head"
    rows = [
        ("model", info["source"]),
        ("dim", f"{c['dim']}"),
        ("layers", f"{c['n_layers']}"),
        ("heads", f"{c['n_heads']} query, {c['n_kv_heads']} key/value ({attn}), head_dim {c['head_dim']}"),
        ("ffn hidden", ffn),
        ("vocab", f"{c['vocab_size']}"),
        ("rope theta", f"{c['rope_theta']:g}"),
        ("norm eps", f"{c['norm_eps']:g}"),
        ("max context", f"{c['max_seq_len']}"),
        ("parameters", f"{info['params']:,} ({info['params'] / 1e9:.2f}B)"),
    ]
    rows += [(f"  {k.replace('_', '-')}", f"{v:,}") for k, v in info["params_breakdown"].items()]
    rows += [
        (f"weights ({info['dtype']})", _size(info["weight_bytes"])),
        (f"KV cache ({kv['dtype']})", f"{_size(kv['bytes'])} for {kv['context']:,} tokens x batch {kv['batch']} "
                                      f"({kv['bytes_per_token'] / 1024:,.0f} KiB/token)"),
        ("weights + KV cache", _size(info["total_bytes"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(args: argparse.Namespace) -> int:
    info = gather(args.model, args.context, args.batch, args.dtype, args.kv_dtype)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0
