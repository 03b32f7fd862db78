"""Time per PPO iteration, split into generation / scoring / training, and the rollout
generation speed against our plain batched Generator on the same prompts (the peer).

    python benchmarks/ppo.py [--iterations 3] [--batch 32] [--max-new-tokens 40]

Uses a random tiny-preset policy and reward model (the real Llama 2 vocabulary when the test
fixture is present, else a tokenizer trained on the bundled corpus).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def tokenizer():
    """The real Llama 2 vocabulary (the test fixture in the repository)."""
    from llama2 import Tokenizer

    return Tokenizer(Path(__file__).resolve().parents[1] / "tests/fixtures/llama2-tokenizer/tokenizer.model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--minibatch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from llama2 import ModelConfig, Transformer, save_model
    from llama2.chat import encode_chat
    from llama2.checkpoint import load_model, save_scalar_model
    from llama2.generate import Generator, SamplingParams
    from llama2.model.heads import ScalarModel
    from llama2.train.ppo import PPOConfig, PPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = tokenizer()
        cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=512)
        lm = Transformer.from_config(cfg, seed=0)
        save_model(lm, tmp / "policy", tokenizer=tok)
        save_scalar_model(ScalarModel.from_language_model(lm), tmp / "rm", tokenizer=tok)
        ppo_cfg = PPOConfig(out=str(tmp / "ppo"), model=str(tmp / "policy"), reward_model=str(tmp / "rm"),
                            safety_model=str(tmp / "rm"), max_steps=args.iterations, batch_size=args.batch,
                            minibatch_size=args.minibatch, max_new_tokens=args.max_new_tokens, lr=1e-5,
                            prompts=args.batch * args.iterations, save_every=0, progress=False)
        trainer = PPOTrainer(ppo_cfg, quiet=True)
        t0 = time.perf_counter()
        trainer.fit()
        total = time.perf_counter() - t0
        rows = [json.loads(line) for line in (tmp / "ppo" / "metrics.jsonl").read_text().splitlines()]

        # The peer: our plain Generator on the same prompts, same sampling, same length cap.
        prompts = [encode_chat(tok, p["messages"]) for p in trainer.prompts[: args.batch]]
        gen = Generator(load_model(tmp / "policy"), tok)
        t1 = time.perf_counter()
        outs = gen.generate(prompts, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                                                    seed=0))
        plain_tps = sum(len(o.tokens) for o in outs) / (time.perf_counter() - t1)

    def mean(key):
        return sum(r[key] for r in rows) / len(rows)

    gen_s, score_s, train_s = mean("generation_s"), mean("scoring_s"), mean("train_s")
    print(f"PPO, tiny preset, batch {args.batch}, minibatch {args.minibatch}, {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"per iteration: {total / len(rows):.2f} s  = generation {gen_s:.2f} s + scoring {score_s:.2f} s + "
          f"training {train_s:.2f} s (+ reference/value passes and bookkeeping)")
    rollout_tps = mean("rollout_tokens_per_s")
    print(f"rollout generation: {rollout_tps:,.0f} tokens/s; plain Generator on the same prompts: "
          f"{plain_tps:,.0f} tokens/s; ratio {rollout_tps / plain_tps:.2f}")
    if args.json:  # PPOTrainer runs on CPU (it has no device setting), so this is a CPU figure
        print(json.dumps({"bench": "ppo", "device": "cpu", "threads": torch.get_num_threads(), "batch": args.batch,
                          "minibatch": args.minibatch, "max_new_tokens": args.max_new_tokens,
                          "iteration_s": total / len(rows), "generation_s": gen_s, "scoring_s": score_s,
                          "train_s": train_s, "rollout_tokens_per_s": rollout_tps,
                          "plain_generator_tokens_per_s": plain_tps}))


if __name__ == "__main__":
    main()
