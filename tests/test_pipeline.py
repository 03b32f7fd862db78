"""`llama2 run smoke`: every stage of the recipe end to end, and a report that shows them."""

import json
import re

import pytest
import yaml

from llama2.pipeline import STAGES, find_recipe, read_pipeline_recipe, run_pipeline
from llama2.stages import AGAINST_SFT, EVALUATED


def test_built_in_recipes_are_found_and_valid():
    for name in ("tiny", "tiny-lora", "smoke"):
        recipe = read_pipeline_recipe(find_recipe(name))
        assert set(recipe["stages"]) == set(STAGES)


def test_bad_recipe_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe 'tinyy'"):
        find_recipe("tinyy")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  pretrian: {}\n")
    with pytest.raises(ValueError, match="unknown stage.*pretrian"):
        read_pipeline_recipe(bad)


@pytest.mark.parametrize("stage", [*STAGES, "safety-distill"])
def test_an_unknown_key_in_any_stage_names_the_stage_and_the_key(tmp_path, stage):
    recipe = yaml.safe_load(find_recipe("tiny").read_text())
    blocks = recipe["standalone"] if stage == "safety-distill" else recipe["stages"]
    blocks[stage]["vocab_sise"] = 4096
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError) as e:
        read_pipeline_recipe(bad)
    assert f"stage '{stage}'" in str(e.value) and "'vocab_sise'" in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_top_level_key_is_refused(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("seed: 0\nstagse: {}\nstages:\n  tokenizer: {vocab_size: 512}\n")
    with pytest.raises(ValueError, match="unknown field.*stagse"):
        read_pipeline_recipe(bad)


def test_the_recipe_seed_draws_the_world_of_every_stage_that_reads_it(tmp_path):
    from llama2.pipeline import Context, _config
    from llama2.train.ppo import PPOConfig
    from llama2.train.pretrain import PretrainConfig
    from llama2.train.sft import SFTConfig

    ctx = Context(tmp_path, {"seed": 1, "stages": {"ppo": {"world_seed": 3}}}, print)
    sft = _config(SFTConfig, ctx, "sft")
    assert (sft.seed, sft.world_seed) == (1, 1)
    assert _config(PPOConfig, ctx, "ppo").world_seed == 3  # a stage's own setting wins
    assert _config(PretrainConfig, ctx, "pretrain").seed == 1  # no world there: only the seed


def test_a_recipe_without_stages_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ValueError, match="lists no stages"):
        read_pipeline_recipe(empty)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    run_pipeline("smoke", out, quiet=True)
    return out


@pytest.mark.slow
def test_every_stage_writes_its_folder_and_model(smoke_run):
    for stage in STAGES:
        done = json.loads((smoke_run / stage / ".done.json").read_text())
        assert done["stage"] == stage and done["seconds"] >= 0
    for stage in ("pretrain", "sft", "rejection", "ppo", "gatt", "guard", "reward-helpfulness", "reward-safety",
                  "reward-helpfulness-2", "reward-safety-2", "rejection-2", "ppo-2", "dpo"):
        assert (smoke_run / stage / "model" / "config.json").is_file(), stage
    assert (smoke_run / "chat" / "model.safetensors").is_file()


@pytest.mark.slow
def test_report_shows_each_stage_with_its_data(smoke_run):
    md = (smoke_run / "report.md").read_text()
    html = (smoke_run / "report.html").read_text()
    for heading in ("assistant-world suite after each stage", "Loss curves", "Table 8", "Figure 7", "PPO",
                    "Table 30", "Time per stage", "Sample conversations"):
        assert heading in md, heading
    # every figure referenced exists and is a real PNG
    for src in re.findall(r"src='(figures/[^']+)'", html):
        data = (smoke_run / src).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, src
    results = json.loads((smoke_run / "evaluate" / "results.json").read_text())
    assert set(results) == set(EVALUATED)
    # the table's numbers are the evaluation's numbers
    sft = results["sft"]["task_accuracy"]
    assert f"{100 * sft:.1f}%" in md
    # and the held-out reward the RL stages maximise, for every model
    assert "combined reward (held-out)" in md and f"{results['ppo']['combined_reward']:.3f}" in md
    # and whether the reward models pick right answers, by the world's checker
    checker = json.loads((smoke_run / "rejection" / "reward_vs_k.json").read_text())["iterations"][0]["checker"]
    assert f"{100 * checker['helpfulness']['selected']:.1f}%" in md and "the world's checker" in md
    assert (smoke_run / "reward-helpfulness" / "policy_samples.jsonl").is_file()


@pytest.mark.slow
def test_every_aligned_stage_is_set_head_to_head_against_sft(smoke_run):
    h2h = json.loads((smoke_run / "evaluate" / "headtohead.json").read_text())
    assert h2h["against"] == "sft" and list(h2h["stages"]) == list(AGAINST_SFT)
    for result in (*h2h["stages"].values(), h2h["base"]):
        assert set(result["results"]) == {"greedy", "sampled"}
        assert result["results"]["greedy"]["all"]["n"] + result["unjudged"]["greedy"] == result["prompts"]
    assert set(h2h["stages"]["ppo"]["reward"]["greedy"]["a"]) >= {"helpfulness", "harmlessness"}
    # and round 2 against round 1 (§3.2.1: each version should beat the one before)
    assert {s: r["against"] for s, r in h2h["rounds"].items()} == {"rejection-2": "rejection", "ppo-2": "ppo"}
    md = (smoke_run / "report.md").read_text()
    assert md.index("Head to head against SFT") < md.index("assistant-world suite after each stage")
    assert "**Round 2 against round 1**" in md


@pytest.mark.slow
def test_the_second_round_learns_from_every_comparison_so_far(smoke_run):
    """RLHF-V2's reward models start from the PPO model, sample it, and add round 1's comparisons."""
    def config(stage: str) -> str:  # the stage's settings as its last checkpoint kept them
        return sorted((smoke_run / stage / "checkpoints").glob("step-*/config.yaml"))[-1].read_text()

    kept = config("reward-helpfulness-2")
    assert "ppo/model" in kept and "reward-helpfulness/policy_samples.jsonl" in kept
    assert (smoke_run / "reward-helpfulness-2" / "policy_samples.jsonl").is_file()
    dpo_config = config("dpo")
    assert "reward-helpfulness/train_pairs.jsonl" in dpo_config and "sft/model" in dpo_config
    gatt_config = config("gatt")
    assert "ppo-2/model" in gatt_config


def test_optional_stages_run_only_with_a_block_and_gatt_takes_the_newest_policy(tmp_path):
    from llama2.pipeline import Context

    ctx = Context(tmp_path, {"stages": {"sft": {}, "ppo": {}}}, print)
    assert not ctx.runs("ppo-2") and not ctx.runs("dpo") and ctx.runs("gatt")
    assert ctx.latest("ppo", "ppo-2") == "ppo" and "ppo-2" not in ctx.evaluated()
    ctx = Context(tmp_path, {"stages": {"ppo-2": {}, "reward-safety-2": {}}}, print)
    assert ctx.latest("ppo", "ppo-2") == "ppo-2" and ctx.latest("reward-safety", "reward-safety-2") == "reward-safety-2"


@pytest.mark.slow
def test_a_run_folder_reruns_from_its_own_copy_of_the_recipe(smoke_run, capsys):
    recipe = smoke_run / "recipe.yaml"
    text = recipe.read_text()
    run_pipeline(str(recipe), smoke_run)  # was shutil.SameFileError
    assert capsys.readouterr().err.count("skipped") == len(STAGES)
    assert recipe.read_text() == text


@pytest.mark.slow
def test_every_model_is_evaluated_on_the_runs_own_world(smoke_run):
    from llama2.data.world import World

    results = json.loads((smoke_run / "evaluate" / "results.json").read_text())
    expected = [it.prompt for it in World(0).eval_prompts("test", 4)]  # the smoke recipe: seed 0, max_items 4
    for stage, result in results.items():
        assert result["world_seed"] == 0, stage  # a cached evaluation of another world is not reused
        assert [a["prompt"] for a in result["answers"]] == expected, stage


@pytest.mark.slow
def test_rerunning_skips_finished_stages(smoke_run, capsys):
    run_pipeline("smoke", smoke_run)
    err = capsys.readouterr().err
    assert err.count("skipped") == len(STAGES)



@pytest.mark.slow
@pytest.mark.parametrize("start", ["reward-helpfulness-2", "ppo-2"])
def test_a_two_round_run_reruns_from_any_stage_and_resumes_an_interrupted_one(smoke_run, tmp_path, capsys, start):
    """``--from STAGE`` in the middle of round 2 keeps everything before it and redoes the rest;
    a stage killed before it finished (no ``.done.json``) is picked up again on the next run."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    before = {st: (run / st / ".done.json").read_text() for st in STAGES}
    run_pipeline("smoke", run, from_stage=start, quiet=True)
    i = STAGES.index(start)
    after = {st: (run / st / ".done.json").read_text() for st in STAGES}
    assert all(after[st] == before[st] for st in STAGES[:i])  # kept
    assert all(after[st] != before[st] for st in STAGES[i:])  # done again
    # Interrupted: the stage's marker and model are gone, its folder stays; a plain re-run redoes it alone.
    (run / start / ".done.json").unlink()
    shutil.rmtree(run / start / "model")
    capsys.readouterr()
    run_pipeline("smoke", run)
    err = capsys.readouterr().err
    assert err.count("skipped") == len(STAGES) - 1 and f"{start}: finished" in err
    assert (run / start / "model" / "model.safetensors").is_file()

# -- LoRA in every stage -------------------------------------------------------------------

FINE_TUNING = ("sft", "reward-helpfulness", "reward-safety", "rejection", "ppo", "reward-helpfulness-2", "reward-safety-2",
               "rejection-2", "ppo-2", "dpo", "gatt", "guard")


def test_tiny_lora_is_tiny_with_lora_in_every_fine_tuning_stage():
    tiny, lora = (read_pipeline_recipe(find_recipe(n)) for n in ("tiny", "tiny-lora"))
    for stage in STAGES:
        a, b = dict(tiny["stages"][stage]), dict(lora["stages"][stage])
        if stage in FINE_TUNING:
            assert b.pop("lora")["method"] == "lora", stage
            b.pop("lr"), a.pop("lr")
            b.pop("value_lr", None), a.pop("value_lr", None)
        assert a == b, stage  # everything else is the tiny recipe's


def test_a_recipe_extends_another_key_by_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "x", "extends": "smoke", "stages": {"sft": {"lr": 0.5}}}))
    merged = read_pipeline_recipe(recipe)
    smoke = read_pipeline_recipe(find_recipe("smoke"))
    assert merged["stages"]["sft"] == {**smoke["stages"]["sft"], "lr": 0.5}
    assert merged["stages"]["ppo"] == smoke["stages"]["ppo"]
    recipe.write_text(yaml.safe_dump({"name": "x", "extends": str(recipe), "stages": {}}))
    with pytest.raises(ValueError, match="cannot extend itself"):
        read_pipeline_recipe(recipe)


@pytest.mark.slow
def test_every_stage_with_lora_chains_adapters_and_reports_beside_the_full_run(smoke_run, tmp_path):
    lora = {"method": "lora", "targets": "all"}
    stages = {s: {"lora": lora} for s in FINE_TUNING}
    stages["reward-safety"] = {"lora": {**lora, "method": "qlora"}}
    stages["ppo"] = {"lora": {**lora, "dropout": 0.0}}
    recipe = tmp_path / "smoke-lora.yaml"
    recipe.write_text(yaml.safe_dump({"name": "smoke-lora", "extends": "smoke", "stages": stages}))
    out = run_pipeline(str(recipe), tmp_path / "lora", quiet=True, compare=smoke_run)
    for stage in FINE_TUNING:  # each stage's model is an adapter over the previous stage's
        assert (out / stage / "model" / "adapter_config.json").is_file(), stage
        assert not (out / stage / "model" / "config.json").exists(), stage
    base = json.loads((out / "ppo" / "model" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((out / "rejection" / "model").resolve())
    md = (out / "report.md").read_text()
    assert "## Beside the other run" in md and str(smoke_run) in md
    assert "| sft | LoRA r=8 (q,k,v,o,gate,up,down) | full |" in md
    assert "| reward-safety | QLoRA r=8" in md
