"""The assistant world of one seed: its items split into pools, how the builders draw from
them, and every builder as a method (each a line that calls :mod:`.chat`, :mod:`.preferences`,
:mod:`.prompts`, :mod:`.checkers` or :mod:`.annotator`, where the docstring is)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from llama2.data.world import chat, checkers, preferences, prompts
from llama2.data.world.annotator import Annotator
from llama2.data.world.chat import Dialogue
from llama2.data.world.constraints import Constraint
from llama2.data.world.content import ANIMAL_LEGS, CAPITALS, FRUIT_COLORS, OPPOSITES, SPLITS, TASK_WEIGHTS
from llama2.data.world.items import Item, all_items, split_pools


class World:
    """The assistant world for one seed. Methods take a split ("train", "val", "test") and are
    deterministic for (seed, arguments), whatever else was called before."""

    SFT_MIX = chat.SFT_MIX
    ANNOTATOR_AGREEMENT = preferences.ANNOTATOR_AGREEMENT
    RL_MIX = prompts.RL_MIX

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._pools = split_pools(all_items(seed))
        self._by_prompt: dict[str, Item] = {}
        self._split_of_prompt: dict[str, str] = {}
        for split, families in self._pools.items():
            for it in (it for family in families.values() for it in family):
                if it.prompt in self._by_prompt:
                    raise AssertionError(f"duplicate prompt in the world: {it.prompt!r}")
                self._by_prompt[it.prompt] = it
                self._split_of_prompt[it.prompt] = split
        self._short_cache: dict[tuple[str, int | None], dict[str, list[Item]]] = {}
        self._annotator: Annotator | None = None

    def rng(self, *parts) -> random.Random:
        """The random stream of one builder call: the same for (seed, parts) whatever was drawn before."""
        return random.Random("/".join(str(p) for p in ("world", self.seed, *parts)))

    # ---- access ---------------------------------------------------------------------------

    def items(self, split: str, kind: str | None = None, family: str | None = None) -> list[Item]:
        """All items of a split, optionally of one kind ("task", "unsafe", "benign") or family."""
        pools = self.pool(split)
        out = []
        for fam in sorted(pools):
            if family is not None and fam != family:
                continue
            out += [it for it in pools[fam] if kind is None or it.kind == kind]
        return out

    def split_of(self, prompt: str) -> str | None:
        """The split a prompt of this world belongs to (None if it is not one of ours)."""
        return self._split_of_prompt.get(prompt)

    def pool(self, split: str) -> dict[str, list[Item]]:
        """family -> the items of a split."""
        if split not in self._pools:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return self._pools[split]

    def families(self, split: str, kind: str) -> list[str]:
        """The families of a split holding items of one kind, sorted."""
        pools = self.pool(split)
        return [f for f in sorted(pools) if pools[f] and pools[f][0].kind == kind]

    def sample(self, rng: random.Random, split: str, kind: str) -> Item:
        """An item of a kind: a family first (tasks by TASK_WEIGHTS, others uniformly), then an item of it."""
        pools = self.pool(split)
        families = self.families(split, kind)
        if kind == "task":
            family = rng.choices(families, weights=[TASK_WEIGHTS[f] for f in families])[0]
        else:
            family = rng.choice(families)
        return rng.choice(pools[family])

    def short_pools(self, split: str, max_chars: int | None) -> dict[str, list[Item]]:
        """Task items whose prompt and answer together have at most ``max_chars`` characters
        (multi-turn dialogues must fit the tiny model's 512-token context)."""
        key = (split, max_chars)
        if key not in self._short_cache:
            pools = {}
            for fam in self.families(split, "task"):
                its = [it for it in self.pool(split)[fam]
                       if max_chars is None or len(it.prompt) + len(it.answer) <= max_chars]
                if its:
                    pools[fam] = its
            self._short_cache[key] = pools
        return self._short_cache[key]

    def knowledge_text(self) -> str:
        """The fact tables as plain sentences, one per line (e.g. for a pretraining mix)."""
        lines = [f"The capital of {c} is {cap}." for c, cap in CAPITALS.items()]
        lines += [f"{art.capitalize()} {f} is {color}." for f, (art, color) in FRUIT_COLORS.items()]
        lines += [f"{'An' if a[0] in 'aeiou' else 'A'} {a} has {n} legs." for a, n in ANIMAL_LEGS.items()]
        lines += [f"The opposite of {w} is {o}." for w, o in OPPOSITES.items()]
        return "\n".join(lines) + "\n"

    # ---- judging answers (checkers.py, annotator.py) ----------------------------------------

    def resolve(self, messages: Sequence[Mapping]) -> tuple[Item | None, Constraint | None]:
        return checkers.resolve(self._by_prompt, messages)

    def reference_answer(self, messages: Sequence[Mapping]) -> str | None:
        return checkers.reference_answer(self._by_prompt, messages)

    def judge(self, messages: Sequence[Mapping], answer: str) -> bool | None:
        return checkers.judge(self._by_prompt, messages, answer)

    @property
    def annotator(self) -> Annotator:
        """The world's annotator (annotator.py): rubric, pairwise judgements, in/out of knowledge."""
        if self._annotator is None:
            self._annotator = Annotator(self)
        return self._annotator

    def knowledge(self, messages: Sequence[Mapping]) -> str | None:
        """"in" or "out" of the train split's knowledge (knowledge.py); None if not our prompt."""
        return self.annotator.knowledge(messages)

    # ---- the builders (chat.py, preferences.py, prompts.py) ---------------------------------

    def sft_examples(self, split: str, n: int, mix: Mapping[str, float] | None = None) -> list[dict]:
        return chat.sft_examples(self, split, n, mix)

    def dialogues(self, split: str, n: int, turns: int | tuple[int, int], constrained: bool = True,
                  max_chars: int | None = 34) -> list[Dialogue]:
        return chat.dialogues(self, split, n, turns, constrained, max_chars)

    def gatt_dialogues(self, split: str, n: int, turns: int | tuple[int, int] = (2, 20),
                       max_chars: int | None = 34, repeat_instruction: bool = False) -> list[dict]:
        return chat.gatt_dialogues(self, split, n, turns, max_chars, repeat_instruction)

    def preference_pairs(self, split: str, n: int, kind: str = "helpfulness") -> list[dict]:
        return preferences.preference_pairs(self, split, n, kind)

    def annotate_samples(self, prompts: Sequence[Sequence[Mapping]], answers: Sequence[Sequence[str]],
                         safety: bool | None = None) -> list[dict]:
        return preferences.annotate_samples(self, prompts, answers, safety)

    def label_samples(self, prompts: Sequence[Sequence[Mapping]], answers: Sequence[Sequence[str]],
                      safety: bool = False) -> list[dict]:
        return preferences.label_samples(self, prompts, answers, safety)

    def rl_prompts(self, split: str, n: int, kinds: Sequence[str] | None = None) -> list[dict]:
        return prompts.rl_prompts(self, split, n, kinds)

    def eval_prompts(self, split: str = "test", max_per_kind: int | None = 200,
                     knowledge: str | None = None) -> list[Item]:
        return prompts.eval_prompts(self, split, max_per_kind, knowledge)

    def guard_examples(self, split: str, n: int) -> list[dict]:
        return prompts.guard_examples(self, split, n)
