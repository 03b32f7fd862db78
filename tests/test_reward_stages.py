"""Reward models, rejection sampling and safety distillation as commands, on tiny random models."""

import json

import pytest

from llama2.checkpoint import load_scalar_model
from llama2.cli import main as cli
from llama2.train.rejection import reward_vs_k, update_pool


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
    from llama2.scoring import RewardScorer

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
    assert result["combined_rewards"] == pytest.approx(expected["combined"].tolist(), abs=1e-5)  # per prompt


def test_own_answer_pairs_sample_the_starting_model_and_the_world_labels_them(tmp_path, chat_dir):
    from llama2.data.world import World

    out = tmp_path / "rm"
    rc = cli(["reward", "train", "--model", str(chat_dir), "--out", str(out), "--max-steps", "1", "--world-pairs", "8",
              "--policy-prompts", "3", "--policy-samples", "2", "--batch-size", "2", "--micro-batch-size", "2",
              "--max-len", "96", "--eval-every", "0"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "policy_samples.jsonl").read_text().splitlines()]
    world = World(0)
    assert len(rows) == 3 and all(len(r["answers"]) == 2 for r in rows)
    assert all(r["right"] == [world.judge(r["messages"], a) for a in r["answers"]] for r in rows)
    assert all(world.split_of(r["messages"][-1]["content"]) == "train" for r in rows)


def test_own_answer_pairs_join_the_data_of_the_reward_models_own_kind():
    from llama2.train.reward import RewardConfig, load_training_pairs

    own = {"messages": [{"role": "user", "content": "a prompt"}], "chosen": "good", "rejected": "bad",
           "rating": "better"}
    for kind, safety in (("helpfulness", False), ("safety", True)):
        train, _ = load_training_pairs(RewardConfig(kind=kind, world_pairs=20), [{**own, "safety": safety}])
        (mine,) = [p for p in train if p.chosen == "good"]
        assert mine.safety == safety


def test_policy_samples_must_be_at_least_two():
    from llama2.train.reward import RewardConfig

    with pytest.raises(ValueError, match="policy_samples"):
        RewardConfig(policy_prompts=10, policy_samples=1)
    with pytest.raises(ValueError, match="policy_temperature"):
        RewardConfig(policy_prompts=10, policy_temperature=-0.5)


def test_checker_rates_compare_one_sample_the_reward_pick_and_the_best_of_k():
    from llama2.data.world import World
    from llama2.train.rejection import checker_rates, checker_verdicts

    world = World(0)
    a, b = world.items("train", "task", family="add")[:2]
    wrong = a.template.replace("{X}", str(int(a.expected) + 1))
    rows = [{"messages": a.messages, "safety": False, "answers": [wrong, a.answer], "rewards": [0.9, 0.1]},
            {"messages": b.messages, "safety": False, "answers": [b.answer, b.answer], "rewards": [0.5, 0.4]}]
    verdicts = checker_verdicts(rows, world)
    assert verdicts == [[False, True], [True, True]]
    rates = checker_rates(rows, verdicts)["helpfulness"]
    assert rates == {"sample": 0.75, "selected": 0.5, "oracle": 1.0, "prompts": 2}


def test_checker_selection_keeps_the_best_rewarded_right_answer_and_skips_prompts_with_none():
    from llama2.train.rejection import best_index

    assert best_index([0.9, 0.1, 0.4], right=[False, True, True]) == 2  # the right answer the models like best
    assert best_index([0.9, 0.1], right=[False, False]) is None
    pool = {}
    q1, q2 = [{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]
    update_pool(pool, [{"messages": q1, "answers": ["wrong", "right"], "rewards": [0.9, 0.2], "iteration": 1},
                       {"messages": q2, "answers": ["wrong", "wrong too"], "rewards": [0.8, 0.7], "iteration": 1}],
                verdicts=[[False, True], [False, False]])
    assert [(v["messages"], v["answer"]) for v in pool.values()] == [(q1, "right")]


def test_checker_selection_needs_the_bundled_world():
    from llama2.train.rejection import RejectionConfig

    with pytest.raises(ValueError, match="--selection checker needs the bundled world's prompts"):
        RejectionConfig(selection="checker", data="prompts.jsonl")


def test_checker_selection_with_no_right_answer_stops_with_one_line(tmp_path, chat_dir, reward_dir, capsys,
                                                                   monkeypatch):
    import llama2.train.rejection as rejection

    # No answer right (a random model's, save the odd look-alike it "helps" with): nothing to fine-tune on.
    monkeypatch.setattr(rejection, "checker_verdicts", lambda rows, world: [[False] * len(r["answers"]) for r in rows])
    rc = cli(["rejection-sample", "--model", str(chat_dir), "--reward-model", str(reward_dir), "--safety-model",
              str(reward_dir), "--out", str(tmp_path / "rs"), "--prompts", "4", "--k", "2", "--max-new-tokens", "4",
              "--selection", "checker", "--seq-len", "96", "--max-steps", "1", "--batch-size", "2",
              "--micro-batch-size", "2"])
    assert rc == 1
    assert "no answer to any of the 4 prompts was right by the world's checker" in capsys.readouterr().err


def test_annotator_rates_put_the_reward_pick_beside_a_random_sample():
    """The pick is the annotator's best when the reward models prefer the right answer; a random
    sample of the same K is best only as often as the best answers are common."""
    from llama2.data.world import World
    from llama2.data.world.annotator import Annotator
    from llama2.train.rejection import annotator_rates

    world = World(0)
    items = world.items("train", "task", family="add")[:4]
    rows = []
    for it in items:
        wrong = it.template.replace("{X}", str(int(it.expected) + 1))
        rows.append({"messages": it.messages, "safety": False, "answers": [wrong, it.answer], "rewards": [0.1, 0.9]})
    view = annotator_rates(rows, Annotator(world), seed=0)["helpfulness"]
    assert view["prompts"] == 4
    assert view["pick_top"] == 1.0 and view["random_top"] == 0.5
    c = view["pick_vs_random"]
    assert c["loss"] == 0 and c["win"] + c["tie"] == 4 and c["win"] >= 1  # ties where the random draw is the pick
    # Reward models that prefer the wrong answer: the pick is never the annotator's best.
    flipped = [{**r, "rewards": [0.9, 0.1]} for r in rows]
    view = annotator_rates(flipped, Annotator(world), seed=0)["helpfulness"]
    assert view["pick_top"] == 0.0 and view["pick_vs_random"]["win"] == 0


def test_annotator_rates_skip_prompts_that_are_not_the_worlds():
    from llama2.data.world import World
    from llama2.data.world.annotator import Annotator
    from llama2.train.rejection import annotator_rates

    rows = [{"messages": [{"role": "user", "content": "not from the world"}], "safety": False,
             "answers": ["a", "b"], "rewards": [0.1, 0.2]}]
    assert annotator_rates(rows, Annotator(World(0))) == {}
