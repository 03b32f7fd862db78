"""Chat data built from the world: SFT examples (§3.1) and multi-turn dialogues of tasks,
with a system constraint that holds on every turn for Ghost Attention (§3.3)."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llama2.data.world.checkers import unit_of
from llama2.data.world.constraints import Constraint, apply_constraint, sample_constraint
from llama2.data.world.content import CAUTIONS, DEMONSTRATION_QUALITY, PADDINGS, REFUSAL_REDIRECTS
from llama2.data.world.items import Item

if TYPE_CHECKING:
    from llama2.data.world.pools import World


@dataclass
class Dialogue:
    """A multi-turn dialogue of tasks, optionally under a system constraint."""

    turns: list[Item]
    constraint: Constraint | None = None

    def plain(self, i: int) -> str:
        """Correct answer of turn ``i`` (0-based) ignoring the constraint."""
        return self.turns[i].answer

    def gold(self, i: int) -> str:
        """Correct answer of turn ``i`` (0-based) that also satisfies the constraint."""
        answer = self.turns[i].answer
        return apply_constraint(answer, self.constraint) if self.constraint else answer

    def _user(self, i: int, repeat_instruction: bool) -> str:
        prompt = self.turns[i].prompt
        if repeat_instruction and self.constraint:
            return f"{self.constraint.text}\n{prompt}"
        return prompt

    def prompt(self, t: int, previous: Sequence[str] | None = None, repeat_instruction: bool = False) -> list[dict]:
        """Messages asking turn ``t`` (1-based): system, t-1 answered exchanges, the t-th question.

        ``previous`` gives the earlier assistant answers (default: the gold ones).
        """
        if not 1 <= t <= len(self.turns):
            raise ValueError(f"turn {t} out of range 1..{len(self.turns)}")
        previous = [self.gold(i) for i in range(t - 1)] if previous is None else list(previous)
        if len(previous) < t - 1:
            raise ValueError(f"turn {t} needs {t - 1} previous answers, got {len(previous)}")
        msgs: list[dict] = []
        if self.constraint and not repeat_instruction:
            msgs.append({"role": "system", "content": self.constraint.text})
        for i in range(t - 1):
            msgs.append({"role": "user", "content": self._user(i, repeat_instruction)})
            msgs.append({"role": "assistant", "content": previous[i]})
        msgs.append({"role": "user", "content": self._user(t - 1, repeat_instruction)})
        return msgs

    def messages(self, repeat_instruction: bool = False) -> list[dict]:
        """The whole dialogue with gold answers. With ``repeat_instruction`` there is no system
        message and the instruction is written before every user turn instead (how §3.3 samples
        GAtt data before keeping it in the first turn only)."""
        msgs = self.prompt(len(self.turns), repeat_instruction=repeat_instruction)
        return msgs + [{"role": "assistant", "content": self.gold(len(self.turns) - 1)}]


# What the SFT set is made of (shares of the examples).
SFT_MIX = {"task": 0.45, "unsafe": 0.15, "benign": 0.15, "constrained": 0.1, "multi_turn": 0.15}


def sft_examples(world: World, split: str, n: int, mix: Mapping[str, float] | None = None) -> list[dict]:
    """``n`` chat examples ``{"messages": [...], "kind": ..., "quality": ...}`` ending with a
    demonstration.

    Kinds: single-turn tasks, refusals of unsafe requests, help on benign look-alikes,
    single-turn tasks under a system constraint, and 2-4 turn dialogues of tasks without a
    system prompt. Constraints appear only on single-turn dialogues by default, so that
    following them over many turns is what Ghost Attention (§3.3) has to add.

    Demonstrations vary in quality like vendors' do (§3.1): ``quality`` is "excellent" (the
    gold answer) or a correct but worse variant, drawn in the shares of
    content.DEMONSTRATION_QUALITY from a stream of their own (the prompts drawn do not depend
    on it).
    """
    mix = dict(mix or SFT_MIX)
    kinds = [k for k in mix if mix[k] > 0]
    unknown = set(kinds) - set(SFT_MIX)
    if unknown:
        raise ValueError(f"unknown SFT kinds {sorted(unknown)}; choose from {sorted(SFT_MIX)}")
    rng = world.rng("sft", split, n)
    quality_rng = world.rng("sft-quality", split, n)
    out = []
    for _ in range(n):
        kind = rng.choices(kinds, weights=[mix[k] for k in kinds])[0]
        shares = DEMONSTRATION_QUALITY[kind]
        quality = quality_rng.choices(list(shares), weights=list(shares.values()))[0]
        if kind in ("task", "unsafe", "benign"):
            item = world.sample(rng, split, kind)
            quality = applicable(item, quality)
            messages = item.messages + [{"role": "assistant", "content": demonstration(item, quality, quality_rng)}]
        elif kind == "constrained":
            dialogue = Dialogue([world.sample(rng, split, "task")], sample_constraint(rng))
            answer = demonstration(dialogue.turns[0], quality, quality_rng, dialogue.constraint)
            messages = dialogue.prompt(1) + [{"role": "assistant", "content": answer}]
        else:
            dialogue = draw_dialogue(world, rng, split, rng.randint(2, 4), constrained=False, max_chars=None)
            messages = dialogue.messages()
        out.append({"messages": messages, "kind": kind, "quality": quality})
    return out


def applicable(item: Item, quality: str) -> str:
    """The quality variant itself, or "padded" where it does not apply (no unit asked)."""
    if quality == "no_unit" and unit_of(item) is None:
        return "padded"
    return quality


def demonstration(item: Item, quality: str, rng: random.Random, constraint: Constraint | None = None) -> str:
    """An answer to ``item`` of a quality of content.DEMONSTRATION_QUALITY, under ``constraint``
    (applied unless the quality is "ignores_system"). Every variant is correct: only the
    annotator's rubric ranks it below the excellent one."""
    answer = item.answer
    if quality in ("padded", "cautious"):
        before, after = rng.choice(PADDINGS if quality == "padded" else CAUTIONS)
        answer = " ".join(p for p in (before, answer, after) if p)
    elif quality == "no_unit":
        unit = unit_of(item)
        if unit is None:
            raise ValueError(f"{item.prompt!r} asks for no unit")
        answer = re.sub(rf"(\d+) {re.escape(unit)}\b", r"\1", answer)
    elif quality == "bare_refusal":
        answer = answer.removesuffix(" " + REFUSAL_REDIRECTS[item.categories[0]])
    elif quality not in ("excellent", "ignores_system"):
        raise ValueError(f"unknown demonstration quality {quality!r}")
    if constraint is not None and quality != "ignores_system":
        answer = apply_constraint(answer, constraint)
    return answer


def draw_dialogue(world: World, rng: random.Random, split: str, turns: int, constrained: bool,
                  max_chars: int | None) -> Dialogue:
    """One dialogue of ``turns`` short tasks, each from a family drawn uniformly."""
    pools = world.short_pools(split, max_chars)
    families = sorted(pools)
    items = [rng.choice(pools[rng.choice(families)]) for _ in range(turns)]
    return Dialogue(items, sample_constraint(rng) if constrained else None)


def dialogues(world: World, split: str, n: int, turns: int | tuple[int, int], constrained: bool = True,
              max_chars: int | None = 34) -> list[Dialogue]:
    """``n`` dialogues of task turns (a fixed number, or uniform in a (lo, hi) range).

    ``max_chars`` keeps only tasks whose prompt + answer fit in that many characters: about
    20 tokens per exchange with the chat tags, so 20 turns fit a 512-token context.
    """
    lo, hi = (turns, turns) if isinstance(turns, int) else turns
    if lo < 1 or hi < lo:
        raise ValueError(f"bad number of turns {turns!r}")
    rng = world.rng("dialogues", split, n, lo, hi, constrained, max_chars)
    return [draw_dialogue(world, rng, split, rng.randint(lo, hi), constrained, max_chars) for _ in range(n)]


def gatt_dialogues(world: World, split: str, n: int, turns: int | tuple[int, int] = (2, 20),
                   max_chars: int | None = 34, repeat_instruction: bool = False) -> list[dict]:
    """Ghost Attention data (§3.3): ``{"messages", "constraint"}`` rows in which a system
    constraint holds for every assistant answer. For training, keep the system prompt where it
    is (first turn only) and zero the loss on every turn but the last. With
    ``repeat_instruction`` the instruction is written before every user turn instead.
    """
    return [{"messages": d.messages(repeat_instruction), "constraint": d.constraint.to_dict()}
            for d in dialogues(world, split, n, turns, constrained=True, max_chars=max_chars)]
