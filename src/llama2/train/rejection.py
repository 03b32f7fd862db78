"""``llama2 rejection-sample``: rejection sampling fine-tuning (paper §3.2.3).

Each iteration samples K answers per prompt from the latest policy, scores them with the
reward models through the same safety-gated reward as PPO (Rc = Rs if the prompt is a safety
prompt or Rs < 0.15, else Rh), keeps the best, and fine-tunes on the kept answers like SFT.
A pool remembers the best answer of every prompt over ALL iterations, and by default the
fine-tuning uses the pool: the paper found that training only on the last iteration's
samples caused regressions. ``--selection checker`` keeps instead the best-rewarded sample the
bundled world's checker calls right: a gold-reward ablation, the most any reward model could
give rejection sampling. Writes ``reward_vs_k.json``: the mean and max reward among the
first k samples, for k up to K (the shape of the paper's Figure 7).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from llama2.checkpoint import load_model, load_tokenizer
from llama2.data.chat_data import tokenize_conversation
from llama2.data.world import World
from llama2.data.world.annotator import Annotator
from llama2.recipe import add_config_args, setting
from llama2.scoring import RewardScorer, load_rl_prompts, sample_answers
from llama2.train.finetune import NO_VALIDATION, FinetuneConfig, finetune, refuse_validation, stage_main
from llama2.train.state import check_resume
from llama2.utils import default_device, log_to_stderr


@dataclass
class RejectionConfig(FinetuneConfig):
    out: str = setting("runs/rejection", "run folder: iter-N/ (samples and fine-tuning), pool.jsonl, model/",
                       metavar="DIR")
    model: str = setting("runs/sft/model", "policy to sample from and fine-tune", metavar="DIR")
    reward_model: str = setting("runs/reward-helpfulness/model", "helpfulness reward model", metavar="DIR")
    safety_model: str = setting("runs/reward-safety/model", "safety reward model; empty: helpfulness only",
                                metavar="DIR")
    data: str = setting("", "prompts, JSONL {\"messages\"|\"prompt\", \"safety\": bool}; empty: the bundled world",
                        metavar="FILE")
    prompts: int = setting(1000, "prompts per iteration drawn from the bundled world when --data is empty")
    k: int = setting(10, "answers sampled per prompt (the paper's figures go up to 100)")
    temperature: float | None = setting(None, "sampling temperature; default 1.2 when k >= 10 (the best range for "
                                              "10-100 samples was 1.2-1.3, §3.2.3), else 1.0")
    top_p: float = setting(1.0, "nucleus sampling while exploring (1.0 = off)")
    max_new_tokens: int = setting(128, "longest sampled answer")
    iterations: int = setting(1, "rounds of sample -> select -> fine-tune")
    pool: Literal["all", "last"] = setting("all", "train on the best answer per prompt over all iterations (§3.2.3) "
                                                  "or over the last one only")
    safety_threshold: float = setting(0.15, "Rs below this makes the safety reward decide (§3.2.3)")
    selection: Literal["reward", "checker"] = setting(
        "reward", "the sample kept per prompt: the reward models' best (§3.2.3), or the best-rewarded one the "
                  "bundled world's checker calls right, prompts with none skipped (a gold-reward ablation: the most "
                  "any reward model could give)")
    epochs: int = setting(2, "fine-tuning passes over the selected answers")
    world_seed: int = setting(0, "seed of the bundled assistant world")

    eval_every: int = setting(0, NO_VALIDATION)
    eval_batches: int = setting(0, NO_VALIDATION)

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_validation(self, "rejection sampling")
        if self.k < 1 or self.iterations < 1:
            raise ValueError(f"k and iterations must be >= 1, got k={self.k}, iterations={self.iterations}")
        if self.temperature is None:
            self.temperature = 1.2 if self.k >= 10 else 1.0
        if self.selection == "checker" and self.data:
            raise ValueError(f"--selection checker needs the bundled world's prompts (its checker), not --data "
                             f"{self.data}")


def load_prompts(cfg: RejectionConfig) -> list[dict]:
    """Rows {"messages", "safety"}: the dialogue to answer and is_safety(prompt)."""
    return load_rl_prompts(cfg.data, cfg.prompts, cfg.world_seed)


def reward_vs_k(rewards: list[list[float]]) -> dict:
    """Mean over prompts of the max and of the mean reward among the first k samples (Figure 7)."""
    K = min((len(r) for r in rewards if r), default=0)
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 100, K) if 1 <= k <= K})
    rows = [r for r in rewards if len(r) >= K]
    return {
        "k": ks,
        "max": [statistics.fmean(max(r[:k]) for r in rows) for k in ks],
        "mean": [statistics.fmean(statistics.fmean(r[:k]) for r in rows) for k in ks],
        "prompts": len(rows),
    }


def sample_iteration(cfg: RejectionConfig, policy_dir: str, prompts: list[dict], iteration: int, log) -> list[dict]:
    """K scored samples per prompt from ``policy_dir``; cached in iter-N/samples.jsonl."""
    folder = Path(cfg.out) / f"iter-{iteration}"
    cache = folder / "samples.jsonl"
    if cache.is_file():
        log(f"iteration {iteration}: reusing {cache}")
        return [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    model = load_model(policy_dir, device=default_device())
    tok = load_tokenizer(policy_dir, model.config.vocab_size)

    total = len(prompts) * cfg.k
    with tqdm(total=total, desc=f"sampling K={cfg.k}", unit="answer", disable=None) as bar:
        answers = sample_answers(model, tok, [p["messages"] for p in prompts], cfg.k, cfg.temperature, cfg.top_p,
                                 cfg.max_new_tokens, seed=cfg.seed + iteration, progress=bar.update)
    del model
    scorer = RewardScorer(cfg.reward_model, cfg.safety_model or None, device=default_device())
    flat = [(i, a) for i, ans in enumerate(answers) for a in ans]
    scores = scorer.combined([prompts[i]["messages"] for i, _ in flat], [a for _, a in flat],
                             [prompts[i]["safety"] for i, _ in flat], cfg.safety_threshold)
    rows = [{"messages": p["messages"], "safety": p["safety"], "answers": [], "rewards": [], "iteration": iteration}
            for p in prompts]
    for j, (i, a) in enumerate(flat):
        rows[i]["answers"].append(a)
        rows[i]["rewards"].append(float(scores["combined"][j]))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, cache)
    return rows


def best_index(rewards: list[float], right: list[bool] | None = None) -> int | None:
    """The sample rejection sampling keeps: the highest reward (the first of ties); given the
    checker's verdicts ``right``, the highest-rewarded right one, None when none is right."""
    candidates = [i for i in range(len(rewards)) if right is None or right[i]]
    return max(candidates, key=rewards.__getitem__) if candidates else None


def checker_verdicts(rows: list[dict], world) -> list[list[bool]]:
    """The world's checker on every sample of every row (right or not)."""
    return [[bool(world.judge(r["messages"], a)) for a in r["answers"]] for r in rows]


def checker_rates(rows: list[dict], verdicts: list[list[bool]]) -> dict:
    """On bundled-world prompts, how often the world's checker calls an answer right: one sample,
    the reward models' pick and the best of K (an oracle), for helpfulness and safety prompts. If
    the pick is no better than one sample, the reward models do not see what is wrong."""
    out = {}
    for name, safety in (("helpfulness", False), ("safety", True)):
        group = [(r, v) for r, v in zip(rows, verdicts) if r["safety"] == safety and r["answers"]]
        if not group:
            continue
        picks = [v[best_index(r["rewards"])] for r, v in group]
        out[name] = {"sample": statistics.fmean(statistics.fmean(v) for _, v in group),
                     "selected": statistics.fmean(picks), "oracle": statistics.fmean(any(v) for _, v in group),
                     "prompts": len(group)}
    return out


def annotator_rates(rows: list[dict], annotator: Annotator, seed: int = 0) -> dict:
    """The world's annotator (the paper's human raters) on the reward models' pick, for
    helpfulness and safety prompts: how often the pick is among the answers the annotator rates
    best of the K (``pick_top``) against a sample drawn at random (``random_top``, its expected
    value), and the pick judged head to head against one random sample of the same K
    (``pick_vs_random``: win / tie / loss). §3.2.3's bet is that the reward models rank a policy's
    own answers the way the raters would; if the pick is no more often the raters' best than a
    random sample, rejection sampling has nothing to teach."""
    rng = random.Random(seed)
    out = {}
    for name, safety in (("helpfulness", False), ("safety", True)):
        counts = {"win": 0, "tie": 0, "loss": 0}
        pick_top = random_top = 0.0
        n = 0
        for r in rows:
            if r["safety"] != safety or not r["answers"]:
                continue
            rubrics = [annotator.rubric(r["messages"], a) for a in r["answers"]]
            if any(x is None for x in rubrics):
                continue  # not one of the world's prompts (--data): nothing to judge by
            scores = [x.score for x in rubrics]
            top = max(scores)
            pick, other = best_index(r["rewards"]), rng.randrange(len(r["answers"]))
            n += 1
            pick_top += scores[pick] == top
            random_top += scores.count(top) / len(scores)
            j = annotator.compare(r["messages"], r["answers"][pick], r["answers"][other])
            counts[j.outcome(safety)] += 1
        if n:
            out[name] = {"prompts": n, "pick_top": pick_top / n, "random_top": random_top / n,
                         "pick_vs_random": counts}
    return out


def update_pool(pool: dict[str, dict], rows: list[dict], verdicts: list[list[bool]] | None = None) -> None:
    """Keep, per prompt, the best-rewarded answer seen in any iteration (with ``verdicts``, the
    best-rewarded right one; a prompt with no right answer adds nothing)."""
    for i, r in enumerate(rows):
        if not r["answers"]:
            continue
        best = best_index(r["rewards"], verdicts[i] if verdicts is not None else None)
        if best is None:
            continue
        key = json.dumps(r["messages"], sort_keys=True)
        if key not in pool or r["rewards"][best] > pool[key]["reward"]:
            pool[key] = {"messages": r["messages"], "answer": r["answers"][best], "reward": r["rewards"][best],
                         "iteration": r["iteration"]}


def run(cfg: RejectionConfig, quiet: bool = False) -> dict:
    check_resume(Path(cfg.out) / "iter-1", cfg.resume)  # each iteration fine-tunes in OUT/iter-N; refused before sampling
    log = log_to_stderr(quiet)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(cfg)
    policy = cfg.model
    pool: dict[str, dict] = {}
    summary: dict = {"iterations": []}
    last: dict = {}
    for it in range(1, cfg.iterations + 1):
        rows = sample_iteration(cfg, policy, prompts, it, log)
        curve = reward_vs_k([r["rewards"] for r in rows])
        verdicts = None if cfg.data else checker_verdicts(rows, World(cfg.world_seed))
        if cfg.pool == "last":
            pool = {}
        update_pool(pool, rows, verdicts if cfg.selection == "checker" else None)
        if not pool:
            why = "was right by the world's checker (--selection checker)" if cfg.selection == "checker" else \
                "was sampled (every prompt too long for the context?)"
            raise ValueError(f"iteration {it}: no answer to any of the {len(rows)} prompts {why}; nothing to fine-tune on")
        (out / "pool.jsonl").write_text("".join(json.dumps(v) + "\n" for v in pool.values()))
        mean_best = statistics.fmean(v["reward"] for v in pool.values())
        log(f"iteration {it}: reward of 1 sample {curve['mean'][0]:.3f}, best of {cfg.k} {curve['max'][-1]:.3f}; "
            f"pool of {len(pool)} answers, mean reward {mean_best:.3f}")
        entry = {"iteration": it, "reward_vs_k": curve, "pool_size": len(pool), "pool_mean_reward": mean_best}
        if verdicts is not None:
            entry["checker"] = rates = checker_rates(rows, verdicts)
            log("right by the world's checker (one sample / reward models' pick / best of K): " + "; ".join(
                f"{name} {r['sample']:.1%} / {r['selected']:.1%} / {r['oracle']:.1%}" for name, r in rates.items()))
        if not cfg.data:
            entry["annotator"] = view = annotator_rates(rows, Annotator(World(cfg.world_seed)), cfg.seed + it)
            log("the annotator's best of K (reward models' pick / a random sample): " + "; ".join(
                f"{name} {v['pick_top']:.1%} / {v['random_top']:.1%} (pick vs random: "
                f"{v['pick_vs_random']['win']} win, {v['pick_vs_random']['tie']} tie, {v['pick_vs_random']['loss']} loss)"
                for name, v in view.items()))
        summary["iterations"].append(entry)
        tok = load_tokenizer(policy)
        examples = [tokenize_conversation(tok, v["messages"] + [{"role": "assistant", "content": v["answer"]}])
                    for v in pool.values() if v["answer"]]
        step_cfg = replace(cfg, out=str(out / f"iter-{it}"), model=policy)
        last = finetune(step_cfg, examples, [], tok, run_config=cfg, quiet=quiet)
        policy = str(out / f"iter-{it}" / "model")
    (out / "reward_vs_k.json").write_text(json.dumps(summary, indent=2) + "\n")
    final = out / "model"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(policy, final)
    log(f"rejection-sampling model written to {final}")
    return {**last, **summary}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Without --config the tiny recipe's rejection block applies "
                     "(src/llama2/resources/recipes/tiny.yaml).")
    add_config_args(parser, RejectionConfig)


def main(args: argparse.Namespace) -> int:
    return stage_main(RejectionConfig, args, "rejection", run, required=("model", "reward_model", "safety_model"))
