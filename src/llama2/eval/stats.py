"""Is one model better than another on the same prompts, or is the difference noise?

At tiny scale a stage moves task accuracy by a few prompts out of a few hundred, as much as a
different seed does; the report therefore compares two models prompt by prompt and says how
likely such a split would be if neither model were better (an exact two-sided sign test).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SIGNIFICANCE = 0.05  # below this p-value the report calls a change real


def sign_test(gained: int, lost: int) -> float:
    """Two-sided p-value of ``gained`` prompts won and ``lost`` prompts lost (ties dropped) when
    each of the ``gained + lost`` changes is a fair coin flip."""
    if gained < 0 or lost < 0:
        raise ValueError(f"counts must be >= 0, got gained={gained}, lost={lost}")
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_changes(before: Sequence[float], after: Sequence[float]) -> tuple[int, int]:
    """(up, down): prompts whose result went up and down from ``before`` to ``after``, unchanged
    ones dropped. For right/wrong flags that is (gained, lost); for scores (higher, lower)."""
    if len(before) != len(after):
        raise ValueError(f"paired comparison needs the same prompts, got {len(before)} and {len(after)}")
    return sum(b > a for a, b in zip(before, after)), sum(b < a for a, b in zip(before, after))
