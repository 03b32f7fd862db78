"""Same seed, same run: every random draw of a stage comes from the stage's seed, so a run that
is interrupted (Ctrl-C, a killed process) and resumed ends where an uninterrupted run ends, bit
for bit: the same models and the same report."""

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llama2 import Transformer, save_model
from llama2.model.heads import ScalarModel
from llama2.pipeline import run_pipeline

from .conftest import ppo_config, tiny_config


def scramble_global_rngs(seed: int) -> None:
    """What a fresh process (or an earlier stage) leaves in the global generators: anything."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.rand(seed % 7 + 1)


# ---- the reward head ---------------------------------------------------------------------------

def test_a_reward_head_is_drawn_from_the_seed_alone():
    lm = Transformer.from_config(tiny_config(), seed=0)
    scramble_global_rngs(1)
    a = ScalarModel.from_language_model(lm, seed=5)
    scramble_global_rngs(2)
    b = ScalarModel.from_language_model(lm, seed=5)
    assert torch.equal(a.score.weight, b.score.weight)
    assert not torch.equal(a.score.weight, ScalarModel.from_language_model(lm, seed=6).score.weight)
    # the trunk is the language model's, copied (training the reward model leaves the policy alone)
    for name, w in lm.state_dict().items():
        if not name.startswith("output."):
            assert torch.equal(a.state_dict()[name], w) and a.state_dict()[name].data_ptr() != w.data_ptr(), name


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, llama_tokenizer):
    d = tmp_path_factory.mktemp("chat")
    return save_model(Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=256), seed=0), d / "model",
                      tokenizer=llama_tokenizer)


def test_reward_training_twice_with_one_seed_gives_one_model(tmp_path, chat_dir):
    """`llama2 reward train --seed 0` twice, whatever drew from the global generators before."""
    from llama2.cli import main as cli

    args = ["reward", "train", "--model", str(chat_dir), "--seed", "0", "--max-steps", "2", "--world-pairs", "24",
            "--batch-size", "4", "--micro-batch-size", "4", "--max-len", "96", "--eval-every", "0", "--no-progress"]
    for n, out in enumerate(("first", "second")):
        scramble_global_rngs(n)
        assert cli(args + ["--out", str(tmp_path / out)]) == 0
    first, second = ((tmp_path / out / "model" / "model.safetensors").read_bytes() for out in ("first", "second"))
    assert first == second


# ---- PPO's early stop -----------------------------------------------------------------------------

def test_ppo_stopped_early_by_its_kl_limit_stays_stopped_when_resumed(rl_dirs, monkeypatch):
    """Interrupted after the early stop's checkpoint, before the policy is written: resuming writes
    the policy of the iteration that stopped, it does not train on to max_steps."""
    import dataclasses

    from llama2.train import ppo

    root, policy, rm = rl_dirs

    def config(out):  # iteration 1's KL is 0 (the policy is the reference), iteration 2's is not
        return dataclasses.replace(ppo_config(root, policy, rm, out, steps=4), max_kl=1e-12)

    straight = ppo.run(config("kl-straight"), quiet=True)
    assert straight["iteration"] == 2

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ppo, "save_model", killed)  # the name ppo.py writes its policy with
        with pytest.raises(KeyboardInterrupt):
            ppo.run(config("kl-resumed"), quiet=True)
    assert _without_time(ppo.run(config("kl-resumed"), quiet=True)) == _without_time(straight)
    model = Path("model") / "model.safetensors"
    assert (root / "kl-resumed" / model).read_bytes() == (root / "kl-straight" / model).read_bytes()


# ---- llama2 run, interrupted and resumed -------------------------------------------------------

# Where the smoke run is interrupted, in the order it gets there: (where, "module:attribute", when,
# before). ``when(args, calls)`` is asked at each call of the attribute (its arguments, and how
# many calls so far counting this one); True raises KeyboardInterrupt there, as Ctrl-C would:
# before the call does anything if ``before``, else once it has done its work.
def _stage(args) -> str:
    return Path(args[0].cfg.out).name


INTERRUPTIONS = [
    ("tokenizer, trained, before its stage is marked done",
     "llama2.commands.tokenizer:train_tokenizer", lambda args, calls: True, False),
    ("pretrain, mid-training: step 5 logged, its last checkpoint at step 3",
     "llama2.train.core:Trainer._write_metrics",
     lambda args, calls: _stage(args) == "pretrain" and args[1]["step"] == 5, False),
    ("sft, after its last checkpoint, before the model is exported",
     "llama2.train.core:Trainer.save_checkpoint", lambda args, calls: _stage(args) == "sft", False),
    ("reward-helpfulness, after sampling the policy, before training",
     "llama2.train.reward:load_training_pairs", lambda args, calls: args[0].kind == "helpfulness", False),
    ("reward-safety, after its last checkpoint",
     "llama2.train.core:Trainer.save_checkpoint", lambda args, calls: _stage(args) == "reward-safety", False),
    ("rejection, after sampling and scoring, after fine-tuning's last checkpoint",
     "llama2.train.core:Trainer.save_checkpoint", lambda args, calls: _stage(args) == "iter-1", False),
    ("ppo, iteration 1 logged, before its first checkpoint",
     "llama2.train.ppo:PPOTrainer.save_checkpoint", lambda args, calls: args[0].iteration == 1, True),
    ("ppo, mid-training: iteration 2 done, its last checkpoint at iteration 1",
     "llama2.train.ppo:PPOTrainer.step", lambda args, calls: args[0].iteration == 2, False),
    ("reward-helpfulness-2, with round 1's comparisons, after sampling the PPO model, before training",
     "llama2.train.reward:load_training_pairs", lambda args, calls: Path(args[0].out).name == "reward-helpfulness-2",
     False),
    ("dpo, after its last checkpoint, before the model is exported",
     "llama2.train.core:Trainer.save_checkpoint", lambda args, calls: _stage(args) == "dpo", False),
    ("gatt, finished, before its stage is marked done",
     "llama2.train.gatt:run", lambda args, calls: True, False),
    ("evaluate, after two of the eight models",
     "llama2.eval.cli:evaluate_model", lambda args, calls: calls == 2, False),
]


def _interrupt(monkeypatch, target: str, when, before: bool) -> None:
    import importlib

    module, _, path = target.partition(":")
    *owners, name = path.split(".")
    owner = importlib.import_module(module)
    for attr in owners:
        owner = getattr(owner, attr)
    original = getattr(owner, name)
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if before and when(args, calls):
            raise KeyboardInterrupt
        result = original(*args, **kwargs)
        if not before and when(args, calls):
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(owner, name, wrapper)


TIME_FIELDS = {"seconds", "tokens_per_s", "mfu", "rollout_tokens_per_s", "generation_s", "scoring_s", "train_s"}


def _without_time(obj):
    if isinstance(obj, dict):
        return {k: _without_time(v) for k, v in obj.items() if k not in TIME_FIELDS}
    if isinstance(obj, list):
        return [_without_time(v) for v in obj]
    return obj


def _report(run: Path) -> str:
    """report.md without what is not the run's to decide: its folder and the wall-clock times."""
    text = (run / "report.md").read_text()
    text = text.replace(str(run), "RUN")
    return text[: text.index("## Time per stage")]


def _records(run: Path) -> dict:
    """Every record a run keeps (metrics, evaluations, samples, stage summaries), times left out;
    the evaluation's reward-model and model stamps (file size and mtime) are left out too."""
    out = {}
    for f in sorted(run.rglob("*.json*")):
        if "checkpoints" in f.parts:
            continue
        text = f.read_text()
        rows = [json.loads(line) for line in text.splitlines()] if f.suffix == ".jsonl" else json.loads(text)
        if f.name in ("eval.json", "results.json"):
            for r in rows.values() if f.name == "results.json" else [rows]:
                r.pop("reward_models", None)
        if f.name == "h2h.json":  # a model's head-to-head answers, stamped with its weights' file
            rows.pop("weights")
        if f.name == "index.json":  # the prepared data names its own folder
            rows = json.loads(text.replace(str(run), "RUN"))
        out[str(f.relative_to(run))] = _without_time(rows)
    return out


def _weights(run: Path) -> dict:
    """SHA-256 of every model's weights (and of its tokenizer, which names no path)."""
    return {str(f.relative_to(run)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted([*run.rglob("*.safetensors"), *run.rglob("tokenizer.model")])
            if "checkpoints" not in f.parts}


@pytest.mark.slow
def test_a_smoke_run_interrupted_in_every_kind_of_stage_and_resumed_equals_one_never_interrupted(tmp_path,
                                                                                                 monkeypatch):
    scramble_global_rngs(0)
    run_pipeline("smoke", tmp_path / "straight", quiet=True)

    resumed = tmp_path / "resumed"
    for n, (_where, target, when, before) in enumerate(INTERRUPTIONS, 1):
        with monkeypatch.context() as m:
            _interrupt(m, target, when, before)
            scramble_global_rngs(n)  # each attempt is a new process
            with pytest.raises(KeyboardInterrupt):  # fails if the run never got there
                run_pipeline("smoke", resumed, quiet=True)
    scramble_global_rngs(len(INTERRUPTIONS) + 1)
    run_pipeline("smoke", resumed, quiet=True)

    straight = tmp_path / "straight"
    weights = _weights(straight)
    assert {str(Path(f).parent) for f in weights if f.endswith(".safetensors")} == {  # every model, none missing
        "pretrain/model", "sft/model", "reward-helpfulness/model", "reward-safety/model", "rejection/iter-1/model",
        "rejection/model", "ppo/model", "reward-helpfulness-2/model", "reward-safety-2/model",
        "rejection-2/iter-1/model", "rejection-2/model", "ppo-2/model", "dpo/model", "gatt/model", "chat",
        "guard/model"}
    assert _weights(resumed) == weights
    assert _report(resumed) == _report(straight)
    assert _records(resumed) == _records(straight)
