"""The stages of ``llama2 run``, in the order of the paper's pipeline (§2.2 pretraining, §3.1
SFT, §3.2.2 reward models, §3.2.3 rejection sampling then PPO, a second round of both on the
new policy's comparisons (RLHF-V1, V2, ...), DPO beside them, §3.3 GAtt, the Llama Guard
classifier, evaluation). The runner and the report both read them from here, and both recipes'
runners share :func:`run_stages`."""

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

STAGES = ("tokenizer", "data", "pretrain", "sft", "reward-helpfulness", "reward-safety", "rejection", "ppo",
          "reward-helpfulness-2", "reward-safety-2", "rejection-2", "ppo-2", "dpo", "gatt", "guard", "evaluate")
# Run only when the recipe has a block for them: the second round of §3.2.1's loop and DPO.
OPTIONAL = ("reward-helpfulness-2", "reward-safety-2", "rejection-2", "ppo-2", "dpo")
# Models evaluated on the assistant-world suite, in the order of the paper's pipeline.
EVALUATED = ("pretrain", "sft", "rejection", "ppo", "rejection-2", "ppo-2", "dpo", "gatt")
# Models set head to head against the SFT model (the paper's Figure 1 shape).
AGAINST_SFT = ("rejection", "ppo", "rejection-2", "ppo-2", "dpo", "gatt")

# `llama2 run code` (llama2.code_pipeline): Code Llama's recipe at tiny scale. Pretraining on code,
# continued with fill-in-the-middle (Code Llama §2.3), then long-context fine-tuning (§2.4).
CODE_STAGES = ("tokenizer", "data", "pretrain", "data-fim", "fim", "data-long", "long", "evaluate")
# Infilling is measured before FIM training (the base model), after it, and after the extension.
CODE_INFILL_EVALUATED = ("pretrain", "fim", "long")
# The passkey probe: before the long-context extension (the FIM model) and after it.
CODE_PASSKEY_EVALUATED = ("fim", "long")


# ---- the runner both recipes share ----------------------------------------------------------

@dataclass
class StageContext:
    """What every stage of a run gets: the run folder, the recipe and where to log."""

    out: Path
    recipe: dict
    log: Callable[[str], None]
    quiet: bool = False

    def folder(self, stage: str) -> Path:
        return self.out / stage

    def model(self, stage: str) -> str:
        return str(self.out / stage / "model")


def write_json(path: Path, obj) -> None:
    """Write a JSON file whole or not at all (a run killed mid-write leaves the old file or none)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def jsonable(obj):
    """``obj`` with whatever JSON cannot hold turned into strings (a stage's summary)."""
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if isinstance(obj, dict):
            return {str(k): jsonable(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [jsonable(v) for v in obj]
        return str(obj)


def fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run_stages(stages: Sequence[str], runners: Mapping[str, Callable], ctx, estimates: Mapping[str, float] | None = None,
               from_stage: str | None = None, until: str | None = None) -> None:
    """Run ``stages`` in order, each ``runners[stage](ctx)`` writing into ``ctx.folder(stage)``,
    which gets a ``.done.json`` marker with its wall time once the stage finished: a re-run skips
    marked stages, and an interrupted one resumes from its own checkpoints. ``from_stage``
    forgets that stage and every later one first; ``until`` stops after it. A ``ctx`` with a
    ``runs(stage)`` method skips the stages it says the recipe leaves out."""
    stages = tuple(stages)
    runs = getattr(ctx, "runs", lambda stage: True)
    if from_stage is not None:
        for stage in stages[stages.index(from_stage):]:
            if ctx.folder(stage).exists():
                shutil.rmtree(ctx.folder(stage))
    estimates = estimates or {}
    started = time.perf_counter()
    last = stages.index(until) if until else len(stages) - 1
    n = len(stages)
    for i, stage in enumerate(stages[: last + 1], 1):
        marker = ctx.folder(stage) / ".done.json"
        if not runs(stage):
            ctx.log(f"[{i}/{n}] {stage}: not in the recipe, skipped")
            continue
        if marker.is_file():
            took = json.loads(marker.read_text()).get("seconds", 0)
            ctx.log(f"[{i}/{n}] {stage}: done ({fmt_seconds(took)}), skipped")
            continue
        left = sum(estimates.get(s, 0) for s in stages[i - 1: last + 1] if runs(s))
        eta = f", about {fmt_seconds(left)} left" if left else ""
        doc = (runners[stage].__doc__ or "").splitlines()
        ctx.log(f"\n[{i}/{n}] {stage} — {doc[0] if doc else ''} "
                f"(elapsed {fmt_seconds(time.perf_counter() - started)}{eta})")
        t0 = time.perf_counter()
        summary = runners[stage](ctx) or {}
        seconds = time.perf_counter() - t0
        ctx.folder(stage).mkdir(parents=True, exist_ok=True)
        write_json(marker, {"stage": stage, "seconds": seconds, "summary": jsonable(summary)})
        ctx.log(f"[{i}/{n}] {stage}: finished in {fmt_seconds(seconds)}")
