"""Can the code recipe carry passkey retrieval through its context extension? Phases from a recipe model.

``benchmarks/passkey_extension.py`` shows retrieval forming and extending on the probe's texts
alone, with its own small loop. This script asks the code recipe's question with the recipe's
own parts: ``llama2 prepare`` with prompt/completion rows (the loss on the answer only) and
``llama2 pretrain --init`` (the trainer every stage uses), starting from a model of
``llama2 run code`` (``--init runs/code/fim/model``):

1. **teach**: answer-only passkey texts of ``--teach-min``..``--teach-max`` tokens at the
   model's own length and θ, ``--teach-steps`` steps; probed at 1x, 2x and 4x that length.
2. From the taught model, three extensions at 4x the length with θ 10⁶ (Code Llama §2.4), the
   recipe's ``long`` settings (``--extend-steps`` steps of 4 sequences of 1,024 tokens):
   **mixed**, the recipe's mixture (its FIM code, ``--code``, plus answer-only passkey texts
   up to the new length); the same with each answer token weighing ``--completion-weight``
   code tokens (an answer is ~7 of a text's tokens, ~1% of the mixture's targets); and
   **passkey**, the passkey texts alone. Each is probed at 1x .. 8x the original length.

    python benchmarks/passkey_phases.py --init runs/code/fim/model --code runs/code/data-fim/code   # ~18 min, 2 cores
    python benchmarks/passkey_phases.py --init M --code D --teach-steps 20 --extend-steps 5 --per-cell 1  # smoke

Results of a run on this 2-core machine: benchmarks/results/cpu-2026-12-02/passkey_phases.txt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from llama2.checkpoint import load_model
from llama2.code_pipeline import CodeDataConfig, merge_prepared, passkey_rows
from llama2.data.shards import prepare, read_index
from llama2.eval.passkey import accuracy_by_length, format_passkey_table, passkey_eval
from llama2.recipe import from_dict
from llama2.tokenizer import Tokenizer
from llama2.train import pretrain


def answer_only_rows(tok, shortest: int, longest: int, n: int, seed: int) -> list[dict]:
    """``n`` prompt/completion rows of shortest..longest tokens, as the code recipe's data stages
    make them with ``passkey_answer_only``."""
    return passkey_rows(CodeDataConfig(passkey_documents=n, passkey_min_length=shortest, passkey_length=longest,
                                       passkey_answer_only=True, seed=seed, world_seed=seed), tok)


def prepare_phase(folder: Path, tok_file: Path, rows: list[dict], code: Path | None) -> Path:
    """A data directory of the rows (answer-only) and, with ``code``, a copy of that prepared code."""
    folder.mkdir(parents=True, exist_ok=True)
    rows_file = folder / "passkey.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    parts = {"passkey": folder / "passkey"}
    prepare([rows_file], tok_file, parts["passkey"], val_fraction=0.02, workers=1, progress=False, log=lambda m: None)
    if code is not None:
        shutil.copytree(code, folder / "code", dirs_exist_ok=True)
        parts["code"] = folder / "code"
    merge_prepared(parts, folder)
    return folder


def train_phase(init: str, data: Path, out: Path, steps: int, seq_len: int, batch: int, lr: float,
                theta: float | None, seed: int, completion_weight: float = 1.0) -> str:
    model = {"max_seq_len": seq_len} | ({"rope_theta": theta} if theta else {})
    cfg = from_dict(pretrain.PretrainConfig, {"init": init, "data": str(data), "out": str(out), "seq_len": seq_len,
                                              "batch_size": batch, "micro_batch_size": batch, "max_steps": steps,
                                              "lr": lr, "warmup_steps": 10, "eval_every": 0, "save_every": 0,
                                              "seed": seed, "model": model, "completion_weight": completion_weight},
                    "passkey_phases")
    cfg = dataclasses.replace(cfg, model=pretrain.init_model_config(cfg.init, model))
    pretrain.run(cfg, quiet=True)
    return str(out / "model")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="a code recipe model (runs/code/fim/model)")
    ap.add_argument("--code", required=True, type=Path, help="its prepared FIM code (runs/code/data-fim/code)")
    ap.add_argument("--out", type=Path, default=Path("runs/passkey-phases"))
    ap.add_argument("--teach-steps", type=int, default=800)
    ap.add_argument("--teach-min", type=int, default=64, help="tokens of the shortest teaching texts")
    ap.add_argument("--teach-max", type=int, default=128, help="tokens of the longest teaching texts")
    ap.add_argument("--extend-steps", type=int, default=180, help="steps of each extension (the recipe's long)")
    ap.add_argument("--extend-min", type=int, help="tokens of the shortest extension texts (default: half the "
                                                   "model's length, as the recipe's data-long)")
    ap.add_argument("--short-lengths", type=int, nargs="+", help="probe lengths before the extension (default: "
                                                                 "0.5x, 1x, 2x the model's length)")
    ap.add_argument("--long-lengths", type=int, nargs="+", help="probe lengths after it (default: 1x, 2x, 4x, 8x)")
    ap.add_argument("--theta", type=float, default=1e6)
    ap.add_argument("--completion-weight", type=float, default=50.0,
                    help="also extend on the mixture with each answer token weighing this many code tokens "
                         "(llama2 pretrain --completion-weight); 1: skip that variant")
    ap.add_argument("--per-cell", type=int, default=6, help="probe prompts per (length, depth)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, flush=True)  # noqa: E731
    try:
        base = load_model(args.init)
        index = read_index(args.code)
    except (OSError, ValueError) as e:
        print(f"passkey_phases: {e}", file=sys.stderr)
        return 2
    tok_file = Path(args.code) / index["tokenizer"]
    tok = Tokenizer(tok_file)
    length, t0 = base.config.max_seq_len, time.time()
    results: dict = {"init": args.init, "trained_length": length, "models": {}}

    def probe(name: str, model_dir: str, lengths: list[int]) -> None:
        model = load_model(model_dir).eval()
        model.config.max_seq_len = max(lengths) + 8  # the KV cache only: RoPE reaches any position
        r = passkey_eval(model, tok, lengths, [0.0, 0.5, 1.0], args.per_cell, args.seed, batch_size=6,
                         max_new_tokens=8)
        by_length = accuracy_by_length(r)
        results["models"][name] = {"by_length": by_length, "cells": r["cells"], "seconds": round(time.time() - t0)}
        log(f"{name} ({time.time() - t0:.0f} s): " + ", ".join(f"{n}: {100 * a:.0f}%" for n, a in by_length.items()))
        log(format_passkey_table(r))

    short = args.short_lengths or [length // 2, length, 2 * length]
    long = args.long_lengths or [length, 2 * length, 4 * length, 8 * length]
    probe("init", args.init, short)
    log(f"teach: {args.teach_steps} steps, answer-only passkey texts of {args.teach_min}-{args.teach_max} tokens")
    data = prepare_phase(args.out / "teach-data", tok_file,
                         answer_only_rows(tok, args.teach_min, args.teach_max, 15 * args.teach_steps, args.seed),
                         None)
    taught = train_phase(args.init, data, args.out / "teach", args.teach_steps, length, 8, 1e-3, None, args.seed)
    probe("taught", taught, short)
    weighted = f"mixed, answers x{args.completion_weight:g}"
    variants = [("mixed", "mixed", args.code, 600, 1.0), ("passkey", "passkey", None, 1200, 1.0)]
    if args.completion_weight != 1.0:
        variants.insert(1, (weighted, "mixed", args.code, 600, args.completion_weight))
    for name, data_name, code, n, weight in variants:
        log(f"extend ({name}): {args.extend_steps} steps at {4 * length} tokens, θ {args.theta:g}")
        data = prepare_phase(args.out / f"{data_name}-data", tok_file,
                             answer_only_rows(tok, args.extend_min or length // 2, 4 * length, n, args.seed + 1), code)
        model = train_phase(taught, data, args.out / name.replace(", ", "-").replace(" ", "-"), args.extend_steps,
                            4 * length, 4, 1e-3, args.theta, args.seed, weight)
        probe(f"extended, {name}", model, long)
    log(f"total {time.time() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
