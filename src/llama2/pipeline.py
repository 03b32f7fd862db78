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
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from llama2.checkpoint import load_model, load_tokenizer
from llama2.code_pipeline import read_code_recipe, run_code_pipeline
from llama2.commands import tokenizer as tokenizer_command
from llama2.commands.tokenizer import TokenizerConfig
from llama2.corpus import default_corpus_files
from llama2.data.shards import PrepareConfig, prepare_from_config
from llama2.data.world import World
from llama2.eval import cli as evaluate_command
from llama2.eval.cli import EvaluateConfig, chat_generate_fn
from llama2.recipe import from_dict, merge_recipes, read_recipe, stage_settings
from llama2.stages import (
    AGAINST_SFT,
    CODE_STAGES,
    EVALUATED,
    OPTIONAL,
    STAGES,
    StageContext,
    run_stages,
    write_json,
)
from llama2.train import distill, dpo, gatt, guard, ppo, pretrain, rejection, reward, sft
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
    "reward-helpfulness-2": reward.RewardConfig,
    "reward-safety-2": reward.RewardConfig,
    "rejection-2": rejection.RejectionConfig,
    "ppo-2": ppo.PPOConfig,
    "dpo": dpo.DPOConfig,
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
    kind = recipe.pop("pipeline", "llama2")
    if kind == "code":  # Code Llama's recipe: its own stages (llama2.code_pipeline)
        return read_code_recipe(path)
    if kind != "llama2":
        raise ValueError(f"{path}: pipeline must be llama2 or code, got {kind!r}")
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


class Context(StageContext):
    """A Llama 2 run's stages: the run folder, the recipe, the log, and which optional stages run."""

    def runs(self, stage: str) -> bool:
        """Whether the recipe runs ``stage`` (an optional stage runs only when it has a block)."""
        return stage not in OPTIONAL or stage in (self.recipe.get("stages") or {})

    def latest(self, *stages: str) -> str:
        """The last of ``stages`` the recipe runs (e.g. the newest policy or reward model)."""
        return [s for s in stages if self.runs(s)][-1]

    def evaluated(self) -> list[str]:
        return [s for s in EVALUATED if self.runs(s)]


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


def _reward(kind: str, round: int = 1):
    def run(ctx: Context) -> dict:
        stage = f"reward-{kind}" if round == 1 else f"reward-{kind}-{round}"
        paths = dict(kind=kind, out=str(ctx.folder(stage)), model=ctx.model("sft"))
        if round == 2:  # comparisons on the newest policy's samples, added to the first round's (§3.2.1)
            earlier = ctx.folder(f"reward-{kind}") / "policy_samples.jsonl"
            paths.update(model=ctx.model("ppo"), earlier_samples=str(earlier) if earlier.is_file() else "")
        return reward.run(_config(reward.RewardConfig, ctx, stage, **paths))
    run.__doc__ = (f"The {kind} reward model (§3.2.2)." if round == 1 else
                   f"The {kind} reward model of round {round}: comparisons on the newest policy added (§3.2.1).")
    return run


def _reward_models(ctx: Context, round: int) -> dict:
    if round == 1:
        return dict(reward_model=ctx.model("reward-helpfulness"), safety_model=ctx.model("reward-safety"))
    return dict(reward_model=ctx.model(ctx.latest("reward-helpfulness", "reward-helpfulness-2")),
                safety_model=ctx.model(ctx.latest("reward-safety", "reward-safety-2")))


def _rejection(round: int = 1):
    def run(ctx: Context) -> dict:
        stage, start = ("rejection", "sft") if round == 1 else ("rejection-2", "ppo")
        return rejection.run(_config(rejection.RejectionConfig, ctx, stage, out=str(ctx.folder(stage)),
                                     model=ctx.model(start), **_reward_models(ctx, round)))
    run.__doc__ = ("Rejection sampling: best of K answers under the reward models (§3.2.3)." if round == 1 else
                   "Rejection sampling of round 2, from the PPO model under the new reward models (§3.2.3).")
    return run


def _ppo(round: int = 1):
    def run(ctx: Context) -> dict:
        stage, start = ("ppo", "rejection") if round == 1 else ("ppo-2", "rejection-2")
        return ppo.run(_config(ppo.PPOConfig, ctx, stage, out=str(ctx.folder(stage)), model=ctx.model(start),
                               **_reward_models(ctx, round)))
    run.__doc__ = ("PPO with the safety-gated reward and a KL penalty (§3.2.3)." if round == 1 else
                   "PPO of round 2, on top of round 2's rejection sampling (§3.2.3).")
    return run


def stage_dpo(ctx: Context) -> dict:
    """DPO from the SFT model on the helpfulness reward model's comparisons (beside RLHF)."""
    pairs = ctx.folder("reward-helpfulness") / "train_pairs.jsonl"  # equal data: what the reward model saw
    return dpo.run(_config(dpo.DPOConfig, ctx, "dpo", out=str(ctx.folder("dpo")), model=ctx.model("sft"),
                           data=str(pairs)))


def stage_gatt(ctx: Context) -> dict:
    """Ghost Attention for multi-turn system instructions (§3.3)."""
    result = gatt.run(_config(gatt.GAttConfig, ctx, "gatt", out=str(ctx.folder("gatt")),
                              model=ctx.model(ctx.latest("ppo", "ppo-2"))))
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
    for stage in ctx.evaluated():
        cache = ctx.folder(stage) / "eval.json"
        if cache.is_file():
            cached = json.loads(cache.read_text())
            if cached.get("reward_models") == stamp and cached.get("world_seed", 0) == seed:
                results[stage] = cached
                continue
        ctx.log(f"evaluating {stage} model on the assistant world ...")
        results[stage] = evaluate_command.evaluate_model(
            ctx.model(stage), reward_model=ctx.model("reward-helpfulness"), safety_model=ctx.model("reward-safety"),
            **cfg.suite())
        results[stage]["reward_models"] = stamp
        results[stage]["world_seed"] = seed
        write_json(cache, results[stage])  # read back on resume: never half-written
    folder = ctx.folder("evaluate")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "results.json", results)
    write_json(folder / "samples.json", sample_conversations(ctx))
    if cfg.headtohead_items:
        write_json(folder / "headtohead.json", against_sft(ctx, cfg))
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
    for stage in ctx.evaluated():
        model = load_model(ctx.model(stage), device=default_device())
        generate = chat_generate_fn(model, load_tokenizer(ctx.model(stage), model.config.vocab_size), 48)
        for s, answer in zip(samples, generate(prompts)):
            s["answers"][stage] = answer
    return samples


def against_sft(ctx: Context, cfg: EvaluateConfig) -> dict:
    """Every aligned stage's model head to head against the SFT model, judged by the world's
    annotator (the paper's Figure 1 shape), with the newest reward models' view (Figure 11);
    and the final chat model against the pretrained one. Each model answers once (greedy and
    sampled at 0.6 / 0.9, seeded alike); answers are cached per model in ``STAGE/h2h.json``."""
    from llama2.data.world.annotator import Annotator
    from llama2.eval.headtohead import answer, compare_answers, headtohead_prompts
    from llama2.scoring import RewardScorer

    world = World(cfg.world_seed)
    annotator = Annotator(world)
    prompts = headtohead_prompts(world, cfg.split, cfg.headtohead_items)
    setting = {"prompts": len(prompts), "items": cfg.headtohead_items, "sampled": cfg.sampled_answers,
               "max_new_tokens": cfg.max_new_tokens, "world_seed": cfg.world_seed, "split": cfg.split}
    modes = ("greedy", "sampled") if cfg.sampled_answers else ("greedy",)

    def answers_of(stage: str) -> dict:
        cache = ctx.folder(stage) / "h2h.json"
        stamp = _weights_stamp(Path(ctx.model(stage)))
        if cache.is_file():
            cached = json.loads(cache.read_text())
            if cached.get("setting") == setting and cached.get("weights") == stamp:
                return cached["answers"]
        ctx.log(f"answering {len(prompts)} held-out prompts with the {stage} model (head to head) ...")
        model = load_model(ctx.model(stage), device=default_device())
        tokenizer = load_tokenizer(ctx.model(stage), model.config.vocab_size)
        out = answer(model, tokenizer, prompts, modes, max(1, cfg.sampled_answers), cfg.max_new_tokens,
                     cfg.world_seed)
        write_json(cache, {"setting": setting, "weights": stamp, "answers": out})
        return out

    newest = _reward_models(ctx, 2)
    scorer = RewardScorer(newest["reward_model"], newest["safety_model"], device=default_device())
    sft_answers = answers_of("sft")
    result = {"against": "sft", "world_seed": cfg.world_seed, "setting": setting, "stages": {}}
    for stage in AGAINST_SFT:
        if not ctx.runs(stage):
            continue
        r = compare_answers(answers_of(stage), sft_answers, prompts, world, annotator, max(1, cfg.sampled_answers),
                            cfg.world_seed, scorer)
        r.pop("pairs")
        result["stages"][stage] = r
    # §3.2.1's loop should improve from one RLHF version to the next: round 2 against round 1.
    result["rounds"] = {}
    for later, earlier in (("rejection-2", "rejection"), ("ppo-2", "ppo")):
        if ctx.runs(later):
            r = compare_answers(answers_of(later), answers_of(earlier), prompts, world, annotator,
                                max(1, cfg.sampled_answers), cfg.world_seed)
            r.pop("pairs")
            result["rounds"][later] = {"against": earlier, **r}
    base = compare_answers(answers_of("gatt"), answers_of("pretrain"), prompts, world, annotator,
                           max(1, cfg.sampled_answers), cfg.world_seed)
    base.pop("pairs")
    result["base"] = base
    return result


RUNNERS: dict[str, Callable[[Context], dict]] = {
    "tokenizer": stage_tokenizer,
    "data": stage_data,
    "pretrain": stage_pretrain,
    "sft": stage_sft,
    "reward-helpfulness": _reward("helpfulness"),
    "reward-safety": _reward("safety"),
    "rejection": _rejection(1),
    "ppo": _ppo(1),
    "reward-helpfulness-2": _reward("helpfulness", 2),
    "reward-safety-2": _reward("safety", 2),
    "rejection-2": _rejection(2),
    "ppo-2": _ppo(2),
    "dpo": stage_dpo,
    "gatt": stage_gatt,
    "guard": stage_guard,
    "evaluate": stage_evaluate,
}


# ---- orchestration ----------------------------------------------------------------------------

def run_pipeline(recipe_name: str = "tiny", out: str | os.PathLike = "runs/demo", from_stage: str | None = None,
                 until: str | None = None, quiet: bool = False, compare: str | os.PathLike | None = None) -> Path:
    recipe_path = find_recipe(recipe_name)
    kind = read_recipe(recipe_path).get("pipeline", "llama2")
    kept = Path(out) / "recipe.yaml"
    if kept.is_file() and read_recipe(kept).get("pipeline", "llama2") != kind:
        # the two recipes share stage names (tokenizer, data, pretrain, evaluate): never mix their folders
        raise ValueError(f"{out}: holds a run of another recipe ({kept}); give this one its own --out")
    if kind == "code":
        if compare is not None:
            raise ValueError("--compare sets a Llama 2 run beside another; the code recipe's report stands alone")
        return run_code_pipeline(recipe_path, out, from_stage, until, quiet=quiet)
    recipe = read_pipeline_recipe(recipe_path)
    out = Path(out)
    if compare is not None and not (Path(compare) / "report.md").is_file():
        raise FileNotFoundError(f"--compare {compare}: not a finished run folder (no report.md)")
    out.mkdir(parents=True, exist_ok=True)
    if compare is not None:  # remembered: a re-run or a resumed run reports beside the same run
        write_json(out / "compare.json", {"run": str(Path(compare).resolve())})
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
    run_stages(STAGES, RUNNERS, ctx, recipe.get("estimated_seconds"), from_stage, until)
    if until is None or until == "evaluate":
        from llama2.report import write_report

        report = write_report(out)
        log(f"\nreport: {report} (and {report.with_suffix('.md')})")
        log(f"chat with the result:   llama2 chat --model {out / 'chat'}")
        log(f"serve it:               llama2 serve --model {out / 'chat'} --guard {out / 'guard' / 'model'}")
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", default="tiny",
                        help="a built-in recipe (tiny: ~33 min on a 2-core CPU; tiny-lora: the same with LoRA in "
                             "every fine-tuning stage; smoke: seconds per stage; code: Code Llama's infilling and "
                             "long-context recipe, ~7 min; code-smoke: the same in seconds) or a YAML file "
                             "(default: tiny)")
    parser.add_argument("--out", metavar="DIR", help="run folder (default: runs/demo; runs/code for the code "
                                                    "recipes)")
    any_stage = tuple(dict.fromkeys(STAGES + CODE_STAGES))
    parser.add_argument("--from", dest="from_stage", metavar="STAGE", choices=any_stage,
                        help="re-run from this stage on (its folder and the later ones are replaced)")
    parser.add_argument("--until", metavar="STAGE", choices=any_stage, help="stop after this stage")
    parser.add_argument("--compare", metavar="DIR", help="a finished run folder to set this run beside in the report "
                                                        "(e.g. tiny-lora beside tiny: methods, sizes, the suite)")
    parser.epilog = "Stages: " + " -> ".join(STAGES) + "; of the code recipe: " + " -> ".join(CODE_STAGES) + \
                    ". Re-running skips finished stages and resumes the interrupted one; Ctrl-C stops cleanly."


def main(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = "runs/code" if read_recipe(find_recipe(args.recipe)).get("pipeline") == "code" else "runs/demo"
    try:
        run_pipeline(args.recipe, args.out, args.from_stage, args.until, compare=args.compare)
    except KeyboardInterrupt:
        print(f"\nstopped. Run the same command again to resume from the last checkpoint ({args.out}).",
              file=sys.stderr)
        return 130
    return 0
