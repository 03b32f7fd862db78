"""Long-context inference: prefill and decode at a long context (Code Llama's 16k), ours vs transformers.

A random model of ``--preset``'s shape with ``--seq-len`` positions and RoPE θ ``--rope-theta``
(Code Llama §2.5: 16,384 and 10⁶) reads a prompt of ``--prompt-len`` tokens (default: the context
less ``--new-tokens``) and decodes ``--new-tokens`` greedily. Per side:

* prefill: seconds to the first new token (the whole prompt in one forward; SDPA's fused
  kernels on CUDA), and prompt tokens per second;
* decode: the other new tokens per second, each step attending over the whole prompt;
* peak memory (CUDA: ``max_memory_allocated``), beside what ``llama2 info --context N`` predicts
  for the weights, the KV cache and the prefill's transient activations.

transformers' ``LlamaForCausalLM`` (SDPA attention) on the same weights is the peer: the ratio
is ours' tokens/s over its, prefill and decode apart; the greedy tokens of both are compared.

    python benchmarks/long_context.py --device cuda --preset 7b --seq-len 16384       # the GPU check
    python benchmarks/long_context.py --preset nano --seq-len 2048 --new-tokens 16   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from llama2 import Generator, ModelConfig, SamplingParams, Transformer, load_model, save_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INFO_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def time_ours(gen: Generator, prompt: list[int], n: int, device: str) -> tuple[float, float, list[int]]:
    """(seconds to the first token, seconds for the rest, tokens)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=n, stop_at_eos=False)
    sync(device)
    t0 = time.perf_counter()
    steps = gen.steps([prompt], params)
    tokens = [int(next(steps)[0][0])]
    sync(device)
    t1 = time.perf_counter()
    tokens += [int(nxt[0]) for nxt, _, _ in steps]
    sync(device)
    return t1 - t0, time.perf_counter() - t1, tokens


@torch.inference_mode()
def time_hf(model, prompt: list[int], n: int, device: str) -> tuple[float, float, list[int]]:
    """The same split for transformers: a forward over the prompt with its cache, then greedy steps."""
    from transformers import DynamicCache

    ids = torch.tensor([prompt], device=device)
    cache = DynamicCache()
    sync(device)
    t0 = time.perf_counter()
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(nxt)]
    sync(device)
    t1 = time.perf_counter()
    for _ in range(n - 1):
        out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(nxt))
    sync(device)
    return t1 - t0, time.perf_counter() - t1, tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="7b", help="model shape (random weights; default 7b)")
    ap.add_argument("--seq-len", type=int, default=16384, help="the model's context (default 16384, Code Llama's)")
    ap.add_argument("--rope-theta", type=float, default=1e6, help="RoPE base (default 1e6, Code Llama's)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default: --seq-len less --new-tokens")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, else float32")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per side, best kept (default 2)")
    ap.add_argument("--compile", action="store_true", help="our decode step compiled (CUDA graphs on a GPU)")
    ap.add_argument("--no-transformers", dest="transformers", action="store_false", help="leave the peer out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args(argv)

    dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    n = args.new_tokens
    prompt_len = args.prompt_len or args.seq_len - n
    if n < 2 or prompt_len < 1 or prompt_len + n > args.seq_len:
        raise SystemExit(f"need --new-tokens >= 2 and prompt + new tokens <= --seq-len ({prompt_len} + {n} > "
                         f"{args.seq_len})")
    cfg = dataclasses.replace(ModelConfig.from_preset(args.preset), max_seq_len=args.seq_len,
                              rope_theta=args.rope_theta)
    from llama2.commands.info import gather

    # What `llama2 info PRESET --context N` predicts (its prefill term takes the whole context as
    # the prompt: a slight overestimate here).
    predicted = gather(args.preset, context=prompt_len + n, dtype=INFO_DTYPES[dtype])
    g = torch.Generator().manual_seed(args.seed)
    prompt = [1] + torch.randint(3, cfg.vocab_size, (prompt_len - 1,), generator=g).tolist()

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(args.seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # never a float32 7B
        try:
            with torch.device(args.device):
                model = Transformer(cfg)
            model.init_weights()
        finally:
            torch.set_default_dtype(default)
        if args.transformers:
            path = save_model(model.eval(), Path(tmp) / "model", dtype=dtype)
            del model
            model = load_model(path, dtype=dtype, device=args.device)
        def measure(run) -> dict:
            run()  # warm-up (compilation, kernel selection)
            peak_reset(args.device)
            pre, dec, tokens = min(run() for _ in range(args.repeats))
            return {"prefill_s": pre, "prefill_tok_s": prompt_len / pre, "decode_tok_s": (n - 1) / dec,
                    "peak_bytes": peak(args.device), "tokens": tokens}

        gen = Generator(model.eval(), compile=args.compile)
        sides = {"ours": measure(lambda: time_ours(gen, prompt, n, args.device))}
        if args.transformers:  # one model in memory at a time
            del gen, model
            peak_reset(args.device)
            from transformers import LlamaForCausalLM

            hf = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(args.device)
            sides["transformers"] = measure(lambda: time_hf(hf.eval(), prompt, n, args.device))

    out = {"preset": args.preset, "seq_len": args.seq_len, "rope_theta": args.rope_theta, "device": args.device,
           "dtype": str(dtype).removeprefix("torch."), "prompt_tokens": prompt_len, "new_tokens": n,
           "compiled": args.compile, "params": cfg.num_params(), "sides": sides,
           "predicted": {"weight_bytes": predicted["weight_bytes"], "kv_cache_bytes": predicted["kv_cache"]["bytes"],
                         "prefill_peak_bytes": predicted["prefill"]["peak_bytes"]}}
    if "transformers" in sides:
        ours, hf = sides["ours"], sides["transformers"]
        out["prefill_ratio"] = ours["prefill_tok_s"] / hf["prefill_tok_s"]
        out["decode_ratio"] = ours["decode_tok_s"] / hf["decode_tok_s"]
        out["same_tokens"] = f"{sum(a == b for a, b in zip(ours['tokens'], hf['tokens']))}/{n}"
    if args.json:
        print(json.dumps(out))
        return 0
    gib = 2**30
    print(f"random {args.preset} ({cfg.num_params() / 1e9:.2f}B params), context {args.seq_len}, RoPE θ "
          f"{args.rope_theta:g}, {args.device}, {out['dtype']}, prompt {prompt_len} tokens + {n} new"
          f"{', compiled' if args.compile else ''}")
    print(f"  {'side':<13} {'prefill s':>9} {'prefill tok/s':>13} {'decode tok/s':>12} {'peak GiB':>9}")
    for side, r in sides.items():
        mem = f"{r['peak_bytes'] / gib:9.2f}" if r["peak_bytes"] is not None else f"{'-':>9}"
        print(f"  {side:<13} {r['prefill_s']:9.2f} {r['prefill_tok_s']:13.0f} {r['decode_tok_s']:12.1f} {mem}")
    p = out["predicted"]
    print(f"  llama2 info predicts: weights {p['weight_bytes'] / gib:.2f} GiB + KV cache {p['kv_cache_bytes'] / gib:.2f}"
          f" GiB; prefill peak {p['prefill_peak_bytes'] / gib:.2f} GiB")
    if "transformers" in sides:
        print(f"  ours / transformers: prefill {out['prefill_ratio']:.2f}x, decode {out['decode_ratio']:.2f}x; "
              f"greedy tokens equal {out['same_tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
