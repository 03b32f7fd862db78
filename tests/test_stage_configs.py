"""Every stage command's settings: each field of its config is read by the code that stage runs,
or setting it is an error; ``--resume`` means the same in every stage."""

import ast
import dataclasses
import inspect
import json
import textwrap

import pytest

from llama2 import Transformer, save_model
from llama2.checkpoint import save_scalar_model
from llama2.cli import COMMANDS
from llama2.cli import main as cli
from llama2.model.heads import ScalarModel
from llama2.recipe import from_dict
from llama2.train import core, distill, dpo, finetune, gatt, guard, ppo, pretrain, rejection, reward, sft

from .conftest import tiny_config

# command -> (its config, the code that runs it: modules, or single functions where the stage
# uses one piece of a module). PPO is its own loop and takes only the optimizer from the core.
STAGES = {
    "pretrain": (pretrain.PretrainConfig, [pretrain, core]),
    "sft": (sft.SFTConfig, [sft, finetune, core]),
    "gatt": (gatt.GAttConfig, [gatt, finetune, core]),
    "reward train": (reward.RewardConfig, [reward, finetune, core]),
    "rejection-sample": (rejection.RejectionConfig, [rejection, finetune, core]),
    "ppo": (ppo.PPOConfig, [ppo, core.build_optimizer]),
    "dpo": (dpo.DPOConfig, [dpo, finetune.stage_main, core]),
    "safety-distill": (distill.DistillConfig, [distill, finetune, core]),
    "guard train": (guard.GuardConfig, [guard, finetune, core]),
}

# Fields a stage refuses to be set, since nothing there would act on them.
REFUSED = {
    "rejection-sample": ("eval_every", "eval_batches"),  # fine-tunes without validation data
    "safety-distill": ("eval_every", "eval_batches"),
    "guard train": ("eval_every", "eval_batches"),  # scored on the held-out split after training
}


def config_reads(code) -> set[str]:
    """Names read off a config in ``code`` (modules or functions): ``cfg.NAME``,
    ``self.cfg.NAME`` and ``getattr(cfg, "NAME")``. A config's own ``__post_init__`` only
    validates, so what it reads does not count."""

    def is_config(node) -> bool:
        return (isinstance(node, ast.Name) and node.id == "cfg") or (
            isinstance(node, ast.Attribute) and node.attr == "cfg"
            and isinstance(node.value, ast.Name) and node.value.id == "self")

    reads: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, ast.FunctionDef) and node.name == "__post_init__":
            return
        if isinstance(node, ast.Attribute) and is_config(node.value):
            reads.add(node.attr)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and len(node.args) >= 2 and is_config(node.args[0]) and isinstance(node.args[1], ast.Constant)):
            reads.add(node.args[1].value)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for unit in code:
        visit(ast.parse(textwrap.dedent(inspect.getsource(unit))))
    return reads


def unread_fields(cls, code) -> list[str]:
    reads = config_reads(code)
    return [f.name for f in dataclasses.fields(cls) if f.name not in reads]


def test_the_table_covers_every_training_command():
    train_modules = {module for module, _ in COMMANDS.values() if module.startswith("llama2.train.")}
    assert {code[0].__name__ for _, code in STAGES.values()} == train_modules


@pytest.mark.parametrize("command", STAGES)
def test_every_config_field_is_read_by_its_stage_or_refused(command):
    cls, code = STAGES[command]
    unread = [name for name in unread_fields(cls, code) if name not in REFUSED.get(command, ())]
    assert unread == [], f"{cls.__name__}: fields nothing in `llama2 {command}` reads: {unread}"


def test_the_check_finds_a_field_nobody_reads():
    @dataclasses.dataclass
    class WithAKnob(sft.SFTConfig):
        unused_knob: int = 0

    assert unread_fields(WithAKnob, STAGES["sft"][1]) == ["unused_knob"]


@pytest.mark.parametrize("command,name", [(c, n) for c, names in REFUSED.items() for n in names])
def test_a_refused_field_is_an_error_naming_it(command, name):
    cls, _ = STAGES[command]
    with pytest.raises(ValueError, match=f"{name}=1: .* has no validation data"):
        from_dict(cls, {name: 1}, "recipe")


# ---- PPO declares exactly what it reads ---------------------------------------------------------

# (--micro-batch-size does act in PPO: gradient accumulation within a minibatch, tests/test_ppo_guard.py)
@pytest.mark.parametrize("flag", ["--schedule cosine", "--warmup-steps 50", "--decay-steps 8",
                                  "--eval-every 10", "--precision bf16"])
def test_ppo_has_no_flags_that_would_do_nothing(flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["ppo", *flag.split()])
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["schedule", "warmup_steps", "decay_steps"])
def test_a_ppo_recipe_key_ppo_does_not_read_is_an_unknown_field(key):
    with pytest.raises(ValueError, match=f"recipe stage 'ppo': unknown field '{key}' for PPOConfig"):
        from_dict(ppo.PPOConfig, {key: 1}, "recipe stage 'ppo'")


# ---- --resume, the same in every stage --------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory, llama_tokenizer):
    root = tmp_path_factory.mktemp("models")
    lm = Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=256), seed=0)
    chat = save_model(lm, root / "chat", tokenizer=llama_tokenizer)
    rm = save_scalar_model(ScalarModel.from_language_model(lm), root / "rm", tokenizer=llama_tokenizer)
    return chat, rm


def command_line(command: str, out, chat, rm) -> list[str]:
    inputs = {"pretrain": [], "ppo": ["--reward-model", rm, "--safety-model", rm],
              "rejection-sample": ["--reward-model", rm, "--safety-model", rm],
              "safety-distill": ["--safety-model", rm], "guard train": ["--world-examples", "4"]}
    model = [] if command == "pretrain" else ["--model", str(chat)]
    return [*command.split(), "--out", str(out), *model, *map(str, inputs.get(command, []))]


def run_folder(command: str, out):
    """Where the stage's trainer keeps its checkpoints: rejection sampling fine-tunes in iter-N/."""
    return out / "iter-1" if command == "rejection-sample" else out


@pytest.mark.parametrize("command", STAGES)
def test_resume_never_refuses_a_folder_with_checkpoints_in_one_line(command, tmp_path, models, capsys):
    step = run_folder(command, tmp_path / "out") / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    (step / "trainer.json").write_text(json.dumps({"step": 3}))
    assert cli(command_line(command, tmp_path / "out", *models) + ["--resume", "never"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"llama2 {command.split()[0]}: error: --resume never: {run_folder(command, tmp_path / 'out')} "
                   f"already has checkpoints; use another --out or delete {step.parent}")


@pytest.mark.parametrize("command", STAGES)
def test_resume_latest_refuses_a_folder_without_checkpoints_in_one_line(command, tmp_path, models, capsys):
    assert cli(command_line(command, tmp_path / "out", *models) + ["--resume"]) == 1
    err = capsys.readouterr().err.strip()
    checkpoints = run_folder(command, tmp_path / "out") / "checkpoints"
    assert err == f"llama2 {command.split()[0]}: error: --resume: no checkpoint in {checkpoints}"


@pytest.mark.parametrize("command", STAGES)
def test_resume_from_a_directory_that_does_not_exist_is_refused_in_one_line(command, tmp_path, models, capsys):
    missing = tmp_path / "nowhere" / "step-9"
    assert cli(command_line(command, tmp_path / "out", *models) + ["--resume", str(missing)]) == 1
    assert capsys.readouterr().err.strip() == (f"llama2 {command.split()[0]}: error: --resume {missing}: "
                                               "no such checkpoint directory")
