"""``llama2 guard``: train a Llama Guard-style safety classifier (``train``), or use one
(``check``, ``eval``; the classifier itself is :mod:`llama2.guard`).

Training fine-tunes a chat model on labelled conversations, each rendered as the guard prompt
with ``safe``, or ``unsafe`` and the violated categories, as the answer that carries the loss.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from llama2.checkpoint import load_state, load_tokenizer
from llama2.data.chat_data import tokenize_conversation
from llama2.guard import Guard, evaluate, format_eval, guard_answer, guard_dialogue, guard_rows, target_role
from llama2.recipe import add_config_args, setting
from llama2.train.finetune import NO_VALIDATION, FinetuneConfig, finetune, refuse_validation, stage_main
from llama2.train.state import check_resume
from llama2.utils import log_to_stderr


@dataclass
class GuardConfig(FinetuneConfig):
    out: str = setting("runs/guard", "run folder: metrics.jsonl, checkpoints/, model/, eval.json", metavar="DIR")
    model: str = setting("runs/sft/model", "chat model to fine-tune into a classifier", metavar="DIR")
    data: str = setting("", "labelled conversations, JSONL {\"messages\", \"target\": \"user\"|\"agent\", \"unsafe\", "
                            "\"categories\"}; empty: the bundled assistant world", metavar="FILE")
    world_examples: int = setting(3000, "examples drawn from the bundled world when --data is empty")
    world_seed: int = setting(0, "seed of the bundled assistant world")
    epochs: int = setting(1, "passes over the data")
    # The classifier is scored on the world's held-out split after training (eval.json), not on
    # validation batches during it.
    eval_every: int = setting(0, NO_VALIDATION)
    eval_batches: int = setting(0, NO_VALIDATION)

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_validation(self, "the guard")


def run(cfg: GuardConfig, quiet: bool = False) -> dict:
    check_resume(cfg.out, cfg.resume)  # refused before any work
    log = log_to_stderr(quiet)
    tok = load_tokenizer(cfg.model, load_state(cfg.model)[0].vocab_size)
    rows = guard_rows(cfg.data, "train", cfg.world_examples, cfg.world_seed)
    examples = [tokenize_conversation(tok, guard_dialogue(r["messages"], target_role(r)) + [
        {"role": "assistant", "content": guard_answer(bool(r["unsafe"]), list(r.get("categories", [])))}])
        for r in rows]
    log(f"guard: {len(rows):,} labelled conversations ({sum(bool(r['unsafe']) for r in rows):,} unsafe)")
    last = finetune(cfg, examples, [], tok, run_config=cfg, quiet=quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        result = evaluate(Path(cfg.out) / "model", split="test", n=400, seed=cfg.world_seed)
        (Path(cfg.out) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        log(format_eval(result))
    return last


# ---- CLI --------------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="fine-tune a classifier on labelled conversations")
    add_config_args(train, GuardConfig)
    check = sub.add_parser("check", help="classify a conversation (JSON messages list, or text = one user message)")
    check.add_argument("--model", required=True, metavar="DIR")
    check.add_argument("--file", metavar="F", help="input file (default: stdin)")
    check.add_argument("--threshold", type=float, default=0.5, help="unsafe when the score reaches this (default 0.5)")
    check.add_argument("--json", action="store_true")
    ev = sub.add_parser("eval", help="precision/recall per category on held-out conversations")
    ev.add_argument("--model", required=True, metavar="DIR")
    ev.add_argument("--data", metavar="FILE", help="labelled JSONL (default: the bundled world's test split)")
    ev.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.action == "train":
        return stage_main(GuardConfig, args, "guard", run)
    if args.action == "eval":
        result = evaluate(args.model, args.data)
        print(json.dumps(result) if args.json else format_eval(result))
        return 0
    text = Path(args.file).read_text() if args.file else sys.stdin.read()
    if not text.strip():
        raise ValueError(f"{args.file or 'standard input'}: empty; give a conversation to classify")
    try:
        messages = json.loads(text)
        if not isinstance(messages, list):
            raise ValueError
    except ValueError:
        messages = [{"role": "user", "content": text.strip()}]
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError("input must be a JSON list of {role, content} messages, or plain text")
    guard = Guard.load(args.model, args.threshold)
    r = guard.check_batch([messages])[0]
    if args.json:
        print(json.dumps({"unsafe": r.unsafe, "score": r.score, "categories": r.categories}))
    else:
        print(("unsafe" if r.unsafe else "safe") + (f" {','.join(r.categories)}" if r.categories else "")
              + f" (score {r.score:.3f})")
    return 0
