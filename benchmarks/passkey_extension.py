"""Passkey retrieval before and after a context extension, with and without a new RoPE base.

The code recipe (``llama2 run code``) learns the passkey probe (``llama2.eval.passkey``) inside
its code mixture and extends it with θ 10⁶ (or position interpolation). This study isolates the
question Code Llama §2.4 asks of the base: fine-tuned at a longer length, does θ 10⁶ carry
retrieval further than keeping θ 10⁴?

1. A 4-layer model (the code recipe's shape) learns the probe's task at ``--short`` tokens (64):
   probe-shaped texts with the loss on the completion only (the answer's tokens, as TRL's
   completion-only loss and the SFT stage's answer-only loss), RoPE θ 10⁴.
2. From that model, two fine-tunes of ``--long-steps`` steps on texts of ``--long`` tokens (256,
   4x, Code Llama §2.4's ratio): one keeps θ = 10⁴, one raises it to 10⁶.
3. Each model is probed by depth and length up to 4x the fine-tuning length (``passkey_eval``,
   greedy, keys and filler from the probe's own seed space).

The texts use ~170 distinct pieces of the Llama 2 vocabulary (fixture tokenizer); the model's
embedding holds only those (``CompactTokenizer``), so a step costs the transformer, not a 32k
softmax. Loss and schedule: AdamW (β 0.9/0.95, weight decay 0.1, clip 1.0), linear warm-up then
cosine to 10%, as pretraining. Results: benchmarks/results/cpu-2026-12-02/passkey_extension*.txt.

    python benchmarks/passkey_extension.py                       # ~75 seconds on 2 cores
    python benchmarks/passkey_extension.py --steps 40 --long-steps 10 --per-cell 2   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from llama2 import ModelConfig, Tokenizer, Transformer
from llama2.data.shards import PromptCompletion, completion_tokens
from llama2.eval.passkey import (
    KEY_LINE,
    KEYS,
    accuracy_by_length,
    format_passkey_table,
    passkey_documents,
    passkey_eval,
    passkey_examples,
    passkey_prompts,
)
from llama2.train.core import cross_entropy

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "llama2-tokenizer" / "tokenizer.model"


class CompactTokenizer:
    """The Llama 2 tokenizer restricted to the pieces ``texts`` use, renumbered 0..n-1 (BOS and
    EOS included); what ``passkey_eval`` and ``passkey_documents`` need of a tokenizer."""

    def __init__(self, base: Tokenizer, texts: list[str]):
        pieces = {base.bos_id, base.eos_id} | {t for s in texts for t in base.encode(s)}
        self.base, self.pieces = base, sorted(pieces)
        self.ids = {t: i for i, t in enumerate(self.pieces)}
        self.bos_id, self.eos_id = self.ids[base.bos_id], self.ids[base.eos_id]
        self.vocab_size = len(self.pieces)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        try:
            return [self.ids[t] for t in self.base.encode(text, bos=bos, eos=eos)]
        except KeyError as e:
            raise ValueError(f"piece {e.args[0]} of {text[:40]!r} is outside the compact vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        return self.base.decode([self.pieces[i] for i in ids])


def compact_tokenizer(base: Tokenizer, lengths: list[int]) -> CompactTokenizer:
    """Every piece the probe's and the training texts can hold: their fixed lines, every key."""
    sample = [d for n in lengths for d in passkey_documents(n, 20, 0, base)]
    sample += [p.text for n in lengths for p in passkey_prompts(base, n, [0.0, 1.0], 2)]
    sample += [KEY_LINE.format(key=k) + f"\n {k}\n" for k in KEYS]
    return CompactTokenizer(base, sample)


def completion_batch(texts: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) right-padded from (ids, prompt length) pairs: only the tokens after each
    prompt (the answer, its newline and EOS) are labels, -100 elsewhere."""
    width = max(len(ids) for ids, _ in texts)
    x = torch.zeros(len(texts), width, dtype=torch.long)
    y = torch.full((len(texts), width), -100, dtype=torch.long)
    for j, (ids, n_prompt) in enumerate(texts):
        row = torch.tensor(ids)
        x[j, :len(ids)] = row
        y[j, n_prompt - 1:len(ids) - 1] = row[n_prompt:]
    return x, y


def completion_texts(tok, length: int, count: int, seed: int) -> list[tuple[list[int], int]]:
    """``passkey_examples`` as (ids, prompt length), tokenized as ``llama2 prepare`` does a
    prompt/completion row."""
    return [completion_tokens(tok, PromptCompletion(p, a)) for p, a in passkey_examples(length, count, seed, tok)]


def train(model: Transformer, texts: list[tuple[list[int], int]], steps: int, batch: int, lr: float, warmup: int,
          log) -> list[float]:
    """AdamW on the completion-only loss; returns the loss every 50 steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    losses = []
    for s in range(steps):
        scale = min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        x, y = completion_batch([texts[(s * batch + j) % len(texts)] for j in range(batch)])
        loss = cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if s % 50 == 0 or s == steps - 1:
            losses.append(round(loss.item(), 4))
            log(f"  step {s:4d}  answer loss {loss.item():.3f}")
    model.eval()
    return losses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", type=int, default=64, help="tokens of the first training texts")
    ap.add_argument("--long", type=int, default=256, help="tokens of the fine-tuning texts (the extension)")
    ap.add_argument("--steps", type=int, default=300, help="steps at --short (16 texts each)")
    ap.add_argument("--long-steps", type=int, default=150, help="steps of each fine-tune at --long (4 texts each)")
    ap.add_argument("--theta", type=float, default=1e6, help="the extended RoPE base (Code Llama §2.4: 10^6)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024], help="probe lengths")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="probe depths")
    ap.add_argument("--per-cell", type=int, default=10, help="probe prompts per (length, depth)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, flush=True)  # noqa: E731

    try:  # bad lengths or depths stop here, in one line, before any training
        tok = compact_tokenizer(Tokenizer(FIXTURE), [args.short, args.long])
        for n in {*args.lengths, args.short, args.long}:
            passkey_prompts(tok, n, args.depths, 1)
    except ValueError as e:
        print(f"passkey_extension: {e}", file=sys.stderr)
        return 2
    short = completion_texts(tok, args.short, 6000, args.seed)
    long = completion_texts(tok, args.long, 1500, args.seed + 1)
    answer = max(len(ids) - n for ids, n in short)  # the longest key's pieces, the newline and EOS
    cfg = ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=tok.vocab_size, multiple_of=32,
                      max_seq_len=max(args.lengths + [args.long]) + 16)
    results, t0 = {"vocab": tok.vocab_size, "models": {}}, time.time()

    def probe(name: str, model: Transformer, losses: list[float]) -> None:
        r = passkey_eval(model, tok, args.lengths, args.depths, n_per_cell=args.per_cell, seed=args.seed,
                         batch_size=10, max_new_tokens=answer)
        by_length = accuracy_by_length(r)
        results["models"][name] = {"by_length": by_length, "cells": r["cells"], "losses": losses,
                                   "seconds": round(time.time() - t0)}
        log(f"{name}: " + ", ".join(f"{n}: {100 * a:.0f}%" for n, a in by_length.items()))
        log(format_passkey_table(r))

    torch.manual_seed(args.seed)
    base = Transformer.from_config(cfg, seed=args.seed)
    log(f"training at {args.short} tokens, θ {cfg.rope_theta:g}, {args.steps} steps (vocabulary {tok.vocab_size} pieces)")
    probe(f"trained at {args.short}, θ {cfg.rope_theta:g}", base, train(base, short, args.steps, 16, 1e-3, 30, log))
    for theta in (cfg.rope_theta, args.theta):
        model = copy.deepcopy(base)
        model.config.rope_theta = theta
        log(f"fine-tuning at {args.long} tokens, θ {theta:g}, {args.long_steps} steps")
        probe(f"+{args.long_steps} steps at {args.long}, θ {theta:g}", model,
              train(model, long, args.long_steps, 4, 5e-4, 10, log))
    log(f"total {time.time() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
