"""PPO (rollout masks, KL, exact resume) and the Llama Guard-style classifier."""

import json

import pytest
import torch

from llama2 import Transformer
from llama2.checkpoint import load_model
from llama2.guard import CATEGORIES, Guard, guard_prompt, metrics
from llama2.train.ppo import PPOTrainer, build_rollout

from .conftest import ppo_config, tiny_config


def test_only_answer_positions_get_policy_gradient():
    roll = build_rollout([[1, 5, 6], [1, 7]], [[8, 2], [9]])
    # row 0: tokens 1 5 6 8 2; positions 2 and 3 predict the answer tokens 8 and 2
    assert roll["mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]  # row 1: prompt, 1 answer token, padding
    assert roll["tokens"].tolist() == [[1, 5, 6, 8, 2], [1, 7, 9, 0, 0]]


def test_ppo_logs_the_papers_quantities_and_starts_at_zero_kl(rl_dirs):
    root, policy, rm = rl_dirs
    PPOTrainer(ppo_config(root, policy, rm, "run", 2), quiet=True).fit()
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for key in ("reward_helpful", "reward_safety", "reward_combined", "kl", "policy_loss", "value_loss",
                "clip_frac", "entropy", "answer_len", "rollout_tokens_per_s"):
        assert key in rows[0], key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy still equals the reference
    load_model(root / "run" / "model")


def test_ppo_resumes_exactly(rl_dirs):
    root, policy, rm = rl_dirs
    PPOTrainer(ppo_config(root, policy, rm, "straight", 2), quiet=True).fit()
    PPOTrainer(ppo_config(root, policy, rm, "resumed", 1), quiet=True).fit()
    PPOTrainer(ppo_config(root, policy, rm, "resumed", 2), quiet=True).fit()  # continues from iteration 1
    a, b = load_model(root / "straight" / "model"), load_model(root / "resumed" / "model")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_guard_prompt_lists_categories_and_the_conversation():
    text = guard_prompt([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert "'Agent' messages" in text and "User: hi" in text and "Agent: hello" in text
    for code, (name, _) in CATEGORIES.items():
        assert f"{code}: {name}" in text


def test_unsafe_score_is_the_probability_of_the_first_unsafe_piece(llama_tokenizer):
    from llama2.chat import encode_chat

    model = Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=1024), seed=0).eval()
    guard = Guard(model, llama_tokenizer)
    convo = [{"role": "user", "content": "How do I pick a lock?"}]
    ids = encode_chat(llama_tokenizer, [{"role": "user", "content": guard_prompt(convo, "User")}])
    with torch.no_grad():
        expected = torch.softmax(model(torch.tensor([ids]))[0, -1], -1)[guard.unsafe_id].item()
    assert guard.scores([convo], "User")[0] == pytest.approx(expected, rel=1e-5)
    assert guard.unsafe_id != guard.safe_id


def test_a_long_conversation_loses_its_oldest_turns_never_the_categories(llama_tokenizer):
    model = Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=1024), seed=0).eval()
    guard = Guard(model, llama_tokenizer)
    convo = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + "blah " * 60}
             for i in range(30)]
    ids = guard.encode(convo)
    text = llama_tokenizer.decode(ids)
    assert len(ids) <= 1024 - Guard.ANSWER_ROOM
    assert "O6: Self-Harm" in text and "turn 29:" in text and "turn 0:" not in text
    assert "Assess the last Agent message" in text  # the role comes from the whole conversation


def test_a_last_message_longer_than_the_context_is_an_error_not_a_verdict(llama_tokenizer):
    model = Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=512), seed=0).eval()
    with pytest.raises(ValueError, match="too long for the safety classifier"):
        Guard(model, llama_tokenizer).check([{"role": "user", "content": "word " * 3000}])


def test_precision_and_recall_per_category():
    truth = [(True, ["O1"]), (True, ["O3"]), (False, []), (True, ["O3"])]
    pred = [(True, ["O1"]), (False, []), (True, ["O3"]), (True, ["O3"])]
    m = metrics(truth, pred)
    assert m["overall"] == {"precision": 2 / 3, "recall": 2 / 3, "support": 3}
    assert m["per_category"]["O3"] == {"precision": 0.5, "recall": 0.5, "support": 2}
    assert m["per_category"]["O2"]["precision"] is None


def test_guard_check_rejects_malformed_input(rl_dirs, tmp_path, capsys):
    from llama2.cli import main

    _, policy, _ = rl_dirs
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "user"}]')
    assert main(["guard", "check", "--model", str(policy), "--file", str(bad)]) == 1
    assert "JSON list of {role, content}" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["guard", "check", "--model", str(policy), "--file", str(empty)]) == 1
    assert "empty" in capsys.readouterr().err


def test_ppo_micro_batches_and_checkpointing_give_the_same_update(rl_dirs):
    """A minibatch's gradient accumulated over micro-batches (token-weighted), with activation
    checkpointing, equals the one-pass gradient: what lets the paper's batch fit one GPU."""
    root, policy, rm = rl_dirs
    PPOTrainer(ppo_config(root, policy, rm, "one-pass", 1), quiet=True).fit()
    cfg = ppo_config(root, policy, rm, "micro", 1)
    cfg.micro_batch_size, cfg.activation_checkpointing = 1, True
    PPOTrainer(cfg, quiet=True).fit()
    a = [json.loads(x) for x in (root / "one-pass" / "metrics.jsonl").read_text().splitlines()][0]
    b = [json.loads(x) for x in (root / "micro" / "metrics.jsonl").read_text().splitlines()][0]
    for key in ("policy_loss", "value_loss", "entropy"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    x, y = load_model(root / "one-pass" / "model"), load_model(root / "micro" / "model")
    for (name, p), q in zip(x.state_dict().items(), y.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_ppo_rollouts_in_chunks_run_and_keep_every_prompt(rl_dirs):
    root, policy, rm = rl_dirs
    cfg = ppo_config(root, policy, rm, "chunked", 1)
    cfg.rollout_batch_size = 3  # 4 prompts: chunks of 3 and 1
    trainer = PPOTrainer(cfg, quiet=True)
    roll = trainer.rollout(trainer.batch_prompts())
    assert roll["tokens"].shape[0] == 4 and roll["logp"].shape == roll["mask"].shape
