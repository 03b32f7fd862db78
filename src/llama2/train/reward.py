"""``llama2 reward train|eval``: helpfulness and safety reward models (paper §3.2.2).

Each reward model starts from the chat model; its next-token head is replaced by a scalar
regression head read at the answer's last token (its EOS). Training minimises the binary
ranking loss with a margin that grows with how distinct the two answers were rated
(Table 27), chosen and rejected going through the model in one batched forward pass. The
two models see different mixtures of data (§3.2.2): the Helpfulness RM all helpfulness
pairs plus as many safety pairs, the Safety RM all safety pairs plus 10% helpfulness. As
the paper collects its preferences on samples of the latest models (§3.2.1),
``--policy-prompts`` adds pairs on the starting chat model's own answers, the bundled world's
checker playing the annotator.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from llama2.checkpoint import hf, load_model, load_scalar_model, load_tokenizer, save_scalar_model
from llama2.data.preference import RATINGS, PairDataset, load_pairs, mix, parse_pair
from llama2.data.world import World, write_jsonl
from llama2.model.heads import ScalarModel
from llama2.recipe import add_config_args, dump_recipe, load_config, setting
from llama2.scoring import sample_answers, score_answers
from llama2.train.core import TrainConfig, grad_accum_steps, init_distributed
from llama2.train.finetune import train_and_export
from llama2.train.rlhf import centering_penalty, ranking_loss
from llama2.train.state import check_resume
from llama2.utils import log_to_stderr, read_jsonl

SAFETY_THRESHOLD = 0.15  # §3.2.3: precision 0.89 / recall 0.55 on Meta Safety


@dataclass
class RewardConfig(TrainConfig):
    """Defaults are the paper's (§3.2.2): 1 epoch, max LR 1e-5 (5e-6 for 70B), cosine to 10%,
    warmup 3% of the steps (at least 5), 512 pairs per batch."""

    kind: Literal["helpfulness", "safety"] = setting("helpfulness", "which reward model to train")
    out: str = setting("", "run folder (default: runs/reward-KIND)", metavar="DIR")
    model: str = setting("runs/sft/model", "chat model directory to initialise from", metavar="DIR")
    data: str = setting("", "helpfulness pairs, JSONL {prompt|messages, chosen, rejected, rating[, safety, "
                            "margin]}; empty: the bundled assistant world", metavar="FILE")
    safety_data: str = setting("", "safety pairs, JSONL (same format); empty: the bundled world", metavar="FILE")
    val_data: str = setting("", "held-out pairs for the validation loss; empty: the bundled world's", metavar="FILE")
    mixing: bool = setting(True, "mix the two kinds of data as §3.2.2 does; off: train on the kind's own data only")
    margin: Literal["none", "small", "large"] = setting("small", "margin table m(rating) of Table 27")
    center_rewards: float = setting(0.0, "weight of a (r_chosen + r_rejected)^2 penalty that keeps scores "
                                         "centred at 0, so thresholds on sigmoid(score) mean something "
                                         "(not in the paper; TRL's center_rewards_coefficient, e.g. 0.01)")
    max_len: int = setting(4096, "longest dialogue + answer in tokens (the end is kept)")
    epochs: int = setting(1, "passes over the data (§3.2.2: 1); sets max_steps unless max_steps is given")
    max_steps: int = setting(0, "optimizer steps; 0 = epochs x steps per epoch")
    batch_size: int = setting(512, "pairs per optimizer step (§3.2.2: 512)")
    lr: float = setting(1e-5, "peak learning rate (§3.2.2: 1e-5; 5e-6 for 70B)")
    warmup_fraction: float = setting(0.03, "warmup as a share of the steps (§3.2.2: 3%, at least 5 steps), "
                                           "unless warmup_steps is given")
    warmup_steps: int | None = setting(None, "linear warmup steps; default: warmup_fraction of the steps, at "
                                             "least 5 (§3.2.2)")
    eval_every: int = setting(50, "validation every N steps (and at the start and end); 0 = never")
    eval_batches: int = setting(8, "micro-batches per validation")
    save_every: int = setting(200, "checkpoint every N steps (and at the end)")
    world_pairs: int = setting(4000, "pairs of each kind drawn from the bundled world when no data is given")
    policy_prompts: int = setting(0, "prompts of this model's kind (tasks for helpfulness, unsafe and look-alike "
                                     "requests for safety) from the bundled world, answered --policy-samples times "
                                     "by the starting chat model; the world's annotator compares every two distinct "
                                     "answers and each pair it does not call a tie becomes a comparison at its "
                                     "rating level (§3.2.1: preferences on the current model's samples); 0 = off")
    earlier_samples: str = setting("", "policy_samples.jsonl files of earlier rounds (commas), labelled by the "
                                       "annotator and added: each round's reward models train on all comparisons "
                                       "collected so far (§3.2.1, RLHF-V1...V5)", metavar="FILES")
    policy_samples: int = setting(4, "answers sampled per prompt for --policy-prompts")
    policy_temperature: float = setting(1.0, "sampling temperature for --policy-prompts")
    world_seed: int = setting(0, "seed of the bundled assistant world")

    def __post_init__(self) -> None:
        if not self.out:
            self.out = f"runs/reward-{self.kind}"
        if self.center_rewards < 0:
            raise ValueError(f"center_rewards must be >= 0, got {self.center_rewards}")
        if self.policy_temperature < 0:
            raise ValueError(f"policy_temperature must be >= 0, got {self.policy_temperature}")
        if self.policy_prompts < 0 or self.policy_samples < 2:
            raise ValueError(f"policy_prompts must be >= 0 and policy_samples >= 2, got {self.policy_prompts} and "
                             f"{self.policy_samples}")
        super().__post_init__()


def pair_loss(model, batch: dict, center_rewards: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Margin ranking loss (plus ``center_rewards`` x the centering penalty); rows are
    [chosen..., rejected...] scored in one forward pass."""
    values = model(batch["tokens"])
    r = values.gather(1, (batch["lengths"] - 1).unsqueeze(1)).squeeze(1)
    n = r.shape[0] // 2
    loss = ranking_loss(r[:n], r[n:], batch["margin"])
    if center_rewards:
        loss = loss + center_rewards * centering_penalty(r[:n], r[n:])
    return loss, {"accuracy": (r[:n] > r[n:]).float().mean().detach(), "ntokens": batch["lengths"].sum()}


POLICY_MAX_NEW_TOKENS = 64  # the world's answers are one sentence


def own_answer_pairs(cfg: RewardConfig, lm, tokenizer, log=print, write: bool = True) -> list[dict]:
    """Preference rows on the starting model's own answers to train prompts of the model's kind,
    labelled by the bundled world's checker; the samples are kept in ``OUT/policy_samples.jsonl``."""
    cache = Path(cfg.out) / "policy_samples.jsonl"
    world = World(cfg.world_seed)
    if cache.is_file():
        log(f"reusing {cache}")
        samples = [obj for _, obj in read_jsonl(cache)]
    else:
        kinds = ("task", "constrained") if cfg.kind == "helpfulness" else ("unsafe", "benign")
        prompts = [r["messages"] for r in world.rl_prompts("train", cfg.policy_prompts, kinds=kinds)]
        with tqdm(total=len(prompts) * cfg.policy_samples, desc="sampling the policy", unit="answer",
                  disable=None if cfg.progress else True) as bar:
            answers = sample_answers(lm, tokenizer, prompts, cfg.policy_samples, cfg.policy_temperature,
                                     max_new_tokens=POLICY_MAX_NEW_TOKENS, seed=cfg.seed, progress=bar.update)
        samples = [{"messages": p, "answers": a, "right": [bool(world.judge(p, x)) for x in a]}
                   for p, a in zip(prompts, answers)]
        if write:
            tmp = write_jsonl(cache.with_suffix(".tmp"), samples)
            os.replace(tmp, cache)
    rows = world.annotate_samples([s["messages"] for s in samples], [s["answers"] for s in samples],
                                  safety=cfg.kind == "safety")
    right = sum(sum(s["right"]) for s in samples)
    log(f"policy samples: {right}/{sum(len(s['answers']) for s in samples)} right; {len(rows)} pairs from "
        f"{len(samples)} prompts")
    return rows + earlier_pairs(cfg, world, log)


def earlier_pairs(cfg: RewardConfig, world: World, log=print) -> list[dict]:
    """Comparisons of the earlier rounds' policy samples (``--earlier-samples``), labelled by the
    annotator as this round's are."""
    rows: list[dict] = []
    for file in filter(None, (f.strip() for f in cfg.earlier_samples.split(","))):
        samples = [obj for _, obj in read_jsonl(file)]
        rows += world.annotate_samples([s["messages"] for s in samples], [s["answers"] for s in samples],
                                       safety=cfg.kind == "safety")
        log(f"earlier round {file}: {len(rows)} pairs so far")
    return rows


def load_training_pairs(cfg: RewardConfig, policy_rows: list[dict] = ()):
    """(train, val) pairs: the given files or the bundled world's, plus ``policy_rows`` added to
    the data of the model's own kind, then §3.2.2's mixing."""
    def bundled(kind: str, split: str, n: int):
        return [parse_pair(r) for r in World(cfg.world_seed).preference_pairs(split, n, kind)]

    helpful = load_pairs(cfg.data) if cfg.data else bundled("helpfulness", "train", cfg.world_pairs)
    safety = load_pairs(cfg.safety_data) if cfg.safety_data else bundled("safety", "train", cfg.world_pairs)
    own = [parse_pair(r) for r in policy_rows]
    if cfg.kind == "helpfulness":
        helpful = helpful + own
    else:
        safety = safety + own
    if cfg.mixing:
        train = mix(helpful, safety, cfg.kind, cfg.seed)
    else:
        train = helpful if cfg.kind == "helpfulness" else safety
    val = load_pairs(cfg.val_data) if cfg.val_data else bundled(cfg.kind, "val", max(64, cfg.world_pairs // 20))
    return train, val


def run(cfg: RewardConfig, quiet: bool = False) -> dict:
    check_resume(cfg.out, cfg.resume)  # refused before sampling the policy
    log = log_to_stderr(quiet)
    info = init_distributed()
    grad_accum_steps(cfg.batch_size, cfg.micro_batch_size, info.world_size)  # fail before loading anything
    lm = load_model(cfg.model, device=info.device)  # the own-answer samples are drawn on the GPU too
    tokenizer = load_tokenizer(cfg.model, lm.config.vocab_size)
    # Every rank samples the same (seeded) answers; only the main one writes the cache.
    own = (own_answer_pairs(cfg, lm, tokenizer, log, write=info.is_main) if cfg.policy_prompts
           else earlier_pairs(cfg, World(cfg.world_seed), log))
    model = ScalarModel.from_language_model(lm, seed=cfg.seed)
    del lm
    train, val = load_training_pairs(cfg, own)
    if info.is_main:  # the comparisons as trained on: DPO (llama2 dpo --data) learns from the same
        tmp = write_jsonl(Path(cfg.out) / "train_pairs.jsonl.tmp", [dataclasses.asdict(p) for p in train])
        os.replace(tmp, Path(cfg.out) / "train_pairs.jsonl")
    data = PairDataset(train, tokenizer, cfg.margin, cfg.max_len, name="preference pairs")
    n_safety = sum(p.safety for p in train)

    def describe(cfg: RewardConfig) -> str:
        return (f"{cfg.kind} reward model from {cfg.model}: {len(train):,} pairs ({n_safety:,} safety, {len(own):,} "
                f"on the model's own answers), margin table {cfg.margin!r}, {cfg.max_steps} steps of "
                f"{cfg.batch_size} pairs")

    last, path = train_and_export(cfg, model, functools.partial(pair_loss, center_rewards=cfg.center_rewards),
                                  data, PairDataset(val, tokenizer, cfg.margin, cfg.max_len), tokenizer, info=info,
                                  describe=describe,
                                  warmup_fraction=cfg.warmup_fraction if cfg.warmup_steps is None else None,
                                  save=save_scalar_model, quiet=quiet, reward_kind=cfg.kind)
    if info.is_main:
        # The report's Table 8: the given validation file, else 400 held-out test pairs of the world
        # (the small validation draw above only tracks the loss).
        result = evaluate(path, val if cfg.val_data else None, kind=cfg.kind, world_seed=cfg.world_seed)
        (Path(cfg.out) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        log(format_eval(result))
    log(f"reward model written to {path}")
    return last


# ---- evaluation (Table 8) ---------------------------------------------------------------------

def evaluate(model_dir: str | Path, pairs=None, kind: str | None = None, split: str = "test",
             threshold: float = SAFETY_THRESHOLD, n: int = 400, world_seed: int = 0) -> dict:
    """Accuracy (chosen scored above rejected) overall and per rating level; for safety models,
    precision/recall of ``sigmoid(score) < threshold`` as a detector of unsafe answers."""
    model = load_scalar_model(model_dir)
    kind = kind or hf.read_config(Path(model_dir)).get("reward_kind", "helpfulness")
    if pairs is None:
        pairs = [parse_pair(r) for r in World(world_seed).preference_pairs(split, n, kind)]
    tok = load_tokenizer(model_dir, model.config.vocab_size)
    prompts = [p.messages for p in pairs]
    chosen = score_answers(model, tok, prompts, [p.chosen for p in pairs])
    rejected = score_answers(model, tok, prompts, [p.rejected for p in pairs])
    correct = (chosen > rejected).tolist()
    by_rating: dict[str, list[bool]] = defaultdict(list)
    for p, ok in zip(pairs, correct):
        by_rating[p.rating].append(ok)
    result = {
        "kind": kind,
        "pairs": len(pairs),
        "accuracy": sum(correct) / max(1, len(correct)),
        "accuracy_by_rating": {r: sum(v) / len(v) for r in RATINGS if (v := by_rating.get(r))},
        "pairs_by_rating": {r: len(by_rating[r]) for r in RATINGS if r in by_rating},
    }
    labelled = [(p, c, r) for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist())
                if p.safety_label and kind == "safety"]
    if labelled:
        # Each answer is unsafe or not by its pair's label; the detector flags sigmoid(score) < threshold.
        truth, flagged = [], []
        for p, c, r in labelled:
            for score, unsafe in ((c, p.safety_label == "neither_safe"), (r, p.safety_label != "both_safe")):
                truth.append(unsafe)
                flagged.append(torch.sigmoid(torch.tensor(score)).item() < threshold)
        tp = sum(t and f for t, f in zip(truth, flagged))
        result["unsafe_detection"] = {
            "threshold": threshold,
            "precision": tp / max(1, sum(flagged)),
            "recall": tp / max(1, sum(truth)),
            "answers": len(truth),
        }
    return result


def format_eval(result: dict) -> str:
    lines = [f"{result['kind']} reward model: accuracy {result['accuracy']:.1%} on {result['pairs']} pairs"]
    for rating, acc in result["accuracy_by_rating"].items():
        lines.append(f"  {rating.replace('_', ' '):<20} {acc:6.1%}  ({result['pairs_by_rating'][rating]} pairs)")
    if "unsafe_detection" in result:
        d = result["unsafe_detection"]
        lines.append(f"  unsafe answers flagged by score < {d['threshold']}: precision {d['precision']:.2f}, "
                     f"recall {d['recall']:.2f}")
    return "\n".join(lines)


# ---- CLI ---------------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train a helpfulness or safety reward model",
                           description="Train a reward model (§3.2.2). Without --config the tiny recipe's "
                                       "reward-KIND block (tiny.yaml) applies.")
    add_config_args(train, RewardConfig)
    ev = sub.add_parser("eval", help="accuracy by rating level on held-out pairs (Table 8)")
    ev.add_argument("--model", required=True, metavar="DIR", help="reward model directory")
    ev.add_argument("--data", metavar="FILE", help="held-out pairs, JSONL (default: the bundled world's test "
                                                   "pairs of the model's kind)")
    ev.add_argument("--threshold", type=float, default=SAFETY_THRESHOLD,
                    help="safety score below which an answer counts as flagged unsafe (default 0.15, §3.2.3)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    if args.action == "eval":
        pairs = load_pairs(args.data) if args.data else None
        result = evaluate(args.model, pairs, threshold=args.threshold)
        print(json.dumps(result) if args.json else format_eval(result))
        return 0
    kind = load_config(RewardConfig, args).kind  # --kind picks the tiny recipe's block
    cfg = load_config(RewardConfig, args, stage=f"reward-{kind}")
    if getattr(args, "print_config", False):
        print(dump_recipe(cfg), end="")
        return 0
    if not Path(cfg.model).exists():
        raise FileNotFoundError(f"{cfg.model}: no chat model to start from (run `llama2 sft` or pass --model)")
    run(cfg)
    return 0
