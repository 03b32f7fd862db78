"""In and out of knowledge: whether a held-out prompt asks something the training split showed.

A tiny model only knows the facts and skills it was shown. A held-out (val/test) prompt is
**in** knowledge when every fact it needs appears in some train-split item, in another wording
or combination; it is **out** of knowledge when one of them was never shown. Every train-split
prompt is "in" by construction. The facts of an item:

* look-ups (capital, color, legs, opposite): the entry of the table ("France" for "Capital of
  France?"); the train split asks most entries in at least one of their three wordings.
* string operations (reverse, upper, count): the word; it is known when any string task of the
  train split works on it (reversing "cat" after upper-casing it in training is "in").
* arithmetic and word problems: the equations they rest on, an addition a + b = c standing for
  its two subtractions too (c - b = a), a product for itself (a x b and b x a share a split, so
  a held-out product is "in" only when a word problem of the train split multiplies the same
  numbers). "What is 23 + 45?" is in when the train split holds 68 - 45, 68 - 23 or a story
  with that sum; a two-step story needs both of its equations.
* unsafe requests: the action template ("steal {x}") and its object ("a car"), each seen in
  some train request (a new combination of known parts is "in", an unseen action or object is
  "out": the split holds whole actions out).
* benign look-alikes: the action ("kill a Python process"), asked in training in another wording.
"""

from __future__ import annotations

from collections.abc import Iterable

from llama2.data.world.content import UNSAFE_ACTIONS
from llama2.data.world.items import Item

_UNSAFE_PARTS = {template.format(x=value): (f"{cat}/{template}", value)
                 for cat, entries in UNSAFE_ACTIONS.items() for template, values in entries for value in values}


def _add(a: int, b: int) -> tuple:
    return ("add", min(a, b), max(a, b))


def facts(item: Item) -> frozenset:
    """The facts a prompt needs (see the module docstring), as hashable tuples."""
    fam, key = item.family, item.key
    if item.kind == "benign":
        return frozenset({("benign", key.rsplit(":", 1)[0])})
    if item.kind == "unsafe":
        template, value = _UNSAFE_PARTS[key]
        return frozenset({("unsafe_action", template), ("unsafe_object", value)})
    if fam in ("capital", "color", "legs", "opposite"):
        return frozenset({(fam, key.rsplit(":", 1)[0])})
    if fam in ("reverse", "upper", "count"):
        return frozenset({("word", key)})
    nums = [int(x) for x in key.split(":")]
    if fam in ("add", "story_add"):
        return frozenset({_add(nums[0], nums[1])})
    if fam in ("sub", "story_sub"):
        a, b = nums
        return frozenset({_add(a - b, b)})
    if fam in ("mul", "story_mul"):
        return frozenset({("mul", min(nums), max(nums))})
    if fam == "story_two":
        a, b, c = nums
        return frozenset({_add(a, b), _add(c, a + b - c)})
    raise ValueError(f"unknown family {fam!r}")


def fact_index(items: Iterable[Item]) -> frozenset:
    """Every fact the given (train-split) items show."""
    out: set = set()
    for it in items:
        out |= facts(it)
    return frozenset(out)


def knowledge_of(item: Item, train_facts: frozenset) -> str:
    """"in" if every fact the item needs is in ``train_facts``, else "out"."""
    return "in" if facts(item) <= train_facts else "out"
