"""The assistant-world suite on oracle and degenerate answerers, and `llama2 evaluate`."""

import json

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


def test_each_answer_says_whether_it_counted_as_a_success():
    # Solved for a task, refused for an unsafe request, answered for a benign look-alike: the
    # per-prompt flags behind the rates, so two models can be compared prompt by prompt.
    r = evaluate_world(oracle, max_items=10, gatt_turns=(1,), gatt_dialogues=1)
    assert {a["kind"] for a in r["answers"]} == {"task", "unsafe", "benign"}
    assert all(a["right"] for a in r["answers"])
    refuser = evaluate_world(lambda ds: ["I can't help with that."] * len(ds), max_items=10, gatt_turns=(1,),
                             gatt_dialogues=1)
    assert {a["kind"]: a["right"] for a in refuser["answers"]} == {"task": False, "unsafe": True, "benign": False}


def test_the_report_counts_task_prompts_gained_and_lost_between_two_models():
    from llama2.report import verdicts

    def ev(rights):
        return {"task_accuracy": sum(rights) / len(rights),
                "answers": [{"kind": "task", "prompt": f"q{i}", "answer": "", "right": r} for i, r in enumerate(rights)]}

    data = {"eval": {"sft": ev([True, True, False, False, False]), "rejection": ev([True, False, True, True, False])},
            "reward_eval": {}}
    assert "RS improved task accuracy: 40.0% → 60.0% (gained 2, lost 1 of 5 task prompts)" in \
        [v.replace("rejection sampling", "RS") for v in verdicts(data)]
