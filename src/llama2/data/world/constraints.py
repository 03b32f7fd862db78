"""System-prompt constraints for Ghost Attention (§3.3): what a rule is, how one is drawn,
read back from a system prompt, and applied to a correct answer. Whether an answer follows
one is :func:`.checkers.check_constraint`."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from llama2.data.world.content import (
    CONSTRAINT_KINDS,
    CONSTRAINT_VALUES,
    DECAPITALIZED,
    LONG_TEXTS,
    PERSONAS,
    SHORT_TEXTS,
)


@dataclass(frozen=True)
class Rule:
    """One checkable instruction: kind in CONSTRAINT_KINDS and its value ("" for upper)."""

    kind: str
    value: str = ""

    def texts(self, short: bool) -> tuple[str, ...]:
        table = SHORT_TEXTS if short else LONG_TEXTS
        p = PERSONAS.get(self.value, "")
        return tuple(t.format(v=self.value, p=p) for t in table[self.kind])


@dataclass(frozen=True)
class Constraint:
    """A system prompt made of one or more rules; every assistant answer must satisfy all of them."""

    rules: tuple[Rule, ...]
    text: str  # the system message
    short: bool = False  # the shortened form ("Style: upper case") rather than a sentence

    def to_dict(self) -> dict:
        return {"text": self.text, "short": self.short, "rules": [{"kind": r.kind, "value": r.value} for r in self.rules]}

    @classmethod
    def from_dict(cls, d: Mapping) -> Constraint:
        return cls(tuple(Rule(r["kind"], r.get("value", "")) for r in d["rules"]), d["text"], bool(d.get("short")))


def sample_constraint(rng: random.Random, n_rules: int | None = None, short: bool | None = None) -> Constraint:
    """A random constraint: one rule (60%) or two of different kinds, shortened half the time (§3.3)."""
    k = n_rules if n_rules is not None else (1 if rng.random() < 0.6 else 2)
    short = rng.random() < 0.5 if short is None else short
    kinds = rng.sample(CONSTRAINT_KINDS, k)
    rules = tuple(Rule(kind, rng.choice(CONSTRAINT_VALUES[kind])) for kind in kinds)
    texts = [rng.choice(r.texts(short)) for r in rules]
    return Constraint(rules, ("; " if short else " ").join(texts), short)


def parse_constraint(text: str) -> Constraint | None:
    """The constraint a system prompt of this world states, or None if it states none."""
    found: list[tuple[int, Rule, bool]] = []
    for kind in CONSTRAINT_KINDS:
        for value in CONSTRAINT_VALUES[kind]:
            rule = Rule(kind, value)
            for short in (False, True):
                for t in rule.texts(short):
                    pos = text.find(t)
                    if pos >= 0:
                        found.append((pos, rule, short))
    if not found:
        return None
    found.sort(key=lambda f: f[0])
    rules: list[Rule] = []
    for _, rule, _ in found:
        if rule not in rules:
            rules.append(rule)
    return Constraint(tuple(rules), text, any(s for _, _, s in found))


def rules_of(constraint: Constraint | Rule | Mapping) -> tuple[Rule, ...]:
    if isinstance(constraint, Rule):
        return (constraint,)
    if isinstance(constraint, Constraint):
        return constraint.rules
    if isinstance(constraint, Mapping):
        if "rules" in constraint:
            return Constraint.from_dict(constraint).rules
        return (Rule(constraint["kind"], constraint.get("value", "")),)
    raise TypeError(f"not a constraint: {constraint!r}")


def apply_constraint(answer: str, constraint: Constraint | Rule | Mapping) -> str:
    """Turn a correct answer into one that also satisfies the constraint.

    Applied in a fixed order so rules compose: catchphrase first ("Arr! ..."), then the hobby
    sentence, the start word, the sign-off, and upper case last.
    """
    by_kind = {r.kind: r.value for r in rules_of(constraint)}
    out = answer.strip()
    if "persona" in by_kind:
        out = f"{PERSONAS[by_kind['persona']]}! {out}"
    if "hobby" in by_kind:
        out = f"{out} I love {by_kind['hobby']}."
    if "start" in by_kind:
        first = out.split(" ", 1)[0].rstrip(",.!")
        if first in DECAPITALIZED:
            out = out[0].lower() + out[1:]
        out = f"{by_kind['start']}, {out}"
    if "end" in by_kind:
        out = f"{out} {by_kind['end']}"
    if "upper" in by_kind:
        out = out.upper()
    return out

