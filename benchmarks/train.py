"""Training speed: our train step vs transformers' LlamaForCausalLM, same model, batch and optimizer.

Both sides start from the SAME weights (one saved model directory), run on the same device
with the same dtype and thread count, and take full optimizer steps on the same random
token batches: forward, next-token cross-entropy, backward, gradient clipping at 1.0, AdamW
(0.9, 0.95, eps 1e-5, weight decay 0.1 on matrices, the fused kernel on both sides). Ours
is ``llama2.train.core``'s step (``lm_loss`` + ``build_optimizer``); theirs is the standard
``model(input_ids, labels=...)`` call. Timed rounds alternate between the two after a
warm-up; the median round is reported as training tokens/s and their ratio. Each round's
process CPU time is reported too: on a shared machine it is the steadier measure.

``--compile`` compiles OUR model (``llama2 pretrain --compile``); ``--compile-both`` compiles
both. Compilation time is not counted (it happens in the warm-up).

    python benchmarks/train.py                                  # tiny preset, CPU, float32
    python benchmarks/train.py --preset 110m --batch 4 --seq 512
    python benchmarks/train.py --device cuda --preset 1b --batch 8 --seq 2048 --bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time

import torch

from llama2 import ModelConfig, Transformer, save_model
from llama2.train.core import TrainConfig, build_optimizer, lm_loss


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="model preset (default: tiny = dim 256, 4 layers)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per side (alternating)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile our model (as --compile does)")
    p.add_argument("--compile-both", action="store_true", help="torch.compile both models")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    device = torch.device(args.device)
    cfg = ModelConfig.from_preset(args.preset, max_seq_len=max(args.seq, 16))
    # Initialised on the device (a 1B model's random init is slow on CPU); both sides then read
    # the same weights from one saved directory.
    t_build = time.perf_counter()
    ours = Transformer.from_config(cfg, device=device, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        theirs = transformers.LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa",
                                                               torch_dtype=torch.float32)
    ours.to(device).train()
    theirs.to(device).train()
    build_s = time.perf_counter() - t_build
    tc = TrainConfig()
    opt_ours, opt_theirs = build_optimizer(ours, tc), build_optimizer(theirs, tc)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
               for _ in range(args.steps)]
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    def step_ours(x):
        with amp():
            loss, _ = lm_loss(ours, {"tokens": x[:, :-1], "labels": x[:, 1:]})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss

    def step_theirs(x):
        with amp():  # transformers shifts the labels itself
            loss = theirs(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(step) -> tuple[float, float]:
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for x in batches:
            step(x)
        sync()
        tokens = args.batch * args.seq * len(batches)
        return tokens / (time.perf_counter() - t0), tokens / (time.process_time() - c0)

    # Same weights, same batch: the first losses agree (a check that we compare like with like).
    with torch.no_grad():
        x = batches[0]
        a = lm_loss(ours, {"tokens": x[:, :-1], "labels": x[:, 1:]})[0].item()
        b = theirs(input_ids=x[:, :-1], labels=x[:, :-1]).loss.item()
    if args.compile or args.compile_both:
        ours.compile()
    if args.compile_both:
        theirs.compile()
    t_warm = time.perf_counter()
    for step in (step_ours, step_theirs):  # warm-up (compilation, allocator, fused AdamW state)
        step(batches[0])
        step(batches[0])
    sync()
    warmup_s = time.perf_counter() - t_warm
    rounds = {"ours": [], "transformers": []}
    for _ in range(args.rounds):
        rounds["ours"].append(timed(step_ours))
        rounds["transformers"].append(timed(step_theirs))
    ours_tps, theirs_tps = (statistics.median(r[0] for r in rounds[k]) for k in ("ours", "transformers"))
    ours_cpu, theirs_cpu = (statistics.median(r[1] for r in rounds[k]) for k in ("ours", "transformers"))
    result = {
        "preset": args.preset, "params": cfg.num_params(), "batch": args.batch, "seq": args.seq,
        "device": str(device), "threads": torch.get_num_threads(), "dtype": "bf16" if args.bf16 else "fp32",
        "first_loss": {"ours": round(a, 5), "transformers": round(b, 5)},
        "ours_tokens_per_s": round(ours_tps, 1), "transformers_tokens_per_s": round(theirs_tps, 1),
        "ratio": round(ours_tps / theirs_tps, 3),
        "ours_tokens_per_cpu_s": round(ours_cpu, 1), "transformers_tokens_per_cpu_s": round(theirs_cpu, 1),
        "cpu_time_ratio": round(ours_cpu / theirs_cpu, 3),
        "compiled": "both" if args.compile_both else "ours" if args.compile else "neither",
        "build_s": round(build_s, 1), "warmup_s": round(warmup_s, 1),
        "peak_memory_gb": (round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
                           if device.type == "cuda" else None),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.preset} ({cfg.num_params() / 1e6:.1f}M params), batch {args.batch} x {args.seq}, "
              f"{result['dtype']} on {device} ({result['threads']} threads); first loss ours {a:.4f} / "
              f"transformers {b:.4f}")
        print(f"compiled: {result['compiled']}; set-up {build_s:.1f} s, warm-up {warmup_s:.1f} s"
              + (f", peak memory {result['peak_memory_gb']} GiB" if result["peak_memory_gb"] else ""))
        for k, tps, cpu in (("ours", ours_tps, ours_cpu), ("transformers", theirs_tps, theirs_cpu)):
            print(f"{k:13s} {tps:10,.0f} tokens/s ({cpu:,.0f} per CPU-second)   rounds "
                  f"{[round(r[0]) for r in rounds[k]]}")
        print(f"ratio ours / transformers: {result['ratio']:.2f}x wall-clock, {result['cpu_time_ratio']:.2f}x "
              f"CPU time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
