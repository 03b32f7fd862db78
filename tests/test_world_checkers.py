"""The bundled assistant world: determinism, disjoint splits, and its checkers on hand-written answers."""

import random

from llama2.data.world import (
    World,
    apply_constraint,
    check_constraint,
    check_task,
    is_refusal,
    sample_constraint,
)


def test_the_world_is_deterministic_for_a_seed():
    assert World(0).sft_examples("train", 20) == World(0).sft_examples("train", 20)
    assert World(0).preference_pairs("val", 10) == World(0).preference_pairs("val", 10)


def test_splits_share_no_prompt():
    w = World(0)
    prompts = {s: {it.prompt for it in w.items(s)} for s in ("train", "val", "test")}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["val"]


def test_every_gold_answer_passes_its_checker():
    for item in World(0).eval_prompts("test", max_per_kind=50):
        assert item.check(item.answer), item


def test_task_checker_on_good_and_bad_answers():
    item = {"kind": "task", "expected": "68", "match": "number"}
    assert check_task(item, "23 + 45 = 68.") and check_task(item, "The answer is 68")
    assert not check_task(item, "68 or 69") and not check_task(item, "It is 67.")
    word = {"kind": "task", "expected": "Lima", "match": "word"}
    assert check_task(word, "The capital of Peru is lima.") and not check_task(word, "Limassol.")


def test_refusal_checker():
    for refusal in ("I can't help with that.", "Sorry, I cannot assist with this.", "I won't do that.",
                    "I must decline."):
        assert is_refusal(refusal), refusal
    for answer in ("Sure! Here is how: first, make a plan.", "I shouldn't, but here is a hint.",
                   "I can't stress this enough: save often."):
        assert not is_refusal(answer), answer


def test_constraints_are_checkable_and_satisfiable():
    import random

    rng = random.Random(0)
    for _ in range(50):
        c = sample_constraint(rng)
        good = apply_constraint("The capital of Peru is Lima.", c)
        assert check_constraint(good, c), (c, good)
        assert not check_constraint("the capital of peru is lima", c), c  # the plain answer ignores it


def test_significantly_better_rejects_fail_the_task_and_answer_another_kind_of_question():
    world = World(0)
    pairs = [p for p in world.preference_pairs("train", 400) if p["rating"] == "significantly_better"]
    assert pairs
    for p in pairs:
        assert check_task(p, p["chosen"]) and not check_task(p, p["rejected"]), p


def test_close_pairs_disagree_like_annotators_and_clear_ones_never_do():
    world = World(0)
    pairs = world.preference_pairs("train", 3000)
    canonical = {it.prompt: it.answer for it in world.items("train", "task")}
    for rating, agreement in (("significantly_better", 1.0), ("slightly_better", 0.8), ("negligibly_better", 0.55)):
        assert World.ANNOTATOR_AGREEMENT.get(rating, 1.0) == agreement
        rows = [p for p in pairs if p["rating"] == rating]
        share = sum(p["chosen"] == canonical[p["messages"][-1]["content"]] for p in rows) / len(rows)
        assert abs(share - agreement) < 0.06, (rating, share)
    close = [p for p in pairs if p["rating"] in ("slightly_better", "negligibly_better")]
    assert all(check_task(p, p["chosen"]) and check_task(p, p["rejected"]) for p in close)


def test_the_world_judges_answers_to_its_own_prompts():
    world = World(0)
    task = world.items("train", "task", family="capital")[0]
    assert world.judge(task.messages, task.answer) is True
    assert world.judge(task.messages, "I can't help with that.") is False
    unsafe = world.items("train", "unsafe")[0]
    assert world.judge(unsafe.messages, unsafe.answer) is True and world.judge(unsafe.messages, "Sure!") is False
    assert world.judge([{"role": "user", "content": "not a prompt of the world"}], "x") is None


def test_the_judge_checks_the_system_constraint_too():
    world = World(0)
    task = world.items("train", "task", family="capital")[0]
    rule = next(c for c in map(sample_constraint, map(random.Random, range(50)))
                if not check_constraint(task.answer, c))
    messages = [{"role": "system", "content": rule.text}] + task.messages
    assert world.judge(messages, apply_constraint(task.answer, rule)) is True
    assert world.judge(messages, task.answer) is False


def test_rl_prompts_of_some_kinds_keep_their_proportions():
    world = World(0)
    rows = world.rl_prompts("train", 1000, kinds=("task", "constrained"))
    share = sum(r["kind"] == "constrained" for r in rows) / len(rows)
    assert {r["kind"] for r in rows} == {"task", "constrained"} and abs(share - 0.1 / 0.6) < 0.04
    assert world.rl_prompts("train", 50) == world.rl_prompts("train", 50, kinds=tuple(World.RL_MIX))


def test_own_samples_become_pairs_of_a_right_answer_over_each_distinct_wrong_one():
    world = World(0)
    task = world.items("train", "task", family="add")[0]
    wrong = task.template.replace("{X}", str(int(task.expected) + 1))
    rows = world.label_samples([task.messages, task.messages, task.messages],
                               [[task.answer, wrong, wrong, "I can't help with that."], [task.answer] * 2, [wrong]])
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        (task.answer, wrong), (task.answer, "I can't help with that."),  # first prompt: two distinct wrong
        (task.answer, wrong),  # third prompt: none right, so the reference answer is chosen
    ]  # the second prompt has nothing wrong and gives no pair
    assert all(r["rating"] == "better" and not r["safety"] for r in rows)


def test_a_compliance_with_an_unsafe_request_is_significantly_worse_than_a_refusal():
    world = World(0)
    unsafe = world.items("train", "unsafe")[0]
    (row,) = world.label_samples([unsafe.messages], [[unsafe.compliance]], safety=True)
    assert (row["chosen"], row["rejected"], row["rating"]) == (unsafe.answer, unsafe.compliance,
                                                              "significantly_better")
    assert row["safety"] and row["safety_label"] == "chosen_only_safe"


def test_better_pairs_include_the_right_answer_to_a_neighbouring_question():
    world = World(0)
    pairs = [p for p in world.preference_pairs("train", 600) if p["rating"] == "better" and p["kind"] == "task"]
    answers = {it.answer for it in world.items("train", "task")}
    neighbours = [p for p in pairs if p["rejected"] in answers]
    assert neighbours and all(not check_task(p, p["rejected"]) for p in neighbours)
