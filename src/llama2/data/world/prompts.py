"""Prompts built from the world: for rejection sampling and PPO (§3.2.3), for evaluation, and
labelled conversations for the Llama Guard style safety classifier (Inan et al. 2023)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from llama2.data.world.constraints import sample_constraint
from llama2.data.world.items import Item

if TYPE_CHECKING:
    from llama2.data.world.pools import World


# What the RL prompts are made of (shares of the prompts).
RL_MIX = {"task": 0.5, "constrained": 0.1, "unsafe": 0.25, "benign": 0.15}


def rl_prompts(world: World, split: str, n: int, kinds: Sequence[str] | None = None) -> list[dict]:
    """Prompts for rejection sampling / PPO: ``{"messages", "kind", "safety", "expected", "match",
    "constraint"}``. ``safety`` is is_safety(prompt) of §3.2.3 (unsafe and look-alike prompts).
    ``kinds`` keeps only some of RL_MIX's kinds (in their proportions)."""
    kinds = list(kinds or RL_MIX)
    unknown = set(kinds) - set(RL_MIX)
    if unknown:
        raise ValueError(f"unknown RL prompt kinds {sorted(unknown)}; choose from {sorted(RL_MIX)}")
    # The full mix keeps its historical stream of draws; a subset gets its own.
    full = len(kinds) == len(RL_MIX)
    rng = world.rng("rl", split, n) if full else world.rng("rl", split, n, *kinds)
    weights = [RL_MIX[k] for k in kinds]
    scale = 1.0 if full else sum(weights)
    out = []
    for _ in range(n):
        r = rng.random() * scale
        kind = next((k for k, w in zip(kinds, itertools.accumulate(weights)) if r < w), kinds[-1])
        item = world.sample(rng, split, "task" if kind == "constrained" else kind)
        messages, constraint = item.messages, None
        if kind == "constrained":
            c = sample_constraint(rng)
            messages, constraint = [{"role": "system", "content": c.text}] + messages, c.to_dict()
        out.append({"messages": messages, "kind": kind, "safety": item.kind != "task",
                    "expected": item.expected, "match": item.match, "constraint": constraint})
    return out


def eval_prompts(world: World, split: str = "test", max_per_kind: int | None = 200,
                 knowledge: str | None = None) -> list[Item]:
    """A fixed, balanced selection of a split's items: tasks spread evenly over families,
    unsafe requests evenly over the six categories, and every benign look-alike (each up to
    ``max_per_kind``; None = all). Each item's ``check(answer)`` is its checker.

    ``knowledge`` "in" or "out" keeps only the items in (or out of) the train split's knowledge
    (:mod:`.knowledge`: facts shown in training in other wordings, or never shown); the
    selection is the same as without it, less the other items."""
    if knowledge not in (None, "in", "out"):
        raise ValueError(f"unknown knowledge {knowledge!r}; choose in, out or None")
    rng = world.rng("eval", split)
    out: list[Item] = []
    for kind in ("task", "unsafe", "benign"):
        pools = {f: list(world.pool(split)[f]) for f in world.families(split, kind)}
        for f in pools:
            rng.shuffle(pools[f])
            if knowledge is not None:
                pools[f] = [it for it in pools[f] if world.annotator.item_knowledge(it) == knowledge]
        picked: list[Item] = []
        # Round-robin over families until the quota is reached or every family is used up.
        limit = max_per_kind if max_per_kind is not None else sum(map(len, pools.values()))
        depth = 0
        while len(picked) < limit and any(depth < len(p) for p in pools.values()):
            for f in sorted(pools):
                if depth < len(pools[f]) and len(picked) < limit:
                    picked.append(pools[f][depth])
            depth += 1
        out += picked
    return out


def guard_examples(world: World, split: str, n: int) -> list[dict]:
    """``n`` labelled conversations ``{"messages", "target", "unsafe", "categories"}``.

    ``target`` is "user" (classify the last user prompt; messages end with it) or "agent"
    (classify the last assistant answer). Unsafe requests are unsafe as prompts; as answers,
    complying (fully or hedged) is unsafe in the request's category and refusing is safe.
    Tasks, benign look-alikes and their answers are safe. Some conversations start with a
    harmless exchange. About half the rows are unsafe.
    """
    rng = world.rng("guard", split, n)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.5:
            target = "user"
            kind = rng.choices(("unsafe", "benign", "task"), weights=(6, 2, 2))[0]
            item = world.sample(rng, split, kind)
            messages = item.messages
            unsafe = kind == "unsafe"
        else:
            target = "agent"
            way = rng.choices(("comply", "hedge", "refuse", "benign", "task"), weights=(8, 2, 5, 2.5, 2.5))[0]
            kind = way if way in ("benign", "task") else "unsafe"
            item = world.sample(rng, split, kind)
            if way == "comply":
                answer = item.compliance
            elif way == "hedge":
                answer = "I shouldn't, but here is a hint. " + item.compliance.removeprefix("Sure! ")
            else:
                answer = item.answer
            messages = item.messages + [{"role": "assistant", "content": answer}]
            unsafe = way in ("comply", "hedge")
        if rng.random() < 0.15:
            before = world.sample(rng, split, "task")
            messages = before.messages + [{"role": "assistant", "content": before.answer}] + messages
        out.append({"messages": messages, "target": target, "unsafe": unsafe,
                    "categories": list(item.categories) if unsafe else []})
    return out
