"""``llama2 run``: the whole Llama 2 recipe, stage after stage, with a report.

tokenizer -> data -> pretrain -> sft -> reward-helpfulness, reward-safety -> rejection -> ppo
-> gatt -> guard -> evaluate. Each stage writes its own run folder under ``--out`` (the same
folder the stage's own command would write) and, once finished, a ``.done.json`` marker
with its wall time; re-running skips finished stages, and an interrupted stage resumes from
its last checkpoint. Every random draw of a stage comes from the recipe's seed, never from what
an earlier stage or process left in a global generator, so a run interrupted anywhere (Ctrl-C,
a killed process) and re-run ends with the same models and report as one that never stopped
(on CPU, bit for bit; tests/test_resume.py). The final chat model is copied to ``OUT/chat``;
``OUT/report.md`` and ``OUT/report.html`` show what every stage did.

A recipe is a plain YAML file: ``stages:`` maps each stage to the fields of its config (the
same fields as the stage's command-line flags: :data:`STAGE_CONFIGS`); paths between stages are
filled in here. Every block is checked against its config when the recipe is read, so a typo
fails in one line naming the stage and the key before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llama2.checkpoint import load_model, load_tokenizer
from llama2.commands import tokenizer as tokenizer_command
from llama2.commands.tokenizer import TokenizerConfig
from llama2.corpus import default_corpus_files
from llama2.data.shards import PrepareConfig, prepare_from_config
from llama2.data.world import World
from llama2.eval import cli as evaluate_command
from llama2.eval.cli import EvaluateConfig, chat_generate_fn
from llama2.recipe import from_dict, merge_recipes, read_recipe, stage_settings
from llama2.stages import EVALUATED, STAGES
from llama2.train import distill, gatt, guard, ppo, pretrain, rejection, reward, sft
from llama2.utils import default_device

RECIPES_DIR = Path(__file__).resolve().parent / "resources" / "recipes"
# The config of each stage: the fields its recipe block may set (those of its command's flags).
STAGE_CONFIGS: dict[str, type] = {
    "tokenizer": TokenizerConfig,
    "data": PrepareConfig,
    "pretrain": pretrain.PretrainConfig,
    "sft": sft.SFTConfig,
    "reward-helpfulness": reward.RewardConfig,
    "reward-safety": reward.RewardConfig,
    "rejection": rejection.RejectionConfig,
    "ppo": ppo.PPOConfig,
    "gatt": gatt.GAttConfig,
    "guard": guard.GuardConfig,
    "evaluate": EvaluateConfig,
}
# Commands that `llama2 run` does not chain; a recipe's ``standalone:`` block holds their settings
# (tiny.yaml's are what they use without --config).
STANDALONE_CONFIGS: dict[str, type] = {"safety-distill": distill.DistillConfig}


def find_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():  # a folder named like a recipe (a run's out) is not one
        if not p.is_file():
            raise FileNotFoundError(f"recipe file not found: {p}")
        return p
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(f.stem for f in RECIPES_DIR.glob("*.yaml")))
        raise ValueError(f"unknown recipe {name_or_path!r}; built-in recipes: {known} (or give a YAML file)")
    return candidate


def read_pipeline_recipe(path: Path) -> dict:
    """The recipe at ``path``, every stage's block checked against the stage's config. A recipe
    with ``extends: NAME`` is that recipe with its own fields laid over it (stage blocks merged
    key by key), e.g. tiny-lora: the tiny recipe with LoRA in every fine-tuning stage."""
    recipe = read_recipe(path)
    if "extends" in recipe:
        parent_name = recipe.pop("extends")
        parent_path = find_recipe(str(parent_name))
        if parent_path.resolve() == Path(path).resolve():
            raise ValueError(f"{path}: a recipe cannot extend itself")
        parent = read_pipeline_recipe(parent_path)
        parent.pop("estimated_seconds", None)  # the parent's timings are not this recipe's
        recipe = merge_recipes(parent, recipe)
    stages = recipe.get("stages") or {}
    if not stages:  # every stage on its command's defaults does not chain (e.g. vocabulary sizes)
        raise ValueError(f"{path}: the recipe lists no stages (the built-in tiny recipe shows the shape: "
                         f"src/llama2/resources/recipes/tiny.yaml)")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"{path}: unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    extra = sorted(set(recipe) - {"name", "description", "seed", "stages", "standalone", "estimated_seconds"})
    if extra:
        raise ValueError(f"{path}: unknown field(s) {', '.join(extra)}")
    standalone = recipe.get("standalone") or {}
    unknown = sorted(set(standalone) - set(STANDALONE_CONFIGS))
    if unknown:
        raise ValueError(f"{path}: unknown standalone stage(s) {', '.join(unknown)}; they are "
                         f"{', '.join(STANDALONE_CONFIGS)}")
    for stage, cls in [*STAGE_CONFIGS.items(), *STANDALONE_CONFIGS.items()]:
        if stage in stages or stage in standalone:
            from_dict(cls, stage_settings(recipe, stage, cls), f"{path}: stage {stage!r}")
    return recipe


@dataclass
class Context:
    out: Path
    recipe: dict
    log: Callable[[str], None]

    def folder(self, stage: str) -> Path:
        return self.out / stage

    def model(self, stage: str) -> str:
        return str(self.out / stage / "model")


def _config(cls, ctx: Context, stage: str, **paths):
    """The stage's config: recipe settings (the recipe's seed as the stage's seed and world
    seed), then the paths the pipeline wires between stages."""
    return from_dict(cls, {**stage_settings(ctx.recipe, stage, cls), **paths}, f"recipe stage {stage!r}")


# ---- the stages -------------------------------------------------------------------------------

def stage_tokenizer(ctx: Context) -> dict:
    """A SentencePiece BPE tokenizer with Llama 2's settings on the corpus and the world's text."""
    cfg = _config(TokenizerConfig, ctx, "tokenizer")
    tok = tokenizer_command.train(cfg, default_corpus_files(), ctx.folder("tokenizer"))
    return {"vocab_size": tok.vocab_size}


def stage_data(ctx: Context) -> dict:
    """Token shards of the corpus plus the world's fact sheet (the base model's 'knowledge')."""
    cfg = _config(PrepareConfig, ctx, "data")
    index = prepare_from_config(cfg, default_corpus_files(), ctx.folder("tokenizer") / "tokenizer.model",
                                ctx.folder("data"), log=ctx.log)
    return {"tokens": index["tokens"]}


def stage_pretrain(ctx: Context) -> dict:
    """Pretraining on the token shards (§2.2)."""
    cfg = _config(pretrain.PretrainConfig, ctx, "pretrain", out=str(ctx.folder("pretrain")),
                  data=str(ctx.folder("data")))
    return pretrain.run(cfg)


def stage_sft(ctx: Context) -> dict:
    """Supervised fine-tuning on the assistant world (§3.1)."""
    return sft.run(_config(sft.SFTConfig, ctx, "sft", out=str(ctx.folder("sft")), model=ctx.model("pretrain")))


def _reward(kind: str):
    def run(ctx: Context) -> dict:
        stage = f"reward-{kind}"
        cfg = _config(reward.RewardConfig, ctx, stage, kind=kind, out=str(ctx.folder(stage)), model=ctx.model("sft"))
        return reward.run(cfg)
    run.__doc__ = f"The {kind} reward model (§3.2.2)."
    return run


def stage_rejection(ctx: Context) -> dict:
    """Rejection sampling: best of K answers under the reward models (§3.2.3)."""
    cfg = _config(rejection.RejectionConfig, ctx, "rejection", out=str(ctx.folder("rejection")),
                  model=ctx.model("sft"), reward_model=ctx.model("reward-helpfulness"),
                  safety_model=ctx.model("reward-safety"))
    return rejection.run(cfg)


def stage_ppo(ctx: Context) -> dict:
    """PPO with the safety-gated reward and a KL penalty (§3.2.3)."""
    cfg = _config(ppo.PPOConfig, ctx, "ppo", out=str(ctx.folder("ppo")), model=ctx.model("rejection"),
                  reward_model=ctx.model("reward-helpfulness"), safety_model=ctx.model("reward-safety"))
    return ppo.run(cfg)


def stage_gatt(ctx: Context) -> dict:
    """Ghost Attention for multi-turn system instructions (§3.3)."""
    result = gatt.run(_config(gatt.GAttConfig, ctx, "gatt", out=str(ctx.folder("gatt")), model=ctx.model("ppo")))
    chat = ctx.out / "chat"
    if chat.exists():
        shutil.rmtree(chat)
    shutil.copytree(ctx.model("gatt"), chat)
    return result


def stage_guard(ctx: Context) -> dict:
    """A Llama Guard-style safety classifier."""
    cfg = _config(guard.GuardConfig, ctx, "guard", out=str(ctx.folder("guard")), model=ctx.model("sft"))
    return guard.run(cfg)


def _file_stamp(path: Path) -> str | None:
    return f"{path.stat().st_size}:{path.stat().st_mtime_ns}" if path.is_file() else None


def _weights_stamp(model: Path) -> str | None:
    """Size and time of a model's weights: a model directory's, or a LoRA adapter's (whose base
    is an earlier stage's model, stamped with it)."""
    if (model / "adapter_model.safetensors").is_file():
        return _file_stamp(model / "adapter_model.safetensors")
    return _file_stamp(model / "model.safetensors")


def stage_evaluate(ctx: Context) -> dict:
    """The assistant-world suite on every stage's model (cached per model), then the report."""
    cfg = _config(EvaluateConfig, ctx, "evaluate")
    seed = cfg.world_seed
    # The held-out reward depends on the reward models too: a cached result counts only if they
    # are the same files (re-running the reward stages re-evaluates every model) and it asked
    # this run's world.
    stamp = {stage: _weights_stamp(Path(ctx.model(stage))) for stage in ("reward-helpfulness", "reward-safety")}
    results = {}
    for stage in EVALUATED:
        cache = ctx.folder(stage) / "eval.json"
        if cache.is_file():
            cached = json.loads(cache.read_text())
            if cached.get("reward_models") == stamp and cached.get("world_seed", 0) == seed:
                results[stage] = cached
                continue
        ctx.log(f"evaluating {stage} model on the assistant world ...")
        results[stage] = evaluate_command.evaluate_model(
            ctx.model(stage), reward_model=ctx.model("reward-helpfulness"), safety_model=ctx.model("reward-safety"),
            **dataclasses.asdict(cfg))
        results[stage]["reward_models"] = stamp
        results[stage]["world_seed"] = seed
        _write_json(cache, results[stage])  # read back on resume: never half-written
    folder = ctx.folder("evaluate")
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "results.json", results)
    _write_json(folder / "samples.json", sample_conversations(ctx))
    keep = ("task_accuracy", "safe_refusal_rate", "false_refusal_rate", "combined_reward")
    return {stage: {k: v for k, v in r.items() if k in keep}
            for stage, r in results.items()}


def sample_conversations(ctx: Context, n_per_kind: int = 1) -> list[dict]:
    """A few held-out prompts (a task, an unsafe request, a benign look-alike, a constrained
    third turn) answered greedily by every stage's model, for the report."""
    world = World(ctx.recipe.get("seed", 0))
    prompts = []
    for kind in ("task", "unsafe", "benign"):
        prompts += [item.messages for item in world.items("test", kind)[:n_per_kind]]
    dialogue = world.dialogues("test", 1, turns=3, constrained=True)[0]
    prompts.append(dialogue.prompt(3))
    samples = [{"messages": p, "answers": {}} for p in prompts]
    for stage in EVALUATED:
        model = load_model(ctx.model(stage), device=default_device())
        generate = chat_generate_fn(model, load_tokenizer(ctx.model(stage), model.config.vocab_size), 48)
        for s, answer in zip(samples, generate(prompts)):
            s["answers"][stage] = answer
    return samples


RUNNERS: dict[str, Callable[[Context], dict]] = {
    "tokenizer": stage_tokenizer,
    "data": stage_data,
    "pretrain": stage_pretrain,
    "sft": stage_sft,
    "reward-helpfulness": _reward("helpfulness"),
    "reward-safety": _reward("safety"),
    "rejection": stage_rejection,
    "ppo": stage_ppo,
    "gatt": stage_gatt,
    "guard": stage_guard,
    "evaluate": stage_evaluate,
}


# ---- orchestration ----------------------------------------------------------------------------

def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run_pipeline(recipe_name: str = "tiny", out: str | os.PathLike = "runs/demo", from_stage: str | None = None,
                 until: str | None = None, quiet: bool = False, compare: str | os.PathLike | None = None) -> Path:
    recipe_path = find_recipe(recipe_name)
    recipe = read_pipeline_recipe(recipe_path)
    out = Path(out)
    if compare is not None and not (Path(compare) / "report.md").is_file():
        raise FileNotFoundError(f"--compare {compare}: not a finished run folder (no report.md)")
    out.mkdir(parents=True, exist_ok=True)
    if compare is not None:  # remembered: a re-run or a resumed run reports beside the same run
        _write_json(out / "compare.json", {"run": str(Path(compare).resolve())})
    kept = out / "recipe.yaml"
    if not (kept.exists() and kept.samefile(recipe_path)):  # re-running a run folder with its own copy
        shutil.copyfile(recipe_path, kept)
    for name in (from_stage, until):
        if name is not None and name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    ctx = Context(out, recipe, log)
    if from_stage is not None:  # re-run from this stage on: forget it and everything after
        for stage in STAGES[STAGES.index(from_stage):]:
            if ctx.folder(stage).exists():
                shutil.rmtree(ctx.folder(stage))
    estimates = recipe.get("estimated_seconds") or {}
    started = time.perf_counter()
    last = STAGES.index(until) if until else len(STAGES) - 1
    for i, stage in enumerate(STAGES[: last + 1], 1):
        marker = ctx.folder(stage) / ".done.json"
        if marker.is_file():
            took = json.loads(marker.read_text()).get("seconds", 0)
            log(f"[{i}/{len(STAGES)}] {stage}: done ({_fmt(took)}), skipped")
            continue
        elapsed = time.perf_counter() - started
        left = sum(estimates.get(s, 0) for s in STAGES[i - 1: last + 1])
        eta = f", about {_fmt(left)} left" if left else ""
        log(f"\n[{i}/{len(STAGES)}] {stage} — {RUNNERS[stage].__doc__.splitlines()[0] if RUNNERS[stage].__doc__ else ''}"
            f" (elapsed {_fmt(elapsed)}{eta})")
        t0 = time.perf_counter()
        summary = RUNNERS[stage](ctx) or {}
        seconds = time.perf_counter() - t0
        ctx.folder(stage).mkdir(parents=True, exist_ok=True)
        _write_json(marker, {"stage": stage, "seconds": seconds, "summary": _jsonable(summary)})
        log(f"[{i}/{len(STAGES)}] {stage}: finished in {_fmt(seconds)}")
    if until is None or until == "evaluate":
        from llama2.report import write_report

        report = write_report(out)
        log(f"\nreport: {report} (and {report.with_suffix('.md')})")
        log(f"chat with the result:   llama2 chat --model {out / 'chat'}")
        log(f"serve it:               llama2 serve --model {out / 'chat'} --guard {out / 'guard' / 'model'}")
    return out


def _write_json(path: Path, obj) -> None:
    """Write a JSON file whole or not at all (a run killed mid-write leaves the old file or none)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _jsonable(obj):
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if isinstance(obj, dict):
            return {str(k): _jsonable(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [_jsonable(v) for v in obj]
        return str(obj)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", default="tiny",
                        help="a built-in recipe (tiny: ~20 min on a 2-core CPU; tiny-lora: the same with LoRA in "
                             "every fine-tuning stage; smoke: seconds per stage) or a YAML file (default: tiny)")
    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="run folder (default: runs/demo)")
    parser.add_argument("--from", dest="from_stage", metavar="STAGE", choices=STAGES,
                        help="re-run from this stage on (its folder and the later ones are replaced)")
    parser.add_argument("--until", metavar="STAGE", choices=STAGES, help="stop after this stage")
    parser.add_argument("--compare", metavar="DIR", help="a finished run folder to set this run beside in the report "
                                                        "(e.g. tiny-lora beside tiny: methods, sizes, the suite)")
    parser.epilog = "Stages: " + " -> ".join(STAGES) + ". Re-running skips finished stages and resumes the " \
                    "interrupted one; Ctrl-C stops cleanly."


def main(args: argparse.Namespace) -> int:
    try:
        run_pipeline(args.recipe, args.out, args.from_stage, args.until, compare=args.compare)
    except KeyboardInterrupt:
        print(f"\nstopped. Run the same command again to resume from the last checkpoint ({args.out}).",
              file=sys.stderr)
        return 130
    return 0
