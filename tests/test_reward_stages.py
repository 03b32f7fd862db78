"""Reward models, rejection sampling and safety distillation as commands, on tiny random models."""

import json

import pytest

from llama2 import Transformer, save_model
from llama2.checkpoint import load_scalar_model
from llama2.cli import main as cli
from llama2.train.rejection import reward_vs_k, update_pool

from .conftest import tiny_config


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, llama_tokenizer):
    d = tmp_path_factory.mktemp("chat")
    return save_model(Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=256), seed=0), d / "model",
                      tokenizer=llama_tokenizer)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, chat_dir):
    out = tmp_path_factory.mktemp("rm")
    rc = cli(["reward", "train", "--model", str(chat_dir), "--out", str(out), "--max-steps", "2", "--world-pairs", "40",
              "--batch-size", "4", "--micro-batch-size", "4", "--max-len", "96", "--eval-every", "0"])
    assert rc == 0
    return out / "model"


def test_reward_training_writes_a_reward_model_directory(reward_dir):
    model = load_scalar_model(reward_dir)
    assert not hasattr(model, "output") and model.score.weight.shape[0] == 1
    config = json.loads((reward_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1


def test_reward_eval_reports_accuracy_by_rating(reward_dir, capsys):
    assert cli(["reward", "eval", "--model", str(reward_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["accuracy_by_rating"]) == {"significantly_better", "better", "slightly_better",
                                                 "negligibly_better"}
    assert 0.0 <= result["accuracy"] <= 1.0


def test_a_language_model_is_not_a_reward_model(chat_dir, capsys):
    assert cli(["reward", "eval", "--model", str(chat_dir)]) == 1
    assert "not a reward model" in capsys.readouterr().err


def test_pool_keeps_the_best_answer_over_all_iterations():
    pool = {}
    msgs = [{"role": "user", "content": "q"}]
    update_pool(pool, [{"messages": msgs, "answers": ["a", "b"], "rewards": [0.2, 0.9], "iteration": 1}])
    update_pool(pool, [{"messages": msgs, "answers": ["c"], "rewards": [0.5], "iteration": 2}])
    (best,) = pool.values()
    assert (best["answer"], best["iteration"]) == ("b", 1)


def test_reward_against_k_is_the_mean_of_the_best_of_the_first_k():
    curve = reward_vs_k([[0.1, 0.5, 0.3, 0.9], [0.4, 0.2, 0.8, 0.1]])
    assert curve["k"] == [1, 2, 4]
    assert curve["max"] == pytest.approx([0.25, 0.45, 0.85])
    assert curve["max"] == sorted(curve["max"])


def test_rejection_sampling_runs_an_iteration_and_fine_tunes(tmp_path, chat_dir, reward_dir):
    out = tmp_path / "rs"
    rc = cli(["rejection-sample", "--model", str(chat_dir), "--reward-model", str(reward_dir), "--safety-model",
              str(reward_dir), "--out", str(out), "--prompts", "6", "--k", "3", "--max-new-tokens", "6",
              "--batch-size", "2", "--micro-batch-size", "2", "--seq-len", "96", "--max-steps", "1"])
    assert rc == 0
    curve = json.loads((out / "reward_vs_k.json").read_text())["iterations"][0]["reward_vs_k"]
    assert curve["k"] == [1, 2, 3] and curve["prompts"] == 6
    assert len((out / "pool.jsonl").read_text().splitlines()) == 6
    assert (out / "model" / "model.safetensors").is_file()


def test_safety_distillation_keeps_only_answers_the_safety_model_prefers(tmp_path, chat_dir, reward_dir):
    out = tmp_path / "sd"
    rc = cli(["safety-distill", "--model", str(chat_dir), "--safety-model", str(reward_dir), "--out", str(out),
              "--prompts", "8", "--max-new-tokens", "6", "--batch-size", "1", "--micro-batch-size", "1",
              "--seq-len", "96", "--max-steps", "1"])
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(r["kept"] == (r["score_preprompted"] > r["score_plain"]) for r in rows)
    assert rc == 0 or not any(r["kept"] for r in rows)


def test_held_out_reward_is_the_gated_reward_of_the_answers_to_test_prompts(reward_dir):
    from llama2.data.world import World
    from llama2.eval.cli import held_out_reward
    from llama2.train.scoring import RewardScorer

    def generate(dialogues):
        return ["I can't help with that." if i % 2 else "The answer is 4." for i in range(len(dialogues))]

    scorer = RewardScorer(str(reward_dir), str(reward_dir))
    result = held_out_reward(generate, scorer, "test", 6)
    prompts = World(0).rl_prompts("test", 6)
    expected = scorer.combined(
        [p["messages"] for p in prompts], generate(prompts), [p["safety"] for p in prompts])
    assert result["reward_prompts"] == 6
    assert result["combined_reward"] == pytest.approx(expected["combined"].mean().item(), abs=1e-6)
    assert result["helpful_reward"] == pytest.approx(expected["helpful"].mean().item(), abs=1e-6)
