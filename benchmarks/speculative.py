"""Speculative decoding: tokens/s with a draft model against plain decoding of the same model.

Both sides decode the same prompt with the same model, greedily (so the tokens must be equal:
the benchmark checks it) and, with ``--temperature``, sampled. The speculative side runs with
every K of ``--draft-tokens``; the table gives each K's acceptance rate (accepted / drafted
tokens), tokens per model forward pass, tokens/s and the speed-up over plain decoding measured
in the same run (best of ``--repeats``, runs alternating).

The draft is ``--draft-model DIR`` (a smaller model with the same tokenizer: a 7B for a 70B, a
small model for a 7B), or, by default, the model itself quantized to int4 (``--draft-quantize``:
self-speculation with a cheaper copy, as llama.cpp users do with a low-bit draft). With a random
preset the weights are scaled so that next-token distributions are peaked as a trained model's
are (``--sharpen``): a random model's near-flat logits make any two models disagree, which
says nothing about speculative decoding.

    python benchmarks/speculative.py                                 # random 110m, int4 self-draft, CPU
    python benchmarks/speculative.py --model llama-2-7b --draft-model tiny-llama --device cuda
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


def timed(gen: Generator, prompt: list[int], params: SamplingParams, device: str) -> tuple[float, list[int]]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = gen.generate([prompt], params)[0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out.tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="model directory (default: a random --preset)")
    ap.add_argument("--preset", default="110m", help="random model shape when no --model")
    ap.add_argument("--sharpen", type=float, default=4.0,
                    help="scale a random preset's output layer by this (peaked distributions; default 4)")
    ap.add_argument("--draft-model", type=Path, help="draft model directory (default: --model quantized)")
    ap.add_argument("--draft-quantize", default="int4:32", help="the default draft's quantization (default int4:32)")
    ap.add_argument("--draft-tokens", default="2,4,6", help="K values to run (default 2,4,6)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); else sampled, top-p 1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.draft_tokens.split(",") if k.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)

    def say(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            model = Transformer.from_config(ModelConfig.from_preset(args.preset), seed=args.seed)
            with torch.no_grad():
                model.output.weight.mul_(args.sharpen)
            path, name = save_model(model, Path(tmp) / "model"), f"random {args.preset} (x{args.sharpen:g} logits)"
            del model
        else:
            path, name = args.model, str(args.model)
        model = load_model(path, device=args.device)
        if args.draft_model is not None:
            draft, dname = load_model(args.draft_model, device=args.device), str(args.draft_model)
        else:
            draft = load_model(path, device=args.device, dtype=torch.bfloat16, quantize=args.draft_quantize)
            dname = f"the model in {args.draft_quantize}"
    cfg = model.config
    g = torch.Generator().manual_seed(args.seed)
    prompt = [1] + torch.randint(3, cfg.vocab_size, (args.prompt_len - 1,), generator=g).tolist()
    params = SamplingParams(temperature=args.temperature, top_p=1.0, max_new_tokens=args.new_tokens,
                            stop_at_eos=False, seed=args.seed)
    sides: dict[str, Generator] = {"plain": Generator(model), "draft alone": Generator(draft)}
    for k in ks:
        sides[f"K={k}"] = Generator(model, draft=draft, draft_tokens=k)
    for gen in sides.values():  # warm-up
        gen.generate([prompt], SamplingParams(temperature=args.temperature, max_new_tokens=8, stop_at_eos=False))
    best = dict.fromkeys(sides, float("inf"))
    tokens: dict[str, list[int]] = {}
    stats: dict[str, dict] = {}
    for _ in range(args.repeats):
        for side, gen in sides.items():
            gen.stats = {"drafted": 0, "accepted": 0, "rounds": 0}
            t, tokens[side] = timed(gen, prompt, params, args.device)
            best[side] = min(best[side], t)
            stats[side] = dict(gen.stats)
    n = args.new_tokens
    rows = []
    for side in sides:
        st = stats[side]
        rows.append({
            "side": side, "tok_s": n / best[side], "speedup": best["plain"] / best[side],
            "acceptance": st["accepted"] / st["drafted"] if st["drafted"] else None,
            # the first token comes from the prefill; every round is one forward pass of the model
            "tokens_per_pass": (n - 1) / st["rounds"] if st["rounds"] else None,
            "same_tokens": f"{sum(a == b for a, b in zip(tokens[side], tokens['plain']))}/{n}",
        })
    result = {"model": name, "params": cfg.num_params(), "draft": dname, "draft_params": draft.config.num_params(),
              "device": args.device, "threads": torch.get_num_threads(), "temperature": args.temperature,
              "new_tokens": n, "rows": rows}
    if args.json:
        print(json.dumps(result))
        return 0
    say(f"{name} ({cfg.num_params() / 1e6:.0f}M), draft: {dname}; {args.device}, {torch.get_num_threads()} threads, "
        f"{n} new tokens, {'greedy' if args.temperature == 0 else f'temperature {args.temperature:g}'}")
    say(f"{'side':<12} {'tokens/s':>9} {'speed-up':>9} {'accepted':>9} {'tok/pass':>9} {'same tokens':>12}")
    for r in rows:
        acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
        tpp = f"{r['tokens_per_pass']:.2f}" if r["tokens_per_pass"] is not None else "-"
        same = r["same_tokens"] if args.temperature == 0 else "(sampled)"
        say(f"{r['side']:<12} {r['tok_s']:9.1f} {r['speedup']:8.2f}x {acc:>9} {tpp:>9} {same:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
