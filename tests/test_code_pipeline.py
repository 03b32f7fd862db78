"""`llama2 run code`: Code Llama's recipe (pretraining, FIM, long-context fine-tuning) end to end,
and a report with infilling before/after FIM and the passkey grid before/after the extension."""

import argparse
import json

import numpy as np
import pytest
import yaml

from llama2.code_pipeline import (
    CODE_STAGE_CONFIGS,
    CodeDataConfig,
    CodeEvaluateConfig,
    merge_prepared,
    read_code_recipe,
)
from llama2.data.shards import PackedSequences, TokenStream, prepare
from llama2.eval.passkey import KEYS
from llama2.pipeline import find_recipe, read_pipeline_recipe, run_pipeline
from llama2.recipe import from_dict, stage_settings
from llama2.stages import CODE_STAGES
from llama2.tokenizer import Tokenizer
from llama2.train.pretrain import PretrainConfig
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def code_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("code")
    run_pipeline("code-smoke", out, quiet=True)
    return out


# -- the recipes ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["code", "code-smoke"])
def test_built_in_code_recipes_are_found_and_valid(name):
    recipe = read_pipeline_recipe(find_recipe(name))
    assert recipe["pipeline"] == "code" and list(recipe["stages"]) == list(CODE_STAGES)
    assert read_code_recipe(find_recipe(name)) == recipe


def test_the_code_recipe_trains_long_at_four_times_the_pretraining_length_with_a_raised_rope_base():
    recipe = read_code_recipe(find_recipe("code"))
    stages = recipe["stages"]
    pretrain, long = (from_dict(PretrainConfig, stage_settings(recipe, s, PretrainConfig)) for s in ("pretrain", "long"))
    assert long.seq_len == 4 * pretrain.seq_len
    assert (pretrain.model.rope_theta, long.model.rope_theta) == (1e4, 1e6)
    assert stages["data-fim"]["fim_rate"] == 0.9 and stages["data-fim"]["fim_spm_rate"] == 0.5
    assert stages["data-long"]["passkey_length"] == stages["long"]["seq_len"]
    # the probe asks past the long-context length too
    assert max(stages["evaluate"]["passkey_lengths"]) > stages["long"]["seq_len"]


@pytest.mark.parametrize("stage", CODE_STAGES)
def test_an_unknown_key_in_any_code_stage_names_the_stage_and_the_key(tmp_path, stage):
    recipe = yaml.safe_load(find_recipe("code-smoke").read_text())
    recipe["stages"][stage]["vocab_sise"] = 4096
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError) as e:
        read_pipeline_recipe(bad)
    assert f"stage '{stage}'" in str(e.value) and "'vocab_sise'" in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_or_missing_code_stage_is_refused(tmp_path):
    recipe = yaml.safe_load(find_recipe("code-smoke").read_text())
    recipe["stages"]["sft"] = {}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="unknown stage.*sft"):
        read_code_recipe(bad)
    del recipe["stages"]["sft"], recipe["stages"]["fim"]
    bad.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="fim missing"):
        read_code_recipe(bad)


def test_the_pipeline_wires_init_and_data_itself(tmp_path):
    recipe = yaml.safe_load(find_recipe("code-smoke").read_text())
    recipe["stages"]["fim"]["init"] = "elsewhere"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="'fim'.*wired by the pipeline"):
        read_code_recipe(bad)


def test_an_unknown_pipeline_kind_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: cobol\nstages:\n  tokenizer: {vocab_size: 512}\n")
    with pytest.raises(ValueError, match="pipeline must be llama2 or code"):
        read_pipeline_recipe(bad)


def test_bad_evaluation_settings_fail_in_one_line():
    with pytest.raises(ValueError, match="passkey_depths"):
        CodeEvaluateConfig(passkey_depths=[0.5, 1.5])
    with pytest.raises(ValueError, match="infill_tasks must be >= 1"):
        CodeEvaluateConfig(infill_tasks=0)
    with pytest.raises(ValueError, match="position_edges must rise from 0"):
        CodeEvaluateConfig(position_edges=[64, 128])


def test_passkey_texts_are_the_length_and_its_halves_longest_first():
    lengths = CodeDataConfig(passkey_documents=7, passkey_min_length=64, passkey_length=256).passkey_lengths()
    assert lengths == [256, 256, 256, 128, 128, 64, 64]
    assert set(CodeDataConfig(passkey_documents=3, passkey_length=256).passkey_lengths()) == {256}
    with pytest.raises(ValueError, match="passkey_min_length 96 must be passkey_length 256 halved"):
        CodeDataConfig(passkey_documents=3, passkey_min_length=96, passkey_length=256)


def test_a_passkey_length_that_does_not_fill_its_training_windows_is_refused(tmp_path):
    recipe = yaml.safe_load(find_recipe("code-smoke").read_text())
    recipe["stages"]["data-long"]["passkey_length"] = recipe["stages"]["long"]["seq_len"] * 3 // 4
    recipe["stages"]["data-long"].pop("passkey_min_length")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="stage 'data-long': passkey_length 384 must be the seq_len 512 of stage 'long'"):
        read_code_recipe(bad)


def test_every_code_stage_has_a_config():
    assert list(CODE_STAGE_CONFIGS) == list(CODE_STAGES)


def test_run_help_lists_the_code_recipe_and_its_stages(capsys):
    with pytest.raises(SystemExit):
        run_cli(capsys, "run", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "code:" in text and "code-smoke" in text
    assert " -> ".join(CODE_STAGES) in text


def test_compare_is_refused_for_the_code_recipe(tmp_path, code_run):
    with pytest.raises(ValueError, match="--compare"):
        run_pipeline("code-smoke", tmp_path / "x", compare=code_run, quiet=True)


def test_a_run_folder_of_one_recipe_kind_is_refused_to_the_other(tmp_path, code_run):
    """The two recipes share stage names: a Llama 2 run into a code run's folder would skip its
    finished tokenizer, data and pretrain stages."""
    with pytest.raises(ValueError, match="another recipe"):
        run_pipeline("smoke", code_run, quiet=True)


def test_the_code_recipe_runs_into_its_own_folder_by_default(monkeypatch):
    from llama2 import pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda recipe, out, *a, **k: seen.append(out))
    for recipe in ("code-smoke", "smoke"):
        pipeline.main(argparse.Namespace(recipe=recipe, out=None, from_stage=None, until=None, compare=None))
    assert seen == ["runs/code", "runs/demo"]


# -- data ----------------------------------------------------------------------------------

def test_merged_data_reads_every_part_as_one_stream(tmp_path):
    from llama2.tokenizer import train_tokenizer

    text = tmp_path / "a.txt"
    text.write_text("\n".join(f"def f_{i}(x):\n    return x + {i}\n" for i in range(300)))
    tok = train_tokenizer([text], tmp_path / "tok", vocab_size=300, verbose=False)
    out = tmp_path / "merged"
    for part in ("one", "two"):
        prepare([text], tok.path, out / part, val_fraction=0.0, workers=1, progress=False, log=lambda m: None)
    index = merge_prepared({"one": out / "one", "two": out / "two"}, out)
    single = TokenStream(out / "one")
    both = TokenStream(out)
    assert len(both) == 2 * len(single) == index["tokens"]["train"]
    assert np.array_equal(both.read(len(single), 2 * len(single)), single.read(0, len(single)))
    assert set(index["parts"]) == {"one", "two"} and (out / "tokenizer.model").is_file()


def test_code_world_functions_are_added_once_with_or_without_their_tests(code_run):
    smoke = read_code_recipe(find_recipe("code-smoke"))["stages"]
    for stage, with_tests in (("data", True), ("data-fim", False)):
        index = json.loads((code_run / stage / "code" / "index.json").read_text())
        inputs = {p["path"].rsplit("/", 1)[-1]: p["documents"] for p in index["inputs"]}
        assert inputs == {"corpus.jsonl": 40, "code_world.jsonl": smoke[stage]["code_world_documents"]}
        docs = [json.loads(line)["text"] for line in (code_run / stage / "code_world.jsonl").open()]
        assert all(("\nassert " in d) == with_tests for d in docs)


@pytest.mark.parametrize("field, value, message", [
    ("world_seed", 3, "world_seed 3 differs from seed 0: in a code recipe the code world's surface follows seed"),
    ("code_corpus", True, "always has the bundled code corpus"),
])
def test_prepare_fields_a_code_recipe_cannot_use_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        CodeDataConfig(**{field: value})


def test_a_code_recipe_with_another_seed_is_valid(tmp_path):
    recipe = yaml.safe_load(find_recipe("code").read_text())
    recipe["seed"] = 1
    path = tmp_path / "code-seed1.yaml"
    path.write_text(yaml.safe_dump(recipe))
    settings = stage_settings(read_code_recipe(path), "data", CodeDataConfig)
    cfg = from_dict(CodeDataConfig, settings, "data")
    assert cfg.seed == cfg.world_seed == 1


def test_the_fim_stages_cut_at_line_starts(code_run):
    for stage in ("data-fim", "data-long"):
        assert json.loads((code_run / stage / "code" / "index.json").read_text())["fim"]["unit"] == "line"


def test_passkey_texts_are_never_fim_transformed(code_run):
    index = json.loads((code_run / "data-fim" / "index.json").read_text())
    assert index["parts"]["code"]["fim"] == 0.9 and index["parts"]["passkey"]["fim"] == 0.0
    tok = Tokenizer(code_run / "data-fim" / "tokenizer.model")
    passkey, code = (TokenStream(code_run / "data-fim" / part) for part in ("passkey", "code"))
    passkey, code = passkey.read(0, len(passkey)), code.read(0, len(code))
    assert tok.prefix_id not in passkey and tok.prefix_id in code


def test_the_long_data_holds_passkey_texts_of_the_long_length_and_its_halves(code_run):
    index = json.loads((code_run / "data-long" / "index.json").read_text())
    docs, tokens = index["parts"]["passkey"]["documents"], index["parts"]["passkey"]["tokens"]
    recipe = read_code_recipe(find_recipe("code-smoke"))
    lengths = from_dict(CodeDataConfig, stage_settings(recipe, "data-long", CodeDataConfig)).passkey_lengths()
    assert set(lengths) == {512, 256, 128} and docs["train"] + docs["val"] == len(lengths)
    assert tokens["train"] + tokens["val"] == sum(lengths)  # each text exactly its length


@pytest.mark.parametrize("stage", ["data", "data-fim", "data-long"])
def test_training_windows_of_the_passkey_part_hold_whole_texts(code_run, stage):
    """The passkey part comes first in the merged stream, its texts longest first and each a
    power-of-two fraction of the window, so the trainer's windows never cut one (a cut text asks
    for a key its window does not hold)."""
    recipe = read_code_recipe(find_recipe("code-smoke"))
    seq_len = recipe["stages"][{"data": "pretrain", "data-fim": "fim", "data-long": "long"}[stage]]["seq_len"]
    index = json.loads((code_run / stage / "index.json").read_text())
    assert list(index["parts"]) == ["passkey", "code"]
    tok = Tokenizer(code_run / stage / "tokenizer.model")
    stream = TokenStream(code_run / stage, "train")
    passkey_tokens = index["parts"]["passkey"]["tokens"]["train"]
    windows = PackedSequences(stream, seq_len)
    texts = 0
    for i in range(passkey_tokens // seq_len):
        w = [int(t) for t in windows[i]][:seq_len]
        starts = [j for j, t in enumerate(w) if t == tok.bos_id]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:] + [seq_len]):
            assert w[b - 1] == tok.eos_id and tok.decode(w[a:b]).split()[-1] in KEYS
            texts += 1
    # every text but those in a last window the code part completes
    assert index["parts"]["passkey"]["documents"]["train"] - seq_len // 64 <= texts


def test_passkey_answer_only_trains_the_passkey_texts_on_their_answers(code_run):
    """code-smoke sets passkey_answer_only in data-long only: its passkey texts carry a loss mask."""
    plain, answer_only = (json.loads((code_run / stage / "index.json").read_text()) for stage in ("data", "data-long"))
    assert "completions" not in plain
    assert answer_only["completions"]["train"] + answer_only["completions"]["val"] == 10
    stream = TokenStream(code_run / "data-long" / "passkey", "train")
    tok = Tokenizer(code_run / "data-long" / "tokenizer.model")
    ids, keep = stream.read(0, len(stream)), stream.read_mask(0, len(stream)) > 0
    answers = tok.decode([int(t) for t in ids[keep] if t != tok.eos_id]).split()
    assert len(answers) == answer_only["completions"]["train"] and all(a in KEYS for a in answers)
    assert TokenStream(code_run / "data-long", "train").masked  # the merged directory reads the mask too
    assert "completions" in answer_only["parts"]["passkey"] and "completions" not in plain["parts"]["passkey"]
    assert "data-long | passkey (loss on the answer only) |" in (code_run / "report.md").read_text()


# -- the run -------------------------------------------------------------------------------

def test_every_stage_writes_its_folder_and_done_marker(code_run):
    for stage in CODE_STAGES:
        done = json.loads((code_run / stage / ".done.json").read_text())
        assert done["stage"] == stage and done["seconds"] >= 0
    for stage in ("pretrain", "fim", "long"):
        assert (code_run / stage / "model" / "model.safetensors").is_file()


def test_fim_continues_the_base_model_and_long_raises_the_rope_base_and_context(code_run):
    def config(stage):
        return json.loads((code_run / stage / "model" / "config.json").read_text())

    base, fim, long = config("pretrain"), config("fim"), config("long")
    assert (fim.get("hidden_size"), fim.get("num_hidden_layers")) == (base.get("hidden_size"),
                                                                      base.get("num_hidden_layers"))
    assert fim["rope_theta"] == base["rope_theta"] == 1e4 and long["rope_theta"] == 1e6
    assert long["max_position_embeddings"] == 4 * base["max_position_embeddings"]


def test_report_shows_infilling_before_and_after_fim_and_the_passkey_grid(code_run):
    md = (code_run / "report.md").read_text()
    assert "## Infilling held-out functions" in md and "## Passkey retrieval by depth and length" in md
    for label in ("base (before FIM)", "FIM (before the extension)", "long context (after the extension)"):
        assert label in md
    assert "sign test p =" in md and "past both training lengths" in md
    assert "| depth \\ length | 128 | 512 | 1024 |" in md
    html = (code_run / "report.html").read_text()
    assert "<h2>Infilling held-out functions</h2>" in html and "passkey.png" in html
    assert "## Loss by position on held-out code" in md and "| model | trained at | RoPE θ | 0-128 | 128-512 |" in md
    assert "Loss (nats per token) on held-out code by position, past the pretraining length (128)" in md
    for figure in ("passkey.png", "infill.png", "losses.png", "positions.png"):
        assert (code_run / "figures" / figure).stat().st_size > 0


def test_evaluation_scores_every_model_on_the_same_tasks_and_prompts(code_run):
    results = json.loads((code_run / "evaluate" / "results.json").read_text())
    assert set(results) == {"pretrain", "fim", "long"}
    names = {s: [t["name"] for t in results[s]["infill"][0]["per_task"]] for s in results}
    assert names["pretrain"] == names["fim"] == names["long"]
    assert [r["mode"] for r in results["fim"]["infill"]] == ["PSM", "SPM"]
    assert "passkey" not in results["pretrain"]
    cells = [(c["length"], c["depth"]) for c in results["fim"]["passkey"]["cells"]]
    assert cells == [(c["length"], c["depth"]) for c in results["long"]["passkey"]["cells"]]
    assert results["fim"]["trained_length"] == 128 and results["long"]["trained_length"] == 512
    assert "positions" not in results["pretrain"]
    assert results["fim"]["positions"]["edges"] == results["long"]["positions"]["edges"] == [0, 128, 512]
    per_prompt = results["long"]["passkey"]["per_prompt"]
    assert len(per_prompt) == results["long"]["passkey"]["n"]


def test_rerunning_skips_finished_stages_and_reuses_cached_evaluations(code_run, capsys):
    cache = code_run / "fim" / "code_eval.json"
    before = cache.stat().st_mtime_ns
    run_pipeline("code-smoke", code_run, from_stage="evaluate")
    err = capsys.readouterr().err
    assert err.count("skipped") == len(CODE_STAGES) - 1 and "evaluating" not in err
    assert cache.stat().st_mtime_ns == before
    run_pipeline("code-smoke", code_run)
    assert capsys.readouterr().err.count("skipped") == len(CODE_STAGES)

