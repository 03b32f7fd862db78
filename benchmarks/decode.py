"""Greedy decoding speed: our Generator vs transformers' ``generate`` on the same random model.

Both sides load the SAME weights from one saved model directory, run on the same device with
the same dtype and thread count, decode the same prompt greedily with the KV cache, and emit
exactly ``--new-tokens`` tokens (EOS ignored on our side, ``min_new_tokens`` on theirs). Each
side is warmed up first; the timed runs alternate between the two, and the best of
``--repeats`` is reported (prefill included, so tokens/s = new tokens / wall time).

    python benchmarks/decode.py                                   # 110m preset, CPU, float32
    python benchmarks/decode.py --device cuda --dtype bfloat16 --preset 7b
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from llama2 import Generator, ModelConfig, SamplingParams, Transformer, load_model, save_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_random_model(preset: str, dtype: torch.dtype, device: str, seed: int) -> Transformer:
    """A randomly initialised preset, created directly in ``dtype`` on ``device``."""
    cfg = ModelConfig.from_preset(preset)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # so a 7B model is never materialised in float32
    try:
        with torch.device(device):
            model = Transformer(cfg)
        model.init_weights()
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ours(gen: Generator, prompt: list[int], n: int, device: str) -> tuple[float, list[int]]:
    params = SamplingParams(temperature=0.0, max_new_tokens=n, stop_at_eos=False)
    sync(device)
    t0 = time.perf_counter()
    out = gen.generate([prompt], params)[0]
    sync(device)
    return time.perf_counter() - t0, out.tokens


@torch.inference_mode()
def time_floor(model: Transformer, n: int, device: str) -> float:
    """Seconds for n tokens' worth of the model's matrix-vector products and nothing else: the
    weights stream through memory once per token, which bounds batch-1 decoding from below."""
    import torch.nn.functional as F

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.zeros(1, 1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        for w in weights:
            F.linear(xs[w.shape[1]], w)
    sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def time_hf(model, prompt: list[int], n: int, device: str) -> tuple[float, list[int]]:
    from transformers import GenerationConfig

    ids = torch.tensor([prompt], device=device)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    sync(device)
    return time.perf_counter() - t0, out[0, len(prompt):].tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="110m", help="model shape (llama2.model.PRESETS); random weights")
    ap.add_argument("--model", type=Path, help="use this saved model directory instead of a random preset")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                    help="float32 on CPU, bfloat16 on CUDA by default")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt length in tokens (BOS + random ids)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for BOTH sides (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true",
                    help="our Generator with its compiled decode step (CUDA graphs on a GPU); transformers "
                         "stays eager")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args(argv)

    dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            model = build_random_model(args.preset, dtype, args.device, args.seed)
            name = f"random {args.preset}"
            save_model(model, tmp, dtype=dtype)
            del model
            path = Path(tmp)
        else:
            path, name = args.model, str(args.model)
        ours = load_model(path, dtype=dtype, device=args.device)
        theirs = LlamaForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    cfg = ours.config
    if args.prompt_len + args.new_tokens > cfg.max_seq_len:
        raise SystemExit(f"prompt-len + new-tokens exceeds the context ({cfg.max_seq_len})")
    g = torch.Generator().manual_seed(args.seed)
    prompt = [1] + torch.randint(3, cfg.vocab_size, (args.prompt_len - 1,), generator=g).tolist()
    gen = Generator(ours, compile=args.compile)
    n = args.new_tokens

    # Warm-up (allocator, oneDNN/cuBLAS kernel selection, lazy imports) for both sides; the
    # compiled step is warmed up at the timed length, so its compilation is never timed.
    for _ in range(2):
        time_ours(gen, prompt, n if args.compile else min(n, 16), args.device)
        time_hf(theirs, prompt, min(n, 16), args.device)
    best_ours = best_hf = best_floor = float("inf")
    tokens_ours = tokens_hf = None
    for _ in range(args.repeats):  # alternate, so a busy spell on the machine hits both sides
        t, tokens_ours = time_ours(gen, prompt, n, args.device)
        best_ours = min(best_ours, t)
        t, tokens_hf = time_hf(theirs, prompt, n, args.device)
        best_hf = min(best_hf, t)
        best_floor = min(best_floor, time_floor(ours, n, args.device))
    match = sum(a == b for a, b in zip(tokens_ours, tokens_hf))
    result = {
        "model": name, "params": cfg.num_params(), "device": args.device, "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "batch": 1, "prompt_tokens": len(prompt), "new_tokens": n,
        "ours_tok_s": n / best_ours, "transformers_tok_s": n / best_hf, "ratio": best_hf / best_ours,
        "matmul_floor_tok_s": n / best_floor,
        "same_tokens": f"{match}/{n}", "compiled": args.compile,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{name} ({cfg.num_params() / 1e6:.0f}M params), {args.device}, {result['dtype']}, "
              f"{result['threads']} threads, batch 1, prompt {len(prompt)} tokens, {n} new tokens")
        print(f"  ours          {result['ours_tok_s']:8.1f} tokens/s")
        print(f"  transformers  {result['transformers_tok_s']:8.1f} tokens/s")
        print(f"  ratio (ours / transformers) {result['ratio']:.2f}x; greedy tokens identical: {match}/{n}")
        print(f"  matmul-only floor {result['matmul_floor_tok_s']:8.1f} tokens/s (the weights' matrix-vector "
              f"products alone, one eager call each: on a CPU the bound of batch-1 decoding in this dtype; on a "
              f"GPU the eager calls are launch-bound, so a compiled decoder can beat it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
