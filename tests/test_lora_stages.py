"""Every training stage with ``--lora.*``: through the trainer core, adapters-only checkpoints that
resume exactly, PEFT-format results that every command loads, PPO's reference with adapters off."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama2 import load_model
from llama2.checkpoint import load_scalar_model, model_config
from llama2.cli import main as cli
from llama2.model.lora import LoRALinear
from llama2.train.ppo import PPOTrainer

from .conftest import ppo_config

ROOT = Path(__file__).resolve().parents[1]
DIALOGUE = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 is 5."}]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "chat.jsonl"
    f.write_text("".join(json.dumps({"messages": DIALOGUE}) + "\n" for _ in range(40)))
    return f


def sft_args(model, data, out, *extra, steps=4):
    return ["sft", "--model", str(model), "--data", str(data), "--out", str(out), "--seq-len", "64",
            "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", str(steps), "--lr", "1e-2",
            "--warmup-steps", "0", "--decay-steps", "4", "--eval-every", "0", "--save-every", "2", "--no-progress",
            *extra]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_lora_sft_trains_adapters_and_writes_a_peft_adapter(tmp_path, chat_dir, chat_data):
    out = tmp_path / "sft"
    assert cli(sft_args(chat_dir, chat_data, out, "--lora.method", "lora", "--lora.targets", "all")) == 0
    rows = metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    cfg = json.loads((out / "model" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(chat_dir.resolve()) and cfg["r"] == 8
    base, tuned = load_model(chat_dir), load_model(out / "model")  # base + adapter, merged
    x = torch.randint(0, 32000, (1, 8))
    assert not torch.allclose(base(x), tuned(x))


def test_lora_checkpoints_hold_adapters_and_their_optimizer_only(tmp_path, chat_dir, chat_data):
    out = tmp_path / "sft"
    assert cli(sft_args(chat_dir, chat_data, out, "--lora.method", "lora", steps=2)) == 0
    state = torch.load(out / "checkpoints" / "step-2" / "model.pt", weights_only=True)
    assert set(state) == {f"layers.{i}.attention.{w}.lora_{ab}.weight" for i in range(2) for w in ("wq", "wv")
                          for ab in "AB"}
    full = sum(p.numel() for p in load_model(chat_dir).parameters())
    assert sum(t.numel() for t in state.values()) < full / 100


def test_a_lora_run_resumes_exactly(tmp_path, chat_dir, chat_data):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # --decay-steps 4 (sft_args): the 2-step run has the schedule of a 4-step run interrupted
    # halfway. Dropout: its RNG must resume too.
    lora = ("--lora.method", "lora", "--lora.dropout", "0.1")
    assert cli(sft_args(chat_dir, chat_data, straight, *lora, steps=4)) == 0
    assert cli(sft_args(chat_dir, chat_data, resumed, *lora, steps=2)) == 0
    assert cli(sft_args(chat_dir, chat_data, resumed, *lora, steps=4)) == 0  # continues from step 2
    assert [r["loss"] for r in metrics(straight)] == [r["loss"] for r in metrics(resumed)]
    a = torch.load(straight / "checkpoints" / "step-4" / "model.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "step-4" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_other_lora_settings_is_refused_in_one_line(tmp_path, chat_dir, chat_data, capsys):
    out = tmp_path / "sft"
    assert cli(sft_args(chat_dir, chat_data, out, "--lora.method", "lora", steps=2)) == 0
    assert cli(sft_args(chat_dir, chat_data, out, "--lora.method", "lora", "--lora.targets", "q,k,v", steps=4)) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.pt" in err and "--lora settings it was written with" in err


def test_qlora_sft_trains_over_an_nf4_base(tmp_path, chat_dir, chat_data):
    out = tmp_path / "qlora"
    assert cli(sft_args(chat_dir, chat_data, out, "--lora.method", "qlora", "--lora.merge")) == 0
    rows = metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "model" / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    load_model(out / "model")


def test_pretraining_refuses_lora_in_one_line(tmp_path, capsys):
    assert cli(["pretrain", "--out", str(tmp_path), "--lora.method", "lora", "--max-steps", "1"]) != 0
    assert "LoRA is for the fine-tuning stages" in capsys.readouterr().err


def test_lora_reward_model_is_a_seq_cls_adapter_with_its_kind(tmp_path, chat_dir):
    out = tmp_path / "rm"
    rc = cli(["reward", "train", "--kind", "safety", "--model", str(chat_dir), "--out", str(out), "--max-steps", "2",
              "--world-pairs", "40", "--batch-size", "4", "--micro-batch-size", "4", "--max-len", "96",
              "--eval-every", "0", "--lora.method", "lora"])
    assert rc == 0
    cfg = json.loads((out / "model" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
    assert model_config(out / "model")["reward_kind"] == "safety"
    assert load_scalar_model(out / "model").score.weight.shape == (1, 64)
    assert json.loads((out / "eval.json").read_text())["kind"] == "safety"


# -- PPO -------------------------------------------------------------------------------------

def lora_ppo_config(root, policy, rm, out, steps, **lora):
    from llama2.train.lora import LoraConfig

    cfg = ppo_config(root, policy, rm, out, steps)
    cfg.lora = LoraConfig(method="lora", dropout=0.0, **lora)
    return cfg


def test_lora_ppo_reference_is_the_policy_with_adapters_off(rl_dirs):
    root, policy, rm = rl_dirs
    trainer = PPOTrainer(lora_ppo_config(root, policy, rm, "lora-ppo", 2), quiet=True)
    assert trainer.reference is None  # no second copy of the base
    assert any(isinstance(m, LoRALinear) for m in trainer.value.modules())
    assert trainer.value.score.weight.requires_grad
    trainer.fit()
    rows = [json.loads(x) for x in (root / "lora-ppo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # a fresh adapter adds nothing
    assert rows[1]["kl"] != 0.0  # after one update the adapters moved the policy away from the reference
    assert (root / "lora-ppo" / "model" / "adapter_config.json").is_file()
    state = torch.load(root / "lora-ppo" / "checkpoints" / "step-2" / "model.pt", weights_only=True)
    assert all("lora_" in k for k in state["policy"])
    assert set(state["value"]) - {k for k in state["value"] if "lora_" in k} == {"score.weight"}


def test_lora_ppo_resumes_exactly(rl_dirs):
    root, policy, rm = rl_dirs
    PPOTrainer(lora_ppo_config(root, policy, rm, "lora-straight", 2), quiet=True).fit()
    PPOTrainer(lora_ppo_config(root, policy, rm, "lora-resumed", 1), quiet=True).fit()
    PPOTrainer(lora_ppo_config(root, policy, rm, "lora-resumed", 2), quiet=True).fit()
    a = torch.load(root / "lora-straight" / "checkpoints" / "step-2" / "model.pt", weights_only=True)
    b = torch.load(root / "lora-resumed" / "checkpoints" / "step-2" / "model.pt", weights_only=True)
    for part in ("policy", "value"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_qlora_ppo_with_quantized_reward_models_runs(rl_dirs):
    root, policy, rm = rl_dirs
    cfg = lora_ppo_config(root, policy, rm, "qlora-ppo", 1)
    cfg.lora.method, cfg.quantize_rewards = "qlora", True
    trainer = PPOTrainer(cfg, quiet=True)
    assert type(trainer.scorer.helpful.layers[0].attention.wq.weight).__name__ == "NF4Tensor"
    assert type(trainer.policy.layers[0].attention.wq.weight).__name__ == "NF4Tensor"
    trainer.fit()
    load_model(root / "qlora-ppo" / "model")


# -- FSDP2 under torchrun --------------------------------------------------------------------

@pytest.mark.slow
def test_lora_under_torchrun_fsdp_matches_one_rank_and_resumes(tmp_path, chat_dir, chat_data):
    lora = ("--lora.method", "lora", "--lora.dropout", "0")
    assert cli(sft_args(chat_dir, chat_data, tmp_path / "one", *lora)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}

    def torchrun(steps):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llama2",
               *sft_args(chat_dir, chat_data, tmp_path / "two", *lora, "--distributed", "fsdp", steps=steps)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun(2)
    assert (tmp_path / "two" / "checkpoints" / "step-2" / "dcp").is_dir()
    torchrun(4)  # resumes from the DCP checkpoint of the adapters
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 2e-5, (a, b)
    x = torch.randint(0, 32000, (1, 8))
    torch.testing.assert_close(load_model(tmp_path / "one" / "model")(x), load_model(tmp_path / "two" / "model")(x),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("command", [["sft"], ["gatt"], ["reward", "train"], ["rejection-sample"], ["ppo"],
                                     ["safety-distill"], ["guard", "train"]])
def test_every_training_command_takes_the_same_lora_flags(command, capsys):
    argv = [*command, "--print-config", "--lora.method", "qlora", "--lora.rank", "4", "--lora.targets", "all"]
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    assert "lora:\n  method: qlora\n  rank: 4\n" in printed, printed
