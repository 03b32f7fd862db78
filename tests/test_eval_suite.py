"""The assistant-world suite on oracle and degenerate answerers, and `llama2 evaluate`."""

import json

import pytest

from llama2.data.world import World
from llama2.eval.suite import evaluate_world, format_table

WORLD = World(0)


def oracle(dialogues):
    """Answers every prompt with the world's gold answer (constrained when a system prompt says so)."""
    out = []
    for msgs in dialogues:
        ref = WORLD.reference_answer(msgs)
        assert ref is not None, msgs
        out.append(ref)
    return out


def test_a_perfect_assistant_scores_perfectly():
    r = evaluate_world(oracle, max_items=20, gatt_turns=(1, 4, 20), gatt_dialogues=4)
    assert (r["task_accuracy"], r["safe_refusal_rate"], r["false_refusal_rate"]) == (1.0, 1.0, 0.0)
    assert r["gatt_adherence"] == {"1": 1.0, "4": 1.0, "20": 1.0}


def test_an_assistant_that_always_refuses_is_safe_but_useless():
    r = evaluate_world(lambda ds: ["I can't help with that."] * len(ds), max_items=20, gatt_turns=(1,),
                       gatt_dialogues=2)
    assert (r["task_accuracy"], r["safe_refusal_rate"], r["false_refusal_rate"]) == (0.0, 1.0, 1.0)
    assert r["gatt_adherence"]["1"] == 0.0


def test_table_lists_every_rate():
    text = format_table(evaluate_world(oracle, max_items=5, gatt_turns=(1, 2), gatt_dialogues=1))
    for word in ("task accuracy", "safe-refusal", "false-refusal", "turn  2"):
        assert word in text


def test_evaluate_command_prints_the_json_keys(tmp_path, llama_tokenizer, capsys):
    from llama2 import Transformer, save_model
    from llama2.cli import main

    from .conftest import tiny_config

    d = save_model(Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=512), seed=0), tmp_path / "m",
                   tokenizer=llama_tokenizer)
    assert main(["evaluate", "--model", str(d), "--json", "--max-items", "3", "--gatt-dialogues", "1",
                 "--gatt-turns", "1", "2", "--max-new-tokens", "4"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"task_accuracy", "safe_refusal_rate", "false_refusal_rate", "gatt_adherence"} <= set(r)
    assert set(r["gatt_adherence"]) == {"1", "2"}


def test_evaluate_command_asks_the_prompts_of_the_models_world(tmp_path, llama_tokenizer, capsys):
    from llama2 import Transformer, save_model
    from llama2.cli import main
    from llama2.data.world import World

    from .conftest import tiny_config

    d = save_model(Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=512), seed=0), tmp_path / "m",
                   tokenizer=llama_tokenizer)
    assert main(["evaluate", "--model", str(d), "--json", "--max-items", "3", "--gatt-dialogues", "0",
                 "--max-new-tokens", "2", "--world-seed", "1"]) == 0
    asked = [a["prompt"] for a in json.loads(capsys.readouterr().out)["answers"]]
    assert asked == [it.prompt for it in World(1).eval_prompts("test", 3)]
    assert asked != [it.prompt for it in World(0).eval_prompts("test", 3)]


def test_each_answer_says_whether_it_counted_as_a_success():
    # Solved for a task, refused for an unsafe request, answered for a benign look-alike: the
    # per-prompt flags behind the rates, so two models can be compared prompt by prompt.
    r = evaluate_world(oracle, max_items=10, gatt_turns=(1,), gatt_dialogues=1)
    assert {a["kind"] for a in r["answers"]} == {"task", "unsafe", "benign"}
    assert all(a["right"] for a in r["answers"])
    refuser = evaluate_world(lambda ds: ["I can't help with that."] * len(ds), max_items=10, gatt_turns=(1,),
                             gatt_dialogues=1)
    assert {a["kind"]: a["right"] for a in refuser["answers"]} == {"task": False, "unsafe": True, "benign": False}


def _ev(rights, kind="task", **extra):
    """An evaluation whose per-prompt flags are ``rights`` (the suite's eval.json shape)."""
    rate = {"task": "task_accuracy", "unsafe": "safe_refusal_rate", "benign": "false_refusal_rate"}[kind]
    value = sum(rights) / len(rights)
    return {rate: 1 - value if kind == "benign" else value, **extra,
            "answers": [{"kind": kind, "prompt": f"q{i}", "answer": "", "right": r} for i, r in enumerate(rights)]}


def _verdict(before, after, stage="rejection"):
    from llama2.report import verdicts

    lines = verdicts({"eval": {"sft": before, stage: after}, "reward_eval": {}})
    return [v.replace("rejection sampling", "RS") for v in lines]


def test_the_sign_test_matches_scipys_exact_binomial_test():
    binomtest = pytest.importorskip("scipy.stats").binomtest
    from llama2.eval.stats import sign_test

    for gained, lost in [(15, 7), (13, 7), (44, 24), (10, 25), (0, 4), (2, 1), (30, 0), (5, 5)]:
        assert sign_test(gained, lost) == pytest.approx(binomtest(gained, gained + lost).pvalue, rel=1e-9)
    assert sign_test(0, 0) == 1.0
    with pytest.raises(ValueError, match="gained=-1"):
        sign_test(-1, 3)


def test_the_report_counts_task_prompts_gained_and_lost_between_two_models():
    # 12 prompts turn right, none turn wrong: p = 2 / 2**12, a real gain.
    before, after = _ev([False] * 12 + [True] * 8), _ev([True] * 20)
    assert "RS improved task accuracy: 40.0% → 100.0% (gained 12, lost 0 of 20 task prompts; sign test p = 0.00049)" \
        in _verdict(before, after)


def test_a_change_within_noise_is_not_called_an_improvement():
    # Accuracy 40% -> 60%, but only because 3 prompts turned right and 1 turned wrong (p = 0.62).
    before = _ev([True, True, True, True, False, False, False, False, False, False])
    after = _ev([True, True, True, False, True, True, True, False, False, False])
    assert "RS did NOT significantly change task accuracy: 40.0% → 60.0% (gained 3, lost 1 of 10 task prompts; " \
        "sign test p = 0.62)" in _verdict(before, after)


def test_a_significant_loss_of_safe_refusals_is_called_a_worsening():
    before, after = _ev([True] * 10, "unsafe"), _ev([False] * 8 + [True] * 2, "unsafe")
    assert "PPO WORSENED the safe-refusal rate: 100.0% → 20.0% (gained 0, lost 8 of 10 unsafe prompts; " \
        "sign test p = 0.0078)" in _verdict(before, after, "ppo")


def test_a_rate_no_prompt_moved_is_called_kept():
    before = after = _ev([True] * 10, "unsafe")
    assert "PPO kept the safe-refusal rate: 100.0% → 100.0% (no change on any of the 10 unsafe prompts)" \
        in _verdict(before, after, "ppo")


def test_false_refusals_count_look_alike_prompts_newly_refused():
    # "right" on a look-alike means answered; two answered prompts are now refused.
    before, after = _ev([True] * 10, "benign"), _ev([False, False] + [True] * 8, "benign")
    assert "PPO did NOT significantly change the false-refusal rate: 0.0% → 20.0% (2 more, 0 fewer refused of 10 " \
        "look-alike prompts; sign test p = 0.5)" in _verdict(before, after, "ppo")


def test_the_held_out_reward_is_compared_prompt_by_prompt():
    from llama2.report import verdicts

    ev = {"sft": {"combined_reward": 0.5, "combined_rewards": [0.5] * 10},
          "rejection": {"combined_reward": 0.6, "combined_rewards": [0.6] * 9 + [0.5]}}
    assert "rejection sampling improved the held-out combined reward: 0.500 → 0.600 (higher on 9, lower on 0 of " \
        "10 prompts; sign test p = 0.0039)" in verdicts({"eval": ev, "reward_eval": {}})
    # Evaluations written before per-prompt rewards were kept: the means alone, no test.
    ev = {"sft": {"combined_reward": 0.5}, "rejection": {"combined_reward": 0.6}}
    assert "rejection sampling improved the held-out combined reward: 0.500 → 0.600" in \
        verdicts({"eval": ev, "reward_eval": {}})


def test_gatt_adherence_is_compared_dialogue_by_dialogue():
    from llama2.report import verdicts

    r = evaluate_world(oracle, max_items=5, gatt_turns=(1, 20), gatt_dialogues=4)
    assert r["gatt_kept"]["20"] == [True] * 4  # per dialogue, behind gatt_adherence["20"]
    ev = {"ppo": {"gatt_adherence": {"20": 0.0}, "gatt_kept": {"20": [False] * 8}},
          "gatt": {"gatt_adherence": {"20": 0.75}, "gatt_kept": {"20": [True] * 6 + [False] * 2}}}
    assert "GAtt (final chat model) improved system-instruction adherence at turn 20: 0.0% → 75.0% (gained 6, " \
        "lost 0 of 8 dialogues; sign test p = 0.031)" in verdicts({"eval": ev, "reward_eval": {}})


def test_task_accuracy_is_split_into_prompts_in_and_out_of_the_models_knowledge():
    """An assistant that answers only what the training split showed is right on every
    in-knowledge task and on no out-of-knowledge one."""
    ann = WORLD.annotator

    def knows_only_training(dialogues):
        return [ref if ann.knowledge(msgs) == "in" else "I do not know." for msgs, ref in zip(dialogues, oracle(dialogues))]

    r = evaluate_world(knows_only_training, max_items=60, gatt_turns=(1,), gatt_dialogues=1)
    c = r["counts"]
    assert c["task_in_knowledge"] > 0 and c["task_out_of_knowledge"] > 0
    assert c["task_in_knowledge"] + c["task_out_of_knowledge"] == c["task"]
    assert r["task_accuracy_by_knowledge"] == {"in": 1.0, "out": 0.0}
    assert "out of knowledge     0.0%" in format_table(r)
