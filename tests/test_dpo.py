"""``llama2 dpo``: the DPO loss, answer-token log-probabilities, the reference pass, training,
exact resume, LoRA and the command's errors, on tiny random models."""

import json
import math

import pytest
import torch
import yaml

from llama2.chat import chat_segments
from llama2.checkpoint import load_model, load_tokenizer
from llama2.data.preference import Pair
from llama2.data.shards import PackedLoader
from llama2.recipe import TINY_RECIPE, from_dict, read_recipe, to_dict
from llama2.train.dpo import (
    REFERENCE_FILE,
    DPOConfig,
    DPOPairs,
    dpo_loss,
    encode_answer,
    make_loss_fn,
    pair_logps,
    reference_logps,
    run,
)

from .conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# Eight pairs a random model can tell apart after a few steps: one short right answer and one
# wrong one per prompt.
PAIRS = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}.", "rejected": f"I do not know, maybe {a * b + 7}.",
          "rating": "better"} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("dpo-data") / "pairs.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return f


def dpo_args(chat_dir, pairs_file, out, *extra, steps=4):
    return ["dpo", "--model", chat_dir, "--data", pairs_file, "--out", out, "--max-steps", steps, "--batch-size", 4,
            "--micro-batch-size", 2, "--max-len", 64, "--lr", 1e-3, "--warmup-steps", 0, "--decay-steps", 4,
            "--eval-every", 0, "--eval-batches", 0, "--save-every", 2, "--no-progress", *extra]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- the loss ------------------------------------------------------------------------------------

def test_dpo_loss_on_hand_computed_log_probabilities():
    # h = (-10 - -11) - (-12 - -11) = 2; beta h = 0.2; -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598138869.
    # With label smoothing 0.1: 0.9 * 0.598138869 + 0.1 * log(1 + e^0.2) = 0.598138869 + 0.1 * 0.2.
    args = [torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -5.0]), torch.tensor([-11.0, -4.0]),
            torch.tensor([-11.0, -4.0])]
    losses, r_c, r_r = dpo_loss(*args, beta=0.1)
    assert losses.tolist() == pytest.approx([0.598138869, math.log(2)], abs=1e-7)
    assert r_c.tolist() == pytest.approx([0.1, -0.1]) and r_r.tolist() == pytest.approx([-0.1, -0.1])
    smoothed, _, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.1)
    assert smoothed.tolist() == pytest.approx([0.618138869, math.log(2)], abs=1e-7)


def test_dpo_loss_equals_trls_sigmoid_loss_written_out():
    # TRL's DPOTrainer, loss_type "sigmoid" (from the DPO paper, Eq. 7, and its conservative
    # variant): logits = (pi_c - pi_r) - (ref_c - ref_r);
    # loss = -logsigmoid(beta logits) (1 - ls) - logsigmoid(-beta logits) ls.
    def trl(pc, pr, rc, rr, beta, ls):
        logits = (pc - pr) - (rc - rr)
        return (-math.log(1 / (1 + math.exp(-beta * logits))) * (1 - ls)
                - math.log(1 / (1 + math.exp(beta * logits))) * ls)

    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-50 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
    for beta, ls in [(0.1, 0.0), (0.5, 0.2), (0.05, 0.49)]:
        ours = dpo_loss(pc, pr, rc, rr, beta, ls)[0].tolist()
        assert ours == pytest.approx([trl(*map(float, x), beta, ls) for x in zip(pc, pr, rc, rr)], rel=1e-12)


# ---- answer-token log-probabilities ---------------------------------------------------------------

def test_summed_log_prob_covers_the_final_answer_tokens_only(chat_dir):
    model = load_model(chat_dir)
    tok = load_tokenizer(chat_dir, model.config.vocab_size)
    # A two-turn dialogue: the first assistant answer is prompt, only the last one counts.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                {"role": "user", "content": "Capital of France?"}]
    data = DPOPairs([Pair(messages, "Paris.", "It is Lyon, I think.", "better")], tok, max_len=256)
    with torch.no_grad():
        ours = pair_logps(model, data.encode([0]))
        for got, answer in zip(ours, ("Paris.", "It is Lyon, I think.")):
            ids, is_answer = encode_answer(tok, messages, answer)
            positions = [i for i, a in enumerate(is_answer) if a]
            assert ids[-1] == tok.eos_id and positions[-1] == len(ids) - 1  # the answer ends with EOS
            last = chat_segments(tok, [*messages, {"role": "assistant", "content": answer}],
                                 allow_final_assistant=True)[-1]
            assert last.is_answer and positions == list(range(len(ids) - len(last.ids), len(ids)))
            logp = torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)
            manual = sum(logp[i - 1, ids[i]].item() for i in positions)
            assert got.item() == pytest.approx(manual, abs=1e-4)


# ---- the reference pass and step 0 ----------------------------------------------------------------

def test_at_step_zero_the_policy_is_the_reference_loss_log2_rewards_zero(chat_dir):
    model = load_model(chat_dir, training=True)
    tok = load_tokenizer(chat_dir, model.config.vocab_size)
    data = DPOPairs([Pair([{"role": "user", "content": p["prompt"]}], p["chosen"], p["rejected"], p["rating"])
                     for p in PAIRS], tok, max_len=64)
    data.ref = reference_logps(model, data, micro_batch_size=3, device=torch.device("cpu"))  # another grouping
    batch = next(iter(PackedLoader(data, 4, seed=1)))
    loss, m = make_loss_fn(beta=0.1)(model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert abs(m["rewards/chosen"].item()) < 1e-5 and abs(m["rewards/rejected"].item()) < 1e-5


# ---- training -------------------------------------------------------------------------------------

def test_a_few_steps_raise_the_reward_margin_and_accuracy_on_the_training_pairs(tmp_path, chat_dir, pairs_file,
                                                                                 capsys):
    out = tmp_path / "dpo"
    rc, _, err = run_cli(capsys, *dpo_args(chat_dir, pairs_file, out, "--decay-steps", 8, steps=8))
    assert rc == 0, err
    m = metrics(out)
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and m[0]["rewards/margin"] == 0
    assert m[-1]["rewards/margin"] > 0.5 and m[-1]["rewards/accuracy"] == 1.0 and m[-1]["loss"] < 0.45
    assert (out / "model" / "model.safetensors").is_file() and (out / REFERENCE_FILE).is_file()
    assert load_model(out / "model").config.vocab_size == 32000


def test_validation_reports_loss_and_reward_accuracy_on_held_out_pairs(tmp_path, chat_dir, pairs_file):
    cfg = DPOConfig(model=str(chat_dir), data=str(pairs_file), val_data=str(pairs_file), out=str(tmp_path / "v"),
                    max_steps=1, batch_size=4, micro_batch_size=2, max_len=64, eval_every=1, eval_batches=2,
                    progress=False)
    last = run(cfg, quiet=True)
    first = metrics(tmp_path / "v")[0]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert {"val_loss", "val_rewards/accuracy", "val_rewards/margin"} <= set(last)


def test_two_steps_and_a_resume_to_four_equal_four_straight(tmp_path, chat_dir, pairs_file, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli(capsys, *dpo_args(chat_dir, pairs_file, straight, steps=4))[0] == 0
    assert run_cli(capsys, *dpo_args(chat_dir, pairs_file, resumed, steps=2))[0] == 0
    # Without the saved reference log-probabilities the resumed run computes them again: the same numbers.
    (resumed / REFERENCE_FILE).unlink()
    rc, _, err = run_cli(capsys, *dpo_args(chat_dir, pairs_file, resumed, steps=4))
    assert rc == 0 and "resumed from" in err and "reference pass" in err
    a, b = (load_model(d / "model").state_dict() for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(straight)] == [r["loss"] for r in metrics(resumed)]


def test_a_resumed_run_reads_the_saved_reference_log_probs(tmp_path, chat_dir, pairs_file, capsys):
    out = tmp_path / "dpo"
    assert run_cli(capsys, *dpo_args(chat_dir, pairs_file, out, steps=2))[0] == 0
    rc, _, err = run_cli(capsys, *dpo_args(chat_dir, pairs_file, out, steps=3))
    assert rc == 0 and "read from" in err and "reference pass" not in err


def test_lora_dpo_starts_at_log2_and_writes_an_adapter(tmp_path, chat_dir, pairs_file, capsys):
    out = tmp_path / "lora"
    rc, _, err = run_cli(capsys, *dpo_args(chat_dir, pairs_file, out, "--lora.method", "lora", "--lora.dropout", 0,
                                           steps=2))
    assert rc == 0, err
    m = metrics(out)
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and m[0]["rewards/margin"] == 0
    assert m[1]["rewards/margin"] != 0  # the adapters moved the policy away from the reference
    assert (out / "model" / "adapter_config.json").is_file()
    assert not (out / "model" / "model.safetensors").exists()


# ---- the command ----------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (("--beta", "0"), "beta must be positive, got 0.0"),
    (("--beta", "-0.1"), "beta must be positive"),
    (("--label-smoothing", "0.5"), "label_smoothing must be in [0, 0.5), got 0.5"),
    (("--label-smoothing", "-0.1"), "label_smoothing must be in [0, 0.5)"),
])
def test_bad_settings_are_one_line_errors(tmp_path, chat_dir, pairs_file, capsys, flags, message):
    rc, _, err = run_cli(capsys, *dpo_args(chat_dir, pairs_file, tmp_path / "x", *flags))
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_empty_data_is_a_one_line_error(tmp_path, chat_dir, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, _, err = run_cli(capsys, *dpo_args(chat_dir, empty, tmp_path / "x"))
    assert rc == 1 and "no preference pairs" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_without_config_the_command_uses_the_tiny_recipes_dpo_block(capsys):
    recipe = read_recipe(TINY_RECIPE)
    block = {**(recipe.get("standalone") or {}), **recipe["stages"]}["dpo"]
    rc, out, _ = run_cli(capsys, "dpo", "--print-config")
    assert rc == 0 and yaml.safe_load(out) == to_dict(from_dict(DPOConfig, block))
