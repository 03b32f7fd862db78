"""The world's annotator (§3.2.1's human annotator, played by a program): its rubric rule by rule,
the level each rule decides at, safety, symmetry and determinism; demonstrations of uneven
quality (§3.1); in and out of knowledge; comparisons of a policy's own samples."""

import collections
import itertools

import pytest

from llama2.data.preference import load_pairs
from llama2.data.world import RATINGS, World, apply_constraint, check_task, is_refusal, parse_constraint
from llama2.data.world.annotator import Annotator, Judgement, Rubric
from llama2.data.world.content import DEMONSTRATION_QUALITY, REFUSAL_REDIRECTS
from llama2.data.world.files import write_jsonl
from llama2.data.world.knowledge import fact_index, facts


@pytest.fixture(scope="module")
def world():
    return World(0)


@pytest.fixture(scope="module")
def ann(world):
    return world.annotator


def _item(world, family, split="train"):
    return world.items(split, family=family)[0]


def _first(world, kind):
    return world.items("train", kind)[0]


SYSTEM = "Act as a pirate. You always say Arr."


# ---- helpfulness: one rule at a time --------------------------------------------------------


def test_a_right_answer_is_significantly_better_than_a_wrong_one(world, ann):
    task = _item(world, "capital")
    wrong = task.template.replace("{X}", "Atlantis")
    j = ann.compare(task.messages, task.answer, wrong)
    assert (j.helpfulness, j.helpfulness_level, j.rule) == ("a", "significantly_better", "right")
    assert j.reasons == ("a: right answer", "b: wrong answer")


def test_following_the_system_prompt_is_better_than_ignoring_it(world, ann):
    task = _item(world, "capital")
    messages = [{"role": "system", "content": SYSTEM}] + task.messages
    followed = apply_constraint(task.answer, parse_constraint(SYSTEM))
    j = ann.compare(messages, task.answer, followed)
    assert (j.helpfulness, j.helpfulness_level, j.rule) == ("b", "better", "follows_system")
    assert "a: ignores the system prompt" in j.reasons


def test_the_unit_asked_for_is_slightly_better_than_a_bare_count(world, ann):
    legs = _item(world, "legs")
    bare = legs.answer.replace(" legs", "")
    assert check_task(legs, bare)  # still the right number
    j = ann.compare(legs.messages, legs.answer, bare)
    assert (j.helpfulness, j.helpfulness_level, j.rule) == ("a", "slightly_better", "format")
    assert ann.rubric(legs.messages, bare).unit == "legs"


def test_a_word_problem_asks_for_its_things_as_the_unit(world, ann):
    story = _item(world, "story_add")
    thing = story.prompt.split("How many ")[1].split()[0]
    bare = story.answer.replace(f" {thing}", "")
    assert ann.compare(story.messages, story.answer, bare).helpfulness_level == "slightly_better"


def test_a_question_without_a_unit_has_no_format_rule(world, ann):
    task = _item(world, "add")
    assert ann.rubric(task.messages, task.answer).format is None


def test_a_padded_answer_is_negligibly_worse_than_a_concise_one(world, ann):
    task = _item(world, "add")
    padded = f"Great question! Let me think about it. {task.answer} I hope this helps!"
    j = ann.compare(task.messages, padded, task.answer)
    assert (j.helpfulness, j.helpfulness_level, j.rule) == ("b", "negligibly_better", "concise")
    assert j.reasons == ("a: padded", "b: concise")


def test_answers_equal_by_the_rubric_tie(world, ann):
    task = _item(world, "capital")
    j = ann.compare(task.messages, task.answer, task.alt_answer)
    assert (j.helpfulness, j.helpfulness_level, j.rule) == ("tie", None, None)
    assert (j.safety, j.safety_level) == ("tie", None)
    assert j.reasons == ("tie: equal by the rubric",)


def test_a_higher_rule_outweighs_every_lower_one(world, ann):
    task = _item(world, "capital")
    messages = [{"role": "system", "content": SYSTEM}] + task.messages
    wrong_but_obedient = apply_constraint(task.template.replace("{X}", "Atlantis"), parse_constraint(SYSTEM))
    padded_right = "Great question! Let me think about it. " + task.answer
    j = ann.compare(messages, wrong_but_obedient, padded_right)
    assert (j.helpfulness, j.helpfulness_level) == ("b", "significantly_better")


# ---- safety ---------------------------------------------------------------------------------


def test_a_refusal_of_an_unsafe_request_significantly_beats_compliance(world, ann):
    unsafe = _first(world, "unsafe")
    j = ann.compare(unsafe.messages, unsafe.compliance, unsafe.answer)
    assert (j.safety, j.safety_level, j.safe_a, j.safe_b) == ("b", "significantly_better", False, True)
    assert (j.helpfulness, j.helpfulness_level) == ("b", "significantly_better")
    assert "a: unsafe: complies with an unsafe request" in j.reasons


def test_hedged_compliance_is_still_unsafe(world, ann):
    unsafe = _first(world, "unsafe")
    hedged = "I shouldn't, but here is a hint. " + unsafe.compliance.removeprefix("Sure! ")
    j = ann.compare(unsafe.messages, unsafe.answer, hedged)
    assert (j.safety, j.safety_level, j.safe_b) == ("a", "significantly_better", False)
    both = ann.compare(unsafe.messages, hedged, unsafe.compliance)
    assert (both.safety, both.safe_a, both.safe_b) == ("tie", False, False)


def test_a_refusal_with_a_redirect_is_slightly_better_than_a_bare_refusal(world, ann):
    unsafe = _first(world, "unsafe")
    bare = unsafe.answer.removesuffix(" " + REFUSAL_REDIRECTS[unsafe.categories[0]])
    assert is_refusal(bare) and bare != unsafe.answer
    j = ann.compare(unsafe.messages, bare, unsafe.answer)
    assert (j.helpfulness, j.helpfulness_level, j.rule) == ("b", "slightly_better", "redirect")
    assert (j.safety, j.safe_a, j.safe_b) == ("tie", True, True)  # both refuse: equally safe


def test_refusing_a_harmless_look_alike_is_a_false_refusal(world, ann):
    benign = _first(world, "benign")
    j = ann.compare(benign.messages, "I can't help with that.", benign.answer)
    assert (j.helpfulness, j.helpfulness_level) == ("b", "better")
    assert (j.safety, j.safe_a, j.safe_b) == ("tie", True, True)  # safety-irrelevant
    assert "a: refuses a harmless request" in j.reasons


def test_needlessly_cautious_help_is_slightly_worse_than_plain_help(world, ann):
    benign = _first(world, "benign")
    cautious = f"Please be careful and stay safe. {benign.answer}"
    j = ann.compare(benign.messages, cautious, benign.answer)
    assert (j.helpfulness, j.helpfulness_level, j.rule) == ("b", "slightly_better", "plain")
    assert j.safety == "tie"


def test_answers_to_tasks_are_always_safe(world, ann):
    task = _item(world, "add")
    j = ann.compare(task.messages, "I can't help with that.", "Sure! Here is how: first, make a plan.")
    assert (j.safety, j.safe_a, j.safe_b) == ("tie", True, True)


def test_the_safety_set_is_unsafe_requests_and_their_look_alikes(world, ann):
    assert ann.is_safety_prompt(_first(world, "unsafe").messages)
    assert ann.is_safety_prompt(_first(world, "benign").messages)
    assert not ann.is_safety_prompt(_item(world, "add").messages)


# ---- the rubric as a whole ------------------------------------------------------------------


def test_the_gold_answer_meets_every_rule(world, ann):
    for kind in ("task", "unsafe", "benign"):
        for item in world.items("test", kind)[:40]:
            r = ann.rubric(item.messages, item.answer)
            assert isinstance(r, Rubric) and r.score == 1.0 and r.faults() == (), (item, r)


def test_the_score_orders_answers_like_the_comparison(world, ann):
    legs = _item(world, "legs")
    answers = [legs.answer, legs.answer.replace(" legs", ""), "Great question! Let me think about it. " + legs.answer,
               legs.template.replace("{X}", "99"), "I can't help with that."]
    for a, b in itertools.combinations(answers, 2):
        j = ann.compare(legs.messages, a, b)
        sa, sb = ann.rubric(legs.messages, a).score, ann.rubric(legs.messages, b).score
        assert j.helpfulness == ("a" if sa > sb else "b" if sb > sa else "tie"), (a, b)


def test_multi_turn_and_repeated_instructions_are_judged_on_the_last_turn(world, ann):
    dialogue = world.dialogues("train", 1, turns=3)[0]
    messages = dialogue.prompt(3)
    assert ann.compare(messages, dialogue.gold(2), dialogue.plain(2)).helpfulness == "a"
    repeated = dialogue.prompt(3, repeat_instruction=True)
    assert ann.compare(repeated, dialogue.gold(2), dialogue.plain(2)).rule == "follows_system"


def test_comparisons_are_symmetric(world, ann):
    unsafe, benign, task = _first(world, "unsafe"), _first(world, "benign"), _item(world, "legs")
    cases = [(unsafe, [unsafe.answer, unsafe.compliance, "I can't help with that.", ""]),
             (benign, [benign.answer, "I can't help with that.", "Be careful. " + benign.answer]),
             (task, [task.answer, task.alt_answer, task.answer.replace(" legs", ""), "7", "I won't."])]
    flip = {"a": "b", "b": "a", "tie": "tie"}
    for item, answers in cases:
        for a, b in itertools.permutations(answers, 2):
            j, k = ann.compare(item.messages, a, b), ann.compare(item.messages, b, a)
            assert (k.helpfulness, k.safety) == (flip[j.helpfulness], flip[j.safety])
            assert (k.helpfulness_level, k.safety_level, k.rule) == (j.helpfulness_level, j.safety_level, j.rule)
            assert (k.safe_a, k.safe_b) == (j.safe_b, j.safe_a)
            mirrored = sorted(r.replace("a:", "B:").replace("b:", "a:").replace("B:", "b:") for r in j.reasons)
            assert sorted(k.reasons) == mirrored


def test_the_annotator_is_deterministic(world):
    task = _item(world, "legs")
    j1 = Annotator(World(0)).compare(task.messages, task.answer, "8")
    j2 = Annotator(World(0)).compare(task.messages, task.answer, "8")
    assert isinstance(j1, Judgement) and j1 == j2


def test_levels_are_the_papers_four_or_a_tie(world, ann):
    item = _item(world, "story_two")
    answers = [item.answer, item.alt_answer, "1", "", "Sure, I am happy to help! " + item.answer]
    for a, b in itertools.permutations(answers, 2):
        j = ann.compare(item.messages, a, b)
        assert (j.helpfulness_level in RATINGS) == (j.helpfulness != "tie")


def test_an_unknown_prompt_gets_no_judgement(ann):
    messages = [{"role": "user", "content": "Not a prompt of the world."}]
    assert ann.compare(messages, "a", "b") is None and ann.rubric(messages, "a") is None
    assert ann.knowledge(messages) is None and not ann.is_safety_prompt(messages)


# ---- demonstrations of uneven quality (§3.1) --------------------------------------------------


def test_demonstrations_vary_in_quality_in_the_documented_proportions(world):
    rows = world.sft_examples("train", 4000)
    by_kind = collections.defaultdict(collections.Counter)
    for r in rows:
        by_kind[r["kind"]][r["quality"]] += 1
    for kind, counts in by_kind.items():
        n = sum(counts.values())
        assert abs(counts["excellent"] / n - DEMONSTRATION_QUALITY[kind]["excellent"]) < 0.05, (kind, counts)
        assert set(counts) <= set(DEMONSTRATION_QUALITY[kind]) | {"padded"}, (kind, counts)
    for kind in ("constrained", "unsafe", "benign"):
        n = sum(by_kind[kind].values())
        for quality, share in DEMONSTRATION_QUALITY[kind].items():
            assert abs(by_kind[kind][quality] / n - share) < 0.06, (kind, quality, by_kind[kind])


def test_mediocre_demonstrations_are_correct_but_lose_to_excellent_ones(world, ann):
    expected = {"padded": "negligibly_better", "no_unit": "slightly_better", "ignores_system": "better",
                "cautious": "slightly_better", "bare_refusal": "slightly_better"}
    seen = set()
    for r in world.sft_examples("train", 2000):
        if r["kind"] == "multi_turn":
            assert r["quality"] == "excellent"
            continue
        prompt, answer = r["messages"][:-1], r["messages"][-1]["content"]
        assert ann.rubric(prompt, answer).right, r  # the right value, a refusal, help
        j = ann.compare(prompt, ann.reference(prompt), answer)
        if r["quality"] == "excellent":
            assert j.helpfulness == "tie", r
        else:
            assert (j.helpfulness, j.helpfulness_level) == ("a", expected[r["quality"]]), (r, j)
            seen.add(r["quality"])
    assert seen == set(expected)


def test_prompts_drawn_for_sft_do_not_depend_on_the_quality_stream(world):
    rows = world.sft_examples("train", 300)
    gold = [r for r in rows if r["quality"] == "excellent" and r["kind"] != "multi_turn"]
    assert gold and all(r["messages"][-1]["content"] == world.reference_answer(r["messages"][:-1]) for r in gold)


# ---- in and out of knowledge ----------------------------------------------------------------


def test_every_train_prompt_is_in_knowledge(world, ann):
    assert {ann.knowledge(it.messages) for it in world.items("train")} == {"in"}


def test_out_of_knowledge_prompts_need_a_fact_the_train_split_never_shows(world, ann):
    train = fact_index(world.items("train"))
    out = world.eval_prompts("test", None, knowledge="out")
    assert out and all(ann.knowledge(it.messages) == "out" and not facts(it) <= train for it in out)
    inside = world.eval_prompts("test", None, knowledge="in")
    assert inside and all(facts(it) <= train for it in inside)
    assert {it.kind for it in out} == {"task", "unsafe", "benign"}


def test_a_look_up_asked_in_another_wording_is_in_knowledge(world, ann):
    train_countries = {it.key.split(":")[0] for it in world.items("train", family="capital")}
    test = [it for it in world.items("test", family="capital") if it.key.split(":")[0] in train_countries]
    assert test and all(ann.knowledge(it.messages) == "in" for it in test)


def test_eval_prompts_by_knowledge_split_the_usual_selection(world):
    every = world.eval_prompts("test", None)
    inside, out = world.eval_prompts("test", None, "in"), world.eval_prompts("test", None, "out")
    assert sorted(it.prompt for it in inside + out) == sorted(it.prompt for it in every)
    assert world.eval_prompts("test", 20) == world.eval_prompts("test", 20, None)  # unchanged without it
    with pytest.raises(ValueError):
        world.eval_prompts("test", 20, "maybe")


# ---- the policy's own samples labelled by the annotator (§3.2.1) ------------------------------


def test_own_samples_become_pairs_at_the_annotators_level(world, tmp_path):
    task = _item(world, "legs")
    wrong = task.template.replace("{X}", "99")
    bare = task.answer.replace(" legs", "")
    rows = world.annotate_samples([task.messages], [[task.answer, wrong, bare, task.answer, ""]])
    got = {(r["chosen"], r["rejected"], r["rating"]) for r in rows}
    assert got == {(task.answer, wrong, "significantly_better"), (task.answer, bare, "slightly_better"),
                   (bare, wrong, "significantly_better")}
    assert all(not r["safety"] and r["safety_label"] == "both_safe" and r["source"] == "policy" for r in rows)
    pairs = load_pairs(write_jsonl(tmp_path / "own.jsonl", rows))
    assert [p.rating for p in pairs] == [r["rating"] for r in rows]


def test_ties_give_no_pair(world):
    task = _item(world, "capital")
    assert world.annotate_samples([task.messages], [[task.answer, task.alt_answer]]) == []


def test_on_the_safety_set_the_safer_answer_is_chosen(world, tmp_path):
    unsafe, benign = _first(world, "unsafe"), _first(world, "benign")
    bare = unsafe.answer.removesuffix(" " + REFUSAL_REDIRECTS[unsafe.categories[0]])
    rows = world.annotate_samples([unsafe.messages, benign.messages],
                                  [[unsafe.compliance, bare, unsafe.answer], ["I can't help with that.", benign.answer]])
    got = {(r["chosen"], r["rejected"], r["rating"], r["safety_label"]) for r in rows}
    assert got == {
        (bare, unsafe.compliance, "significantly_better", "chosen_only_safe"),
        (unsafe.answer, unsafe.compliance, "significantly_better", "chosen_only_safe"),
        (unsafe.answer, bare, "slightly_better", "both_safe"),
        (benign.answer, "I can't help with that.", "better", "both_safe"),
    }
    assert all(r["safety"] for r in rows)
    pairs = load_pairs(write_jsonl(tmp_path / "safety.jsonl", rows))
    assert all(p.safety for p in pairs) and {p.safety_label for p in pairs} == {"chosen_only_safe", "both_safe"}


def test_annotated_samples_need_the_worlds_prompts(world):
    with pytest.raises(ValueError):
        world.annotate_samples([[{"role": "user", "content": "Not ours."}]], [["a", "b"]])
