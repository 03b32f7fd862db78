"""Preference pairs built from the world (§3.2.1-3.2.2): a gold answer against one degraded to
one of the four rating levels, for helpfulness and for safety, and pairs of a model's own
samples labelled by the world's annotator (:func:`annotate_samples`, with the annotator's levels)
or by the binary checker (:func:`label_samples`)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from llama2.data.world.checkers import check_task
from llama2.data.world.constraints import apply_constraint, sample_constraint
from llama2.data.world.content import (
    CAPITALS,
    FRUIT_COLORS,
    OPPOSITES,
    RATINGS,
    REFUSAL_OPENERS,
    REFUSAL_REASONS,
    REFUSAL_REDIRECTS,
    WORDS,
)
from llama2.data.world.items import Item

if TYPE_CHECKING:
    from llama2.data.world.pools import World


# How often annotators agree with the intended order of a helpfulness pair, by rating. The
# closer two answers are, the more annotators disagree (§3.2.2): that, not the model, is why
# Table 8's accuracy falls from "significantly" to "negligibly better" (~55%). Clear-cut
# levels are always labelled the intended way; the others are swapped the rest of the time.
ANNOTATOR_AGREEMENT = {"slightly_better": 0.8, "negligibly_better": 0.55}


def preference_pairs(world: World, split: str, n: int, kind: str = "helpfulness") -> list[dict]:
    """``n`` preference rows ``{"messages", "chosen", "rejected", "rating", "safety", ...}``.

    ``messages`` is the prompt (ending with the user turn). ``safety`` is True for pairs from
    the safety set (adversarial-looking prompts, what PPO's is_safety(prompt) tests), False for
    helpfulness pairs. ``safety_label`` says which answers are safe, as in §3.2.1:
    "chosen_only_safe" or "both_safe". Extra keys: ``kind`` (task / constraint / unsafe /
    benign), ``expected`` and ``match`` for task prompts, ``categories``.

    Helpfulness, degrading a gold answer to four degrees:
      significantly_better: rejected answers another task, is word salad, or refuses.
      better: the right answer to a neighbouring question of the same family, the right format
        with a wrong value, or the right answer ignoring the system prompt.
      slightly_better: the right answer in a messy format.
      negligibly_better: the gold answer and a near-identical paraphrase.
      The close levels are the ones annotators disagree on (§3.2.2, Table 8): a slightly or
      negligibly better pair keeps the intended order only ANNOTATOR_AGREEMENT of the time and
      is swapped otherwise.
    Safety: on unsafe prompts chosen = refusal and rejected = compliance (significantly_better)
    or hedged compliance (better); on benign look-alikes chosen = help and rejected = a refusal
    (better) or a refusal with a pointer elsewhere (slightly_better); negligibly_better pairs
    are two refusals (unsafe) or two helpful answers (benign).
    """
    if kind not in ("helpfulness", "safety"):
        raise ValueError(f"unknown preference kind {kind!r}; choose helpfulness or safety")
    rng = world.rng("pairs", kind, split, n)
    make = helpfulness_pair if kind == "helpfulness" else safety_pair
    return [make(world, rng, split) for _ in range(n)]


def helpfulness_pair(world: World, rng: random.Random, split: str) -> dict:
    """A task prompt's gold answer against one degraded to a rating level drawn uniformly."""
    item = world.sample(rng, split, "task")
    rating = rng.choice(RATINGS)
    messages, chosen, kind = item.messages, item.answer, "task"
    if rating == "significantly_better":
        way = rng.choice(("other_task", "nonsense", "refusal"))
        rejected = ""
        for _ in range(20):
            if way == "other_task":  # an answer to a different kind of question
                other = world.sample(rng, split, "task")
                if other.family == item.family:
                    continue
                rejected = other.answer
            elif way == "nonsense":
                rejected = " ".join(rng.sample(WORDS, 6)).capitalize() + "."
            else:
                rejected = rng.choice(REFUSAL_OPENERS)
            if rejected and not check_task(item, rejected):
                break
        else:
            rejected = rng.choice(REFUSAL_OPENERS)
    elif rating == "better":
        way = rng.random()
        if way < 0.3:
            # A correct answer that ignores the system prompt loses to one that follows it.
            constraint = sample_constraint(rng)
            messages = [{"role": "system", "content": constraint.text}] + item.messages
            chosen, rejected, kind = apply_constraint(item.answer, constraint), item.answer, "constraint"
        elif way < 0.65:
            # The right answer to a neighbouring question ("Capital of Cuba?" -> "The capital of
            # Portugal is Lisbon."): fluent and on topic, the small chat model's commonest mistake.
            rejected = wrong_value_answer(rng, item)
            for _ in range(20):
                other = rng.choice(world.pool(split)[item.family])
                if not check_task(item, other.answer):
                    rejected = other.answer
                    break
        else:
            rejected = wrong_value_answer(rng, item)
    elif rating == "slightly_better":
        rejected = messy(rng, item)
    else:
        rejected = item.alt_answer
    if rng.random() >= ANNOTATOR_AGREEMENT.get(rating, 1.0):
        chosen, rejected = rejected, chosen
    return {"messages": messages, "chosen": chosen, "rejected": rejected, "rating": rating, "safety": False,
            "safety_label": "both_safe", "kind": kind, "expected": item.expected, "match": item.match,
            "categories": []}


def safety_pair(world: World, rng: random.Random, split: str) -> dict:
    """An unsafe request (70%) refused against complied with, or a benign look-alike helped against refused."""
    if rng.random() < 0.7:
        item = world.sample(rng, split, "unsafe")
        cat = item.categories[0]
        rating = rng.choices(("significantly_better", "better", "negligibly_better"), weights=(5, 3, 2))[0]
        chosen, label = item.answer, "chosen_only_safe"
        if rating == "significantly_better":
            rejected = item.compliance
        elif rating == "better":
            rejected = "I shouldn't, but here is a hint. " + item.compliance.removeprefix("Sure! ")
        else:
            other = [o for o in REFUSAL_OPENERS if not item.answer.startswith(o + " ")]
            rejected = f"{rng.choice(other)} {REFUSAL_REASONS[cat]} {REFUSAL_REDIRECTS[cat]}"
            label = "both_safe"
    else:
        item = world.sample(rng, split, "benign")
        rating = rng.choices(("better", "slightly_better", "negligibly_better"), weights=(5, 3, 2))[0]
        chosen, label = item.answer, "both_safe"
        if rating == "better":
            rejected = rng.choice(REFUSAL_OPENERS)
        elif rating == "slightly_better":
            rejected = "I can't help with that, but a quick web search will."
        else:
            rejected = item.alt_answer
    return {"messages": item.messages, "chosen": chosen, "rejected": rejected, "rating": rating, "safety": True,
            "safety_label": label, "kind": item.kind, "expected": None, "match": item.match,
            "categories": list(item.categories) if item.kind == "unsafe" else []}


def wrong_value(rng: random.Random, item: Item) -> str:
    """A plausible wrong value for a task: a near number, a misspelt word, another entry of the table."""
    fam, exp = item.family, item.expected
    if item.match == "number":
        value = int(exp)
        deltas = [d for d in (-3, -2, -1, 1, 2, 3, 10) if value + d > 0]
        return str(value + rng.choice(deltas))
    if fam == "reverse":
        word = exp[::-1]
        letters = list(word)
        rng.shuffle(letters)
        shuffled = "".join(letters)
        return rng.choice([word, shuffled if shuffled != exp else word])
    if fam == "upper":
        return rng.choice([exp.lower(), exp.capitalize()])
    table = {"capital": CAPITALS.values(), "color": {c for _, c in FRUIT_COLORS.values()},
             "opposite": OPPOSITES.values()}[fam]
    return rng.choice(sorted(v for v in table if v != exp))


def wrong_value_answer(rng: random.Random, item: Item) -> str:
    """The gold answer's wording with a wrong value ("23 + 45 is 67.")."""
    rejected = item.answer
    for _ in range(20):
        rejected = item.template.replace("{X}", wrong_value(rng, item))
        if not check_task(item, rejected):
            break
    return rejected


def messy(rng: random.Random, item: Item) -> str:
    """The gold answer, still right, in a sloppy form (lower case, fillers, a double space)."""
    answer = item.answer
    out = answer.rstrip(".")
    if item.match != "word_cased" and rng.random() < 0.7:
        out = out.lower()
    out = rng.choice(("um, ", "so, like, ", "ok so ", "hmm ")) + out
    out = out + rng.choice(("", " ok", " i guess", " lol"))
    out = out.replace(" ", "  ", 1) if rng.random() < 0.5 else out
    return out if check_task(item, out) and out != answer else "um, " + answer


def label_samples(world: World, prompts: Sequence[Sequence[Mapping]], answers: Sequence[Sequence[str]],
                  safety: bool = False) -> list[dict]:
    """Preference rows from a model's own samples, labelled by the world's :func:`.checkers.judge` (§3.2.1: the
    annotators compare answers of the current models, so the reward models learn the
    policy's own mistakes, not only the made-up ones of :func:`preference_pairs`).

    A pair for each distinct wrong sample: chosen is a right sample (taken in turn), or the
    reference answer when none is right. Ratings: a compliance with an unsafe request is
    "significantly_better" to refuse; any other wrong answer is "better" to avoid. See
    :func:`annotate_samples` for the annotator's graded comparisons of the samples themselves.
    """
    rows = []
    for messages, samples in zip(prompts, answers):
        item, _ = world.resolve(messages)
        if item is None:
            raise ValueError(f"not a prompt of this world: {messages[-1]['content'][:60]!r}")
        distinct = list(dict.fromkeys(a for a in samples if a.strip()))
        right = [a for a in distinct if world.judge(messages, a)]
        wrong = [a for a in distinct if a not in right]
        unsafe = item.kind == "unsafe"
        for j, rejected in enumerate(wrong):
            chosen = right[j % len(right)] if right else world.reference_answer(messages)
            rows.append({"messages": list(messages), "chosen": chosen, "rejected": rejected,
                         "rating": "significantly_better" if unsafe else "better", "safety": safety,
                         "safety_label": "chosen_only_safe" if unsafe else "both_safe", "kind": item.kind,
                         "expected": item.expected, "match": item.match, "categories": list(item.categories),
                         "source": "policy"})
    return rows


def annotate_samples(world: World, prompts: Sequence[Sequence[Mapping]], answers: Sequence[Sequence[str]],
                     safety: bool | None = None) -> list[dict]:
    """Preference rows from a model's own samples, labelled by the world's annotator (§3.2.1:
    annotators compare two answers of the current models and say which is better and by how
    much, so the reward models learn the policy's own mistakes).

    Every two distinct non-empty samples of a prompt are compared
    (:meth:`.annotator.Annotator.compare`). On a helpfulness prompt the helpfulness winner is
    chosen and ``rating`` is its level. On the safety set (unsafe requests and their benign
    look-alikes) the safer answer is chosen at the safety level when only one is safe
    (``safety_label`` "chosen_only_safe"); otherwise the helpfulness judgement decides
    ("both_safe" or "neither_safe"). Ties are dropped. ``safety`` overrides the row's safety
    flag (default: whether the prompt is in the safety set). Rows carry ``source: "policy"``
    and the annotator's ``reasons``.
    """
    annotator = world.annotator
    rows = []
    for messages, samples in zip(prompts, answers):
        item, _ = annotator.resolve(messages)
        if item is None:
            raise ValueError(f"not a prompt of this world: {messages[-1]['content'][:60]!r}")
        safety_set = annotator.is_safety_prompt(messages)
        distinct = list(dict.fromkeys(a for a in samples if a.strip()))
        for i, a in enumerate(distinct):
            for b in distinct[i + 1:]:
                j = annotator.compare(messages, a, b)
                if safety_set and j.safety != "tie":
                    winner, rating, label = j.safety, j.safety_level, "chosen_only_safe"
                elif j.helpfulness != "tie":
                    winner, rating = j.helpfulness, j.helpfulness_level
                    label = "both_safe" if j.safe_a else "neither_safe"
                else:
                    continue
                chosen, rejected = (a, b) if winner == "a" else (b, a)
                rows.append({"messages": list(messages), "chosen": chosen, "rejected": rejected, "rating": rating,
                             "safety": safety_set if safety is None else safety, "safety_label": label,
                             "kind": item.kind, "expected": item.expected, "match": item.match,
                             "categories": list(item.categories) if item.kind == "unsafe" else [],
                             "source": "policy", "reasons": list(j.reasons)})
    return rows
