"""Recipes: dataclass defaults < YAML file < explicit flags; unknown or ill-typed fields fail in one line."""

import argparse
from dataclasses import dataclass

import pytest
import yaml

from llama2.model import ModelConfig
from llama2.recipe import (
    TINY_RECIPE,
    add_config_args,
    config_diff,
    dump_recipe,
    from_dict,
    load_config,
    read_recipe,
    setting,
    to_dict,
)


@dataclass
class Inner:
    width: int = setting(8, "inner width")
    name: str | None = setting(None, "optional name")


@dataclass
class Cfg:
    lr: float = setting(3e-4, "peak learning rate")
    steps: int = setting(100, "optimizer steps")
    mode: str = setting("auto", "how", choices=("auto", "x"))
    compile: bool = setting(False, "compile it")
    resume: str = setting("auto", "resume from", const="latest")
    files: list[str] = setting(default_factory=list, help="inputs")
    inner: Inner = setting(default_factory=Inner, help="nested")


def parse(argv, cls=Cfg):
    p = argparse.ArgumentParser()
    add_config_args(p, cls)
    return p, p.parse_args(argv)


def test_defaults_file_flags_in_increasing_priority(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("lr: 1e-3\nsteps: 7\ninner:\n  width: 16\n  name: a\n")
    _, args = parse(["--config", str(f), "--steps", "9", "--inner.width", "32"])
    cfg = load_config(Cfg, args)
    assert cfg.lr == 1e-3  # from the file ("1e-3" is a string to YAML 1.1: coerced)
    assert cfg.steps == 9  # the flag beats the file
    assert cfg.inner.width == 32 and cfg.inner.name == "a"  # nested: flag and file merge
    assert cfg.mode == "auto" and cfg.files == []  # defaults untouched


def test_no_config_uses_the_default_recipe_then_flags():
    _, args = parse(["--lr", "0.5"])
    cfg = load_config(Cfg, args, default_recipe={"steps": 3, "lr": 0.1})
    assert (cfg.steps, cfg.lr) == (3, 0.5)


def test_flag_forms():
    _, args = parse(["--compile", "--resume", "--files", "a", "b", "--inner.name", "none"])
    cfg = load_config(Cfg, args)
    assert cfg.compile is True and cfg.resume == "latest" and cfg.files == ["a", "b"] and cfg.inner.name is None
    _, args = parse(["--no-compile", "--resume", "never"])
    cfg = load_config(Cfg, args)
    assert cfg.compile is False and cfg.resume == "never"


def test_help_comes_from_field_metadata():
    p, _ = parse([])
    text = p.format_help()
    assert "--lr FLOAT" in text and "peak learning rate (default: 0.0003)" in text
    assert "--inner.width" in text and "--config FILE" in text


def test_unknown_field_names_file_and_field(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("lr: 1e-3\nlearning_rate: 2\n")
    _, args = parse(["--config", str(f)])
    with pytest.raises(ValueError) as e:
        load_config(Cfg, args)
    msg = str(e.value)
    assert str(f) in msg and "'learning_rate'" in msg and "\n" not in msg
    f.write_text("inner:\n  depth: 3\n")
    with pytest.raises(ValueError, match=r"unknown field inner\.'depth'|unknown field 'inner.depth'|inner\..*depth"):
        load_config(Cfg, parse(["--config", str(f)])[1])


@pytest.mark.parametrize("text,field", [("steps: 1.5\n", "steps"), ("compile: maybe\n", "compile"),
                                        ("lr: fast\n", "lr"), ("inner: 3\n", "inner")])
def test_bad_values_name_the_field(tmp_path, text, field):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ValueError) as e:
        load_config(Cfg, parse(["--config", str(f)])[1])
    assert str(f) in str(e.value) and field in str(e.value) and "\n" not in str(e.value)


def test_bad_flag_value_names_the_flag():
    with pytest.raises(ValueError, match="--steps"):
        load_config(Cfg, parse(["--steps", "ten"])[1])


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(Cfg, parse(["--config", str(tmp_path / "nope.yaml")])[1])
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(Cfg, parse(["--config", str(f)])[1])


def test_round_trip_and_diff(tmp_path):
    cfg = from_dict(Cfg, {"steps": 5, "inner": {"width": 2}})
    f = tmp_path / "out.yaml"
    f.write_text(dump_recipe(cfg))
    again = load_config(Cfg, parse(["--config", str(f)])[1])
    assert again == cfg
    assert config_diff(to_dict(cfg), to_dict(from_dict(Cfg, {"steps": 6}))) == ["inner.width", "steps"]


def test_model_config_nests_with_its_own_validation():
    @dataclass
    class WithModel:
        model: ModelConfig = setting(default_factory=ModelConfig, help="shape")

    cfg = from_dict(WithModel, {"model": {"dim": 64, "n_layers": 1, "n_heads": 4}})
    assert cfg.model.n_kv_heads == 4  # ModelConfig.__post_init__ ran
    with pytest.raises(ValueError, match="recipe.yaml: invalid model config"):
        from_dict(WithModel, {"model": {"dim": 65, "n_heads": 4}}, source="recipe.yaml")


# -- the built-in tiny recipe: one file ------------------------------------------------------

# Every stage command with a tiny default: its argv, and its block of tiny.yaml.
STAGE_COMMANDS = [
    (["pretrain"], "pretrain"),
    (["sft"], "sft"),
    (["reward", "train"], "reward-helpfulness"),
    (["reward", "train", "--kind", "safety"], "reward-safety"),
    (["rejection-sample"], "rejection"),
    (["ppo"], "ppo"),
    (["gatt"], "gatt"),
    (["guard", "train"], "guard"),
    (["safety-distill"], "safety-distill"),
]


def _print_config(argv, capsys) -> dict:
    from llama2.cli import main

    assert main([*argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def _tiny_block(stage: str) -> dict:
    recipe = read_recipe(TINY_RECIPE)
    return {**(recipe.get("standalone") or {}), **recipe["stages"]}[stage]


@pytest.mark.parametrize("argv,stage", STAGE_COMMANDS, ids=[s for _, s in STAGE_COMMANDS])
def test_a_stage_command_without_config_uses_exactly_its_block_of_tiny_yaml(argv, stage, capsys):
    from llama2.pipeline import STAGE_CONFIGS, STANDALONE_CONFIGS

    cls = {**STAGE_CONFIGS, **STANDALONE_CONFIGS}[stage]
    kind = {"kind": stage.removeprefix("reward-")} if stage.startswith("reward-") else {}
    assert _print_config(argv, capsys) == to_dict(from_dict(cls, {**_tiny_block(stage), **kind}))


def test_a_flag_still_beats_the_tiny_block(capsys):
    assert _tiny_block("sft")["batch_size"] != 4
    assert _print_config(["sft", "--batch-size", "4", "--micro-batch-size", "4"], capsys)["batch_size"] == 4


def test_tokenizer_data_and_evaluate_default_to_their_commands():
    """The pipeline's tokenizer, data and evaluate stages read the same dataclasses as
    `llama2 tokenizer train`, `llama2 prepare` and `llama2 evaluate`, with their defaults."""
    from llama2.commands import tokenizer
    from llama2.data import shards
    from llama2.eval import cli as evaluate
    from llama2.pipeline import STAGE_CONFIGS

    assert STAGE_CONFIGS["tokenizer"] is tokenizer.TokenizerConfig
    assert STAGE_CONFIGS["data"] is shards.PrepareConfig
    assert STAGE_CONFIGS["evaluate"] is evaluate.EvaluateConfig
    assert shards.PrepareConfig().val_fraction == 0.01
    cfg = evaluate.EvaluateConfig()
    assert (cfg.max_items, cfg.max_new_tokens, cfg.gatt_dialogues, cfg.reward_prompts) == (100, 64, 30, 100)
    assert tokenizer.TokenizerConfig().vocab_size == 32000  # Llama 2's (§2.1)


def test_a_value_outside_a_fields_choices_is_refused_when_the_recipe_is_read():
    from llama2.data.shards import PrepareConfig

    with pytest.raises(ValueError, match="recipe.yaml: field fim_unit must be one of char, line, got 'lines'"):
        from_dict(PrepareConfig, {"fim_unit": "lines"}, "recipe.yaml")
    assert from_dict(PrepareConfig, {"fim_unit": "line"}, "recipe.yaml").fim_unit == "line"
