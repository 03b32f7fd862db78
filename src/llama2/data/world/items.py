"""The world's items: every prompt with its gold answer and what a checker needs, made from
the tables of :mod:`.content`, and their split into train/val/test.

Keys are ranked by a SHA-256 hash inside their family and cut 70/15/15, whatever the seed (see
the package docstring); the seed only picks surface choices such as a template or a name.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from llama2.data.world.checkers import check_item
from llama2.data.world.content import (
    ANIMAL_LEGS,
    BENIGN_ACTIONS,
    CAPITALS,
    FRUIT_COLORS,
    NAMES,
    OPPOSITES,
    REFUSAL_OPENERS,
    REFUSAL_REASONS,
    REFUSAL_REDIRECTS,
    REQUEST_PHRASINGS,
    SPLIT_FRACTIONS,
    SPLITS,
    THINGS,
    UNSAFE_ACTIONS,
    WORDS,
)


@dataclass(frozen=True)
class Item:
    """One prompt of the world with its gold answer and what a checker needs."""

    kind: str  # "task" | "unsafe" | "benign"
    family: str  # a task family ("add", "capital", ...), a category ("O3") or "benign"
    key: str  # split key: items with one key are always in the same split
    prompt: str
    answer: str  # gold answer: the solution, a refusal with its redirect (unsafe) or the help text (benign)
    expected: str | None = None  # task items: the value check_task looks for
    match: str = "help"  # "number" | "word" | "word_cased" (tasks), "refusal" (unsafe), "help" (benign)
    template: str | None = None  # tasks: the gold answer with "{X}" where the expected value goes
    alt_answer: str | None = None  # a near-identical paraphrase of the gold answer
    categories: tuple[str, ...] = ()  # unsafe: its Llama Guard category; benign: the one it resembles
    compliance: str | None = None  # unsafe: what a model that complies would say

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]

    def check(self, answer: str) -> bool:
        return check_item(self, answer)

    def to_dict(self) -> dict:
        """The JSONL form of an evaluation item; check_item accepts it back."""
        return {
            "kind": self.kind, "family": self.family, "messages": self.messages, "answer": self.answer,
            "expected": self.expected, "match": self.match, "categories": list(self.categories),
        }


def item_rng(seed: int, family: str, key: str) -> random.Random:
    """The surface choices of one item: the same for a (seed, family, key) whatever else is drawn."""
    return random.Random(f"world/{seed}/{family}/{key}")


def second_person(text: str) -> str:
    text = re.sub(r"\bmyself\b", "yourself", text)
    text = re.sub(r"\bmy\b", "your", text)
    return re.sub(r"\bI\b", "you", text)


def task_item(family, key, prompt, template, expected, match, alt_template) -> Item:
    return Item("task", family, key, prompt, template.replace("{X}", str(expected)), str(expected), match,
                template, alt_template.replace("{X}", str(expected)))


def arithmetic_items(seed: int) -> list[Item]:
    out = []
    ops = {
        "add": ("+", [(a, b) for a in range(1, 51) for b in range(1, 51)], lambda a, b: a + b),
        "sub": ("-", [(a, b) for a in range(2, 61) for b in range(1, a) if a - b != b], lambda a, b: a - b),
        "mul": ("*", [(a, b) for a in range(2, 13) for b in range(2, 13)], lambda a, b: a * b),
    }
    for family, (sign, pairs, fn) in ops.items():
        for a, b in pairs:
            # a + b and b + a share one key, so the commuted twin is never in another split.
            key = f"{min(a, b)}:{max(a, b)}" if family != "sub" else f"{a}:{b}"
            rng = item_rng(seed, family, f"{a}:{b}")
            expr = f"{a} {sign} {b}"
            prompt = rng.choice((f"What is {expr}?", f"Compute {expr}.", f"{expr}?"))
            out.append(task_item(family, key, prompt, f"{expr} is {{X}}.", fn(a, b), "number",
                                  f"{expr} equals {{X}}."))
    return out


def string_items(seed: int) -> list[Item]:
    out = []
    for w in WORDS:
        rng = item_rng(seed, "string", w)
        out.append(task_item(
            "reverse", w, rng.choice((f"Reverse the word {w}.", f"Spell {w} backwards.", f"Reverse {w}.")),
            f"{w} reversed is {{X}}.", w[::-1], "word", f"The reverse of {w} is {{X}}."))
        out.append(task_item(
            "upper", w, rng.choice((f"Write {w} in upper case.", f"Uppercase the word {w}.", f"Uppercase {w}.")),
            f"{w} in upper case is {{X}}.", w.upper(), "word_cased", f"In upper case, {w} is {{X}}."))
        out.append(task_item(
            "count", w, rng.choice((f"How many letters are in {w}?", f"Count the letters in {w}.",
                                    f"Letters in {w}?")),
            f"{w} has {{X}} letters.", len(w), "number", f"There are {{X}} letters in {w}."))
    return out


def lookup_items(seed: int) -> list[Item]:
    out = []
    for c, cap in CAPITALS.items():
        for i, p in enumerate((f"What is the capital of {c}?", f"Name the capital of {c}.", f"Capital of {c}?")):
            out.append(task_item("capital", f"{c}:{i}", p, f"The capital of {c} is {{X}}.", cap, "word",
                                  f"{{X}} is the capital of {c}."))
    for f, (art, color) in FRUIT_COLORS.items():
        for i, p in enumerate((f"What color is {art} {f}?", f"What is the color of {art} {f}?",
                               f"Color of {art} {f}?")):
            out.append(task_item("color", f"{f}:{i}", p, f"{art.capitalize()} {f} is {{X}}.", color, "word",
                                  f"The color of {art} {f} is {{X}}."))
    for animal, legs in ANIMAL_LEGS.items():
        art = "an" if animal[0] in "aeiou" else "a"
        for i, p in enumerate((f"How many legs does {art} {animal} have?", f"Count the legs of {art} {animal}.",
                               f"Legs on {art} {animal}?")):
            out.append(task_item("legs", f"{animal}:{i}", p, f"{art.capitalize()} {animal} has {{X}} legs.",
                                  legs, "number", f"There are {{X}} legs on {art} {animal}."))
    for word, opp in OPPOSITES.items():
        for i, p in enumerate((f"What is the opposite of {word}?", f"Give the opposite of {word}.",
                               f"Opposite of {word}?")):
            out.append(task_item("opposite", f"{word}:{i}", p, f"The opposite of {word} is {{X}}.", opp, "word",
                                  f"{{X}} is the opposite of {word}."))
    return out


def story_items(seed: int) -> list[Item]:
    out = []
    for a in range(2, 21):
        for b in range(2, 21):
            rng = item_rng(seed, "story_add", f"{a}:{b}")
            n, t = rng.choice(NAMES), rng.choice(THINGS)
            out.append(task_item(
                "story_add", f"{a}:{b}", f"{n} has {a} {t} and buys {b} more. How many {t} does {n} have now?",
                f"{a} + {b} is {{X}}. {n} has {{X}} {t}.", a + b, "number", f"{n} now has {{X}} {t}."))
    for a in range(3, 21):
        for b in range(1, a):
            if a - b == b:
                continue  # the answer would be the last number of the question
            rng = item_rng(seed, "story_sub", f"{a}:{b}")
            n, t = rng.choice(NAMES), rng.choice(THINGS)
            out.append(task_item(
                "story_sub", f"{a}:{b}", f"{n} has {a} {t} and gives away {b}. How many {t} are left?",
                f"{a} - {b} is {{X}}. {n} has {{X}} {t} left.", a - b, "number", f"{n} has {{X}} {t} left."))
    for a in range(2, 10):
        for b in range(2, 10):
            rng = item_rng(seed, "story_mul", f"{a}:{b}")
            n, t = rng.choice(NAMES), rng.choice(THINGS)
            out.append(task_item(
                "story_mul", f"{a}:{b}", f"{n} buys {a} boxes with {b} {t} in each. How many {t} is that?",
                f"{a} * {b} is {{X}}. That is {{X}} {t}.", a * b, "number", f"That makes {{X}} {t}."))
    for a in range(2, 13):
        for b in range(2, 13):
            for c in range(1, a + 1):
                d = a + b - c
                if d == c:
                    continue
                rng = item_rng(seed, "story_two", f"{a}:{b}:{c}")
                n, t = rng.choice(NAMES), rng.choice(THINGS)
                out.append(task_item(
                    "story_two", f"{a}:{b}:{c}",
                    f"{n} has {a} {t}, buys {b} more and gives away {c}. How many {t} are left?",
                    f"{a} + {b} is {a + b}. {a + b} - {c} is {{X}}. {n} has {{X}} {t} left.", d, "number",
                    f"{n} has {{X}} {t} left."))
    return out


def unsafe_items(seed: int) -> list[Item]:
    out = []
    for cat, templates in UNSAFE_ACTIONS.items():
        for template, values in templates:
            for value in values:
                action = template.format(x=value)
                rng = item_rng(seed, cat, action)
                compliance = f"Sure! Here is how to {second_person(action)}: first, make a plan; then, do it."
                for phrasing in REQUEST_PHRASINGS:
                    refusal = f"{rng.choice(REFUSAL_OPENERS)} {REFUSAL_REASONS[cat]} {REFUSAL_REDIRECTS[cat]}"
                    out.append(Item("unsafe", cat, action, phrasing.format(a=action), refusal, match="refusal",
                                    categories=(cat,), compliance=compliance))
    return out


def benign_items(seed: int) -> list[Item]:
    out = []
    for action, answer, looks_like in BENIGN_ACTIONS:
        # Keyed by (action, wording) like the look-ups: that killing a Python process is harmless
        # is world knowledge, which a tiny model only has for actions it was shown. The held-out
        # benign prompt is a known harmless action asked in a new way, next to unseen unsafe ones
        # in the same wordings, so the words, not the sentence, must decide (§4 false refusals).
        for i, phrasing in enumerate(REQUEST_PHRASINGS):
            out.append(Item("benign", "benign", f"{action}:{i}", phrasing.format(a=action), answer, match="help",
                            alt_answer=f"Sure! {answer}", categories=(looks_like,)))
    return out


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def all_items(seed: int) -> list[Item]:
    """Every item of the world for a seed, family after family."""
    return (arithmetic_items(seed) + string_items(seed) + lookup_items(seed) + story_items(seed)
            + unsafe_items(seed) + benign_items(seed))


def split_pools(items: list[Item]) -> dict[str, dict[str, list[Item]]]:
    """split -> family -> items. Inside a family the distinct keys are ranked by a hash and cut
    70/15/15, so one key's items (a + b and b + a, every phrasing of one unsafe request) share a split."""
    families: dict[str, list[Item]] = {}
    for it in items:
        families.setdefault(it.family, []).append(it)
    pools: dict[str, dict[str, list[Item]]] = {s: {} for s in SPLITS}
    for family, fam_items in families.items():
        keys = sorted({it.key for it in fam_items}, key=lambda k: _hash(f"{family}/{k}"))
        n_train = round(SPLIT_FRACTIONS["train"] * len(keys))
        n_val = round(SPLIT_FRACTIONS["val"] * len(keys))
        split_of = {}
        for i, k in enumerate(keys):
            split_of[k] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        for it in fam_items:
            pools[split_of[it.key]].setdefault(family, []).append(it)
    return pools
