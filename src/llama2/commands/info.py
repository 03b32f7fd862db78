"""``llama2 info PRESET|DIR``: exact parameter count, weight and KV-cache memory, the config.

    llama2 info 7b
    llama2 info 70b --context 4096 --batch 8 --dtype bf16
    llama2 info llama-2-13b/ --json

The KV cache holds K and V for every layer: 2 * n_layers * context * n_kv_heads * head_dim
* batch * bytes per element; grouped-query attention (70B, Code Llama 34B) shrinks it by
n_heads / n_kv_heads. The prefill peak adds what reading a whole ``--context``-token prompt at
once costs on top (memory.prefill_bytes): the activations of one block, and for a left-padded
batch an attention mask that grows with the square of the context (one prompt alone runs SDPA's
causal kernels without one), which is what long contexts (Code Llama §2.4: 16,384 tokens) run
into first:

    llama2 info codellama-7b --context 16384

With ``--train full|lora|qlora`` it also plans the training memory of one GPU (commands/memory.py
says where each number comes from):

    llama2 info 7b --train qlora --stage sft --micro-batch-size 1 --seq-len 2048 --gpu-memory 24GB
    llama2 info 70b --train full --stage ppo --ppo-batch 512 --max-new-tokens 128 --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llama2.checkpoint import detect_format, load_state, meta, quantized_spec
from llama2.commands import memory
from llama2.model import PRESETS, ModelConfig
from llama2.model.quant import parse_quantize

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
    p.add_argument("--quantize", default=None, metavar="int8|w8a8|int4[:GROUP]",
                   help="weights as `llama2 generate --quantize` holds them: every linear layer weight-only "
                        "int8 (+ a float32 scale per output row) or int4 (+ a bf16 scale and zero per GROUP "
                        "inputs); embeddings and norms stay in --dtype")
    p.add_argument("--kv-dtype", choices=tuple(BYTES), default=None,
                   help="KV-cache dtype (default: --dtype)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    t = p.add_argument_group(
        "training memory (--train)",
        "One GPU, as our trainer runs: weights in the checkpoint's dtype (--dtype; no float32 master "
        "copy), bf16 autocast activations, AdamW moments in the parameters' dtype (full bf16: 8 bytes "
        "per parameter, f32: 16), float32 LoRA adapters (16 bytes per adapter parameter), QLoRA's "
        "block weights in torchao NF4 (~0.516 bytes per weight). No sharding, no offload; the CUDA "
        "context and fragmentation are not counted.")
    t.add_argument("--train", choices=memory.METHODS, default=None,
                   help="plan the memory of training with this method")
    t.add_argument("--stage", choices=memory.STAGES, default="sft",
                   help="sft: language model; reward: scalar head, chosen + rejected in one pass (2 x the "
                        "micro-batch); ppo: policy, reference, value and two reward models (default sft)")
    t.add_argument("--micro-batch-size", type=int, default=1, metavar="B",
                   help="sequences (reward: pairs; ppo: rollouts, as llama2 ppo --micro-batch-size) per "
                        "forward pass (default 1)")
    t.add_argument("--seq-len", type=int, default=None, metavar="S",
                   help="tokens per sequence (ppo: the prompt; rollouts add --max-new-tokens) "
                        "(default: the model's max_seq_len)")
    t.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="say whether it fits a GPU of this size, e.g. 24GB, 80GB, 141GB (GB = GiB, as "
                        "GPU makers count)")
    t.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: bf16 autocast activations (default); cpu: activations in the weights' dtype")
    t.add_argument("--lora-rank", type=int, default=memory.LORA_RANK, metavar="R",
                   help=f"adapter rank (default {memory.LORA_RANK}, as --lora.rank)")
    t.add_argument("--lora-targets", default=memory.LORA_TARGETS, metavar="LIST",
                   help=f"adapted linears: q,k,v,o,gate,up,down or all (default {memory.LORA_TARGETS})")
    t.add_argument("--lora-dropout", type=float, default=memory.LORA_DROPOUT, metavar="P",
                   help=f"adapter dropout; > 0 keeps each adapter's dropped input and mask "
                        f"(default {memory.LORA_DROPOUT})")
    t.add_argument("--ppo-batch", type=int, default=memory.PPO_BATCH, metavar="N",
                   help=f"ppo: prompts per iteration (default {memory.PPO_BATCH}, §3.2.3)")
    t.add_argument("--rollout-batch", type=int, default=None, metavar="N",
                   help="ppo: prompts answered together, the KV cache's rows (default: --ppo-batch; as "
                        "llama2 ppo --rollout-batch-size)")
    t.add_argument("--max-new-tokens", type=int, default=memory.PPO_MAX_NEW_TOKENS, metavar="N",
                   help=f"ppo: longest answer (default {memory.PPO_MAX_NEW_TOKENS}, as llama2 ppo)")
    t.add_argument("--quantize-rewards", action="store_true",
                   help="ppo: the two reward models in NF4, as llama2 ppo --quantize-rewards")


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
    """(config, description, stored dtype name or None, quantization spec or None) for a preset
    name or a directory."""
    path = Path(model)
    if model.lower() in PRESETS and not path.exists():
        return ModelConfig.from_preset(model), f"preset {model.lower()}", None, None
    if not path.exists():
        raise ValueError(f"{model}: neither a preset ({', '.join(PRESETS)}) nor an existing model directory")
    fmt = detect_format(path)
    cfg, raw, _ = load_state(path, allow_quantized=True)  # the tensor iterator is lazy: nothing is read
    stored = None
    if fmt in ("hf", "peft"):  # an adapter directory: its base's config, with the adapter merged
        stored = _FROM_TORCH.get(str(raw.get("torch_dtype") or raw.get("dtype") or ""))
    else:
        emb = meta._load_shard(meta.shard_files(path)[0]).get("tok_embeddings.weight")  # memory-mapped
        if emb is not None:
            stored = _FROM_TORCH.get(str(emb.dtype).removeprefix("torch."))
    kind = {"meta": "Meta format", "hf": "Hugging Face format", "peft": "LoRA adapter over its base"}[fmt]
    spec = quantized_spec(path)
    if spec is not None:
        kind = f"quantized to {spec} by llama2 quantize"
    return cfg, f"{path} ({kind})", stored, spec


def quantized_weight_bytes(cfg, spec: str, dtype: str = "bf16") -> int:
    """Weight memory with every linear layer (attention, feed-forward, output head) weight-only
    quantized as model/quant.py stores it: int8 = 1 byte per weight + a float32 scale per output
    row (and its bfloat16 copy for the CPU kernel); int4 = half a byte per weight + a bf16 (scale, zero) pair per GROUP inputs of each row.
    Embeddings and norms stay in ``dtype``."""
    kind, group = parse_quantize(spec)
    parts = param_breakdown(cfg)
    linear = parts["attention"] + parts["feed_forward"] + parts["output"]
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    rows = cfg.n_layers * (q + 2 * kv + cfg.dim + 2 * cfg.hidden_dim + cfg.dim) + cfg.vocab_size
    rest = (parts["embeddings"] + parts["norms"]) * BYTES[dtype]
    if kind == "int8":
        return linear + (4 + 2) * rows + rest
    if kind == "w8a8":  # the int8 weights and fbgemm's packed copy of them, built on first use
        return 2 * linear + (4 + 2) * rows + rest
    return linear // 2 + (linear // group) * 2 * 2 + rest


def gather(model: str, context: int | None = None, batch: int = 1, dtype: str | None = None,
           kv_dtype: str | None = None, quantize: str | None = None) -> dict:
    if quantize:
        parse_quantize(quantize)  # a bad spec is one line before anything is read
    cfg, source, stored, spec = _resolve(model)
    if spec is not None:  # a directory written by llama2 quantize
        if quantize and parse_quantize(quantize) != parse_quantize(spec):
            raise ValueError(f"{model}: already quantized to {spec}, not {quantize}")
        quantize = spec
    if context is not None and context <= 0:
        raise ValueError(f"--context must be positive, got {context}")
    if batch <= 0:
        raise ValueError(f"--batch must be positive, got {batch}")
    dtype = dtype or stored or "bf16"
    kv_dtype = kv_dtype or dtype
    context = context or cfg.max_seq_len
    params = cfg.num_params()
    weight_bytes = quantized_weight_bytes(cfg, quantize, dtype) if quantize else params * BYTES[dtype]
    kv = kv_cache_bytes(cfg, context, batch, BYTES[kv_dtype])
    # Activations are in the weights' dtype (bf16 beside int8/int4/fp8 weights).
    prefill = memory.prefill_bytes(cfg, context, batch, memory.DTYPE_BYTES.get(dtype, 2))
    return {
        "source": source,
        "config": {**cfg.to_dict(), "head_dim": cfg.head_dim, "hidden_dim": cfg.hidden_dim},
        "params": params,
        "params_breakdown": param_breakdown(cfg),
        "dtype": dtype,
        "quantize": quantize,
        "weight_bytes": weight_bytes,
        "kv_cache": {"context": context, "batch": batch, "dtype": kv_dtype, "bytes": kv,
                     "bytes_per_sequence": kv // batch, "bytes_per_token": kv // (context * batch)},
        "total_bytes": weight_bytes + kv,
        "prefill": {"activation_bytes": prefill, "peak_bytes": weight_bytes + kv + prefill},
    }


def training(info: dict, method: str, stage: str = "sft", micro_batch: int = 1, seq_len: int | None = None,
             gpu_memory: str | None = None, device: str = "cuda", lora_rank: int = memory.LORA_RANK,
             lora_targets: str = memory.LORA_TARGETS, lora_dropout: float = memory.LORA_DROPOUT,
             ppo_batch: int = memory.PPO_BATCH, max_new_tokens: int = memory.PPO_MAX_NEW_TOKENS,
             quantize_rewards: bool = False, rollout_batch: int | None = None) -> dict:
    """``info["training"]``: the memory plan (memory.plan) of ``gather``'s model, with a verdict
    for ``gpu_memory``."""
    cfg = ModelConfig.from_dict({k: v for k, v in info["config"].items() if k not in ("head_dim", "hidden_dim")})
    dtype = info["dtype"]
    if dtype not in memory.DTYPE_BYTES:
        raise ValueError(f"--train needs the weights in f32, f16 or bf16, not {dtype}")
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    p = memory.plan(cfg, method, stage, micro_batch, seq_len, dtype, device, lora_rank, lora_targets, lora_dropout,
                    ppo_batch, max_new_tokens, quantize_rewards, rollout_batch)
    if gpu_memory is not None:
        capacity = memory.parse_size(gpu_memory)
        p["gpu"] = {"memory": capacity, "name": gpu_memory, **memory.verdict(p["total"], capacity)}
    return p


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
        ("rope theta", f"{c['rope_theta']:g}" + (f", linear position interpolation x{c['rope_scaling']:g}"
                                                 if c.get("rope_scaling") else "")),
        ("norm eps", f"{c['norm_eps']:g}"),
        ("max context", f"{c['max_seq_len']}"),
        ("parameters", f"{info['params']:,} ({info['params'] / 1e9:.2f}B)"),
    ]
    rows += [(f"  {k.replace('_', '-')}", f"{v:,}") for k, v in info["params_breakdown"].items()]
    rows += [
        (f"weights ({info['quantize'] + ', rest ' + info['dtype'] if info.get('quantize') else info['dtype']})",
         _size(info["weight_bytes"])),
        (f"KV cache ({kv['dtype']})", f"{_size(kv['bytes'])} for {kv['context']:,} tokens x batch {kv['batch']} "
                                      f"({_size(kv['bytes_per_sequence'])} per sequence, "
                                      f"{kv['bytes_per_token'] / 1024:,.0f} KiB/token)"),
        ("weights + KV cache", _size(info["total_bytes"])),
        ("prefill peak", f"{_size(info['prefill']['peak_bytes'])} (+ {_size(info['prefill']['activation_bytes'])} "
                         f"{'attention mask and ' if kv['batch'] > 1 else ''}activations to read "
                         f"{kv['context']:,}-token prompt{'s' if kv['batch'] > 1 else ''} at once, SDPA)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def render_training(p: dict) -> str:
    """The training-memory table of :func:`training`."""
    def both(d: dict) -> str:
        ckpt = d["checkpointing"]
        return _size(d["no_checkpointing"]) + ("" if ckpt is None else f" | with checkpointing {_size(ckpt)}")

    setup = f"{p['method']}, {p['stage']}, "
    if p["stage"] == "ppo":
        q = p["ppo"]
        setup += (f"{q['batch']} rollouts of {p['seq_len']:,} + {q['max_new_tokens']:,} tokens, generated "
                  f"{q['rollout_batch']} at a time, {p['micro_batch']} per forward pass")
    else:
        pairs = f" pairs = {2 * p['micro_batch']} sequences" if p["stage"] == "reward" else ""
        setup += f"micro-batch {p['micro_batch']}{pairs} x {p['seq_len']:,} tokens"
    setup += f", {p['dtype']} weights, {p['activation_dtype']} activations"
    rows = [("training", setup)]
    if p["lora"]:
        lo = p["lora"]
        rows.append(("adapters", f"rank {lo['rank']} on {lo['targets']}, dropout {lo['dropout']:g}, float32"
                                 + (", base in NF4" if p["method"] == "qlora" else "")))
    rows.append(("trainable params", f"{p['trainable_params']:,}"))
    if p["stage"] == "ppo":
        for name, r in p["roles"].items():
            rows.append((f"  {name}", "shares the policy's weights (adapters off)" if not r["weights"] else
                         f"{_size(r['weights'] + r['gradients'] + r['optimizer'])}"
                         + (" (frozen)" if not r["trainable_params"] else "")))
    rows += [("weights", _size(p["weights"])), ("gradients", _size(p["gradients"])),
             ("AdamW state", _size(p["optimizer"]))]
    if "nf4_dequantize" in p:
        rows.append(("NF4 dequantize buffer", _size(p["nf4_dequantize"])))
    if p["stage"] == "ppo":
        for name, v in p["phases"].items():
            rows.append((f"  {name}", _size(v)))
        rows.append(("peak of the phases", both(p["activations"])))
    else:
        rows.append(("activations", both(p["activations"])))
    rows.append(("total", both(p["total"])))
    if "gpu" in p:
        g = p["gpu"]
        used = p["total"]["checkpointing" if g["needs_checkpointing"] else "no_checkpointing"]
        text = g["text"] + (f": needs {_size(g['needs'])}" if not g["fits"] else f", {_size(g['memory'] - used)} spare")
        rows.append((f"GPU {g['name']}", text))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(args: argparse.Namespace) -> int:
    info = gather(args.model, args.context, args.batch, args.dtype, args.kv_dtype, args.quantize)
    if args.train and args.quantize:
        raise ValueError("--quantize is for inference (weight-only int8/int4); training plans take --train qlora")
    if args.train:
        info["training"] = training(info, args.train, args.stage, args.micro_batch_size, args.seq_len,
                                    args.gpu_memory, args.device, args.lora_rank, args.lora_targets,
                                    args.lora_dropout, args.ppo_batch, args.max_new_tokens, args.quantize_rewards,
                                    args.rollout_batch)
    elif args.gpu_memory:  # inference: do the weights and the KV cache fit?
        capacity = memory.parse_size(args.gpu_memory)
        need = info["total_bytes"]
        info["gpu"] = {"memory": capacity, "name": args.gpu_memory, "fits": need <= capacity,
                       "text": "fits" if need <= capacity else f"does not fit: needs {_size(need)}"}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        gpu = f"\nGPU {info['gpu']['name']:<14}  {info['gpu']['text']}" if "gpu" in info else ""
        print(render(info) + gpu + ("\n\n" + render_training(info["training"]) if args.train else ""))
    return 0
