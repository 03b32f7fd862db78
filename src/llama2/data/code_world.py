"""The bundled code world: small templated Python functions with tests, for infilling at tiny scale.

Like the assistant world (:mod:`llama2.data.world`), it is a synthetic domain whose answers a
program checks, sized for a ~5M-parameter model trained for minutes: each task is a short
module-level function with a docstring that says what it does, and a test of three to seven
``assert`` lines on inputs chosen so that any two different behaviours of a family disagree
on at least one (a wrong body fails; :func:`run_test` runs a test in a fresh process). The body is one regular line a model can learn to fill in from the
docstring (Code Llama §2.3's infilling, asked as in Meta's codellama prompts):

    def times_3_plus_2(x):
        \"\"\"Return x times 3 plus 2.\"\"\"          <- prefix
        result = x * 3 + 2                        <- middle (the line to infill)
        return result                             <- suffix

Conditionals fill in the condition instead (``    if x > 5:``, then the two returns as the
suffix). Five families: ``affine`` (arithmetic on one argument), ``pair`` (two arguments),
``string``, ``list`` and ``cond`` (comparisons of one argument).

Splits
------
A task's **key** is its behaviour: family, operation and constants (``affine:muladd:3:2``).
Keys are ranked by a SHA-256 hash inside their family and cut 70/15/15 into train/val/test,
whatever the seed, so held-out tasks are unseen combinations (``times 3 plus 2`` may be held
out while ``times 3`` and ``plus 2`` are trained on) and data made with one seed never leaks
test tasks into a model trained with another. The seed only picks the surface: the function's
name and the docstring's wording (two of each per operation) and one random test input.

:func:`code_tasks` gives tasks with the prefix/middle/suffix cut and the test;
:func:`code_documents` gives the train split's text for pretraining (function, blank line,
test). Pure Python and deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

__all__ = ["CODE_FAMILIES", "SPLITS", "CodeTask", "code_documents", "code_keys", "code_tasks", "run_test"]

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
CODE_FAMILIES = ("affine", "pair", "string", "list", "cond")

# Fixed test inputs, chosen so that any two operations of one family disagree on at least one of them.
_WORDS = ("banana", "hello", "tomato")
_EXTRA_WORDS = ("apple", "river", "stone", "cat", "garden", "moon", "paper", "table", "window", "green")
_LISTS = ([3, 1, 2], [5, 0, 7, 4], [-2, 6])
_PAIRS = ((1, 2), (3, 4))
_COND_VALUES = (-3, 0, 10, 12)


@dataclass(frozen=True)
class CodeTask:
    """One function of the code world: ``prefix + middle + suffix`` is its source, ``middle`` the
    line to infill, ``test`` Python that asserts on it (run after the source)."""

    name: str
    prefix: str
    middle: str
    suffix: str
    test: str
    family: str = ""
    key: str = ""  # split key: the behaviour (family, operation, constants), not the surface

    @property
    def source(self) -> str:
        return self.prefix + self.middle + self.suffix

    @property
    def document(self) -> str:
        """Pretraining text: the function, a blank line, its test."""
        return f"{self.source}\n{self.test}"


@dataclass(frozen=True)
class _Op:
    """One behaviour: the key, the argument list, the body and two names and docstrings to pick from."""

    family: str
    key: str
    args: str
    body: str  # "expr": the value of `result`; "cond": the condition of the `if`
    names: tuple[str, str]
    docs: tuple[str, str]
    labels: tuple[str, str] | None = None  # cond: what the function returns when the condition holds, else


def _affine() -> list[_Op]:
    ops = []
    for c in range(1, 13):
        ops.append(_Op("affine", f"affine:add:{c}", "x", f"x + {c}", (f"add_{c}", f"plus_{c}"),
                       (f"Return x plus {c}.", f"Add {c} to x.")))
        ops.append(_Op("affine", f"affine:sub:{c}", "x", f"x - {c}", (f"sub_{c}", f"minus_{c}"),
                       (f"Return x minus {c}.", f"Subtract {c} from x.")))
        if c >= 2:
            ops.append(_Op("affine", f"affine:mul:{c}", "x", f"x * {c}", (f"times_{c}", f"multiply_by_{c}"),
                           (f"Return x times {c}.", f"Multiply x by {c}.")))
    for c in range(2, 7):
        for d in range(1, 7):
            ops.append(_Op("affine", f"affine:muladd:{c}:{d}", "x", f"x * {c} + {d}",
                           (f"times_{c}_plus_{d}", f"scale_{c}_add_{d}"),
                           (f"Return x times {c} plus {d}.", f"Multiply x by {c}, then add {d}.")))
    return ops


def _pair() -> list[_Op]:
    ops = [
        _Op("pair", "pair:add", "a, b", "a + b", ("add", "add_both"), ("Return a plus b.", "Add a and b.")),
        _Op("pair", "pair:sub", "a, b", "a - b", ("subtract", "difference"),
            ("Return a minus b.", "Subtract b from a.")),
        _Op("pair", "pair:mul", "a, b", "a * b", ("multiply", "product"),
            ("Return a times b.", "Multiply a by b.")),
        _Op("pair", "pair:max", "a, b", "max(a, b)", ("larger", "biggest"),
            ("Return the larger of a and b.", "Return the bigger of a and b.")),
        _Op("pair", "pair:min", "a, b", "min(a, b)", ("smaller", "least"),
            ("Return the smaller of a and b.", "Return the lesser of a and b.")),
    ]
    for c in range(2, 10):
        ops.append(_Op("pair", f"pair:mul_a_add_b:{c}", "a, b", f"a * {c} + b", (f"a_times_{c}_plus_b", f"scale_a_{c}"),
                       (f"Return a times {c} plus b.", f"Multiply a by {c}, then add b.")))
        ops.append(_Op("pair", f"pair:add_b_mul:{c}", "a, b", f"a + b * {c}", (f"a_plus_b_times_{c}", f"scale_b_{c}"),
                       (f"Return a plus b times {c}.", f"Add b times {c} to a.")))
        ops.append(_Op("pair", f"pair:sum_mul:{c}", "a, b", f"(a + b) * {c}", (f"sum_times_{c}", f"total_times_{c}"),
                       (f"Return a plus b, times {c}.", f"Add a and b, then multiply by {c}.")))
    return ops


def _string() -> list[_Op]:
    ops = [
        _Op("string", "string:upper", "s", "s.upper()", ("shout", "to_upper"),
            ("Return s in upper case.", "Make every letter of s upper case.")),
        _Op("string", "string:title", "s", "s.title()", ("capitalize_word", "to_title"),
            ("Return s with its first letter in upper case.", "Capitalize the first letter of s.")),
        _Op("string", "string:reverse", "s", "s[::-1]", ("reverse", "backwards"),
            ("Return s reversed.", "Return the letters of s in reverse order.")),
        _Op("string", "string:len", "s", "len(s)", ("length", "count_letters"),
            ("Return the number of letters in s.", "Return the length of s.")),
    ]
    for end in ("!", "?", "s", "ing", "ed"):
        word = {"!": "bang", "?": "question", "s": "s", "ing": "ing", "ed": "ed"}[end]
        ops.append(_Op("string", f"string:append:{end}", "s", f's + "{end}"', (f"add_{word}", f"append_{word}"),
                       (f'Return s followed by "{end}".', f'Append "{end}" to s.')))
    for start in ("re", "un", "pre"):
        ops.append(_Op("string", f"string:prepend:{start}", "s", f'"{start}" + s', (f"prefix_{start}", f"prepend_{start}"),
                       (f'Return "{start}" followed by s.', f'Put "{start}" before s.')))
    for c in range(2, 5):
        ops.append(_Op("string", f"string:repeat:{c}", "s", f"s * {c}", (f"repeat_{c}", f"copies_{c}"),
                       (f"Return s repeated {c} times.", f"Repeat s {c} times.")))
    for c in range(1, 5):
        ops.append(_Op("string", f"string:first:{c}", "s", f"s[:{c}]", (f"first_{c}", f"head_{c}"),
                       (f"Return the first {c} letters of s.", f"Keep the first {c} letters of s.")))
        ops.append(_Op("string", f"string:last:{c}", "s", f"s[-{c}:]", (f"last_{c}", f"tail_{c}"),
                       (f"Return the last {c} letters of s.", f"Keep the last {c} letters of s.")))
    for ch in "aelnot":
        ops.append(_Op("string", f"string:count:{ch}", "s", f's.count("{ch}")', (f"count_{ch}", f"number_of_{ch}"),
                       (f'Return how many times "{ch}" occurs in s.', f'Count the letter "{ch}" in s.')))
    for old in "aeo":
        for new in "aeiou":
            if new != old:
                ops.append(_Op("string", f"string:replace:{old}:{new}", "s", f's.replace("{old}", "{new}")',
                               (f"{old}_to_{new}", f"swap_{old}_{new}"),
                               (f'Return s with every "{old}" changed to "{new}".',
                                f'Replace each "{old}" in s by "{new}".')))
    return ops


def _list() -> list[_Op]:
    ops = [
        _Op("list", "list:sum", "xs", "sum(xs)", ("total", "sum_all"),
            ("Return the sum of the numbers in xs.", "Add up the numbers in xs.")),
        _Op("list", "list:max", "xs", "max(xs)", ("largest", "maximum"),
            ("Return the largest number in xs.", "Return the biggest item of xs.")),
        _Op("list", "list:min", "xs", "min(xs)", ("smallest", "minimum"),
            ("Return the smallest number in xs.", "Return the least item of xs.")),
        _Op("list", "list:len", "xs", "len(xs)", ("size", "count_items"),
            ("Return the number of items in xs.", "Return the length of xs.")),
        _Op("list", "list:sorted", "xs", "sorted(xs)", ("sort_list", "in_order"),
            ("Return the items of xs in increasing order.", "Return xs sorted from small to large.")),
        _Op("list", "list:reverse", "xs", "xs[::-1]", ("reverse_list", "backwards_list"),
            ("Return the items of xs in reverse order.", "Return xs reversed.")),
    ]
    for c in range(2, 10):
        ops.append(_Op("list", f"list:mul:{c}", "xs", f"[x * {c} for x in xs]", (f"times_{c}_each", f"scale_all_{c}"),
                       (f"Return each number in xs times {c}.", f"Multiply every item of xs by {c}.")))
    for c in range(1, 10):
        ops.append(_Op("list", f"list:add:{c}", "xs", f"[x + {c} for x in xs]", (f"plus_{c}_each", f"shift_all_{c}"),
                       (f"Return each number in xs plus {c}.", f"Add {c} to every item of xs.")))
    for c in range(0, 7):
        ops.append(_Op("list", f"list:above:{c}", "xs", f"[x for x in xs if x > {c}]", (f"filter_above_{c}", f"keep_over_{c}"),
                       (f"Return the numbers in xs greater than {c}.", f"Keep the items of xs that are over {c}.")))
        ops.append(_Op("list", f"list:count_above:{c}", "xs", f"len([x for x in xs if x > {c}])",
                       (f"count_above_{c}", f"how_many_over_{c}"),
                       (f"Return how many numbers in xs are greater than {c}.",
                        f"Count the items of xs that are over {c}.")))
    return ops


_CONDITIONS = {  # op: (name words, docstring comparison, labels)
    ">": (("is_big", "above"), "greater than", ("big", "small")),
    "<": (("is_low", "below"), "less than", ("low", "high")),
    ">=": (("passes", "at_least"), "at least", ("pass", "fail")),
    "<=": (("fits", "at_most"), "at most", ("ok", "over")),
    "==": (("is_equal", "matches"), "equal to", ("yes", "no")),
}


def _cond() -> list[_Op]:
    ops = []
    for op, ((n1, n2), words, (yes, no)) in _CONDITIONS.items():
        for c in range(1, 10):
            ops.append(_Op("cond", f"cond:{op}:{c}", "x", f"x {op} {c}", (f"{n1}_{c}", f"{n2}_{c}"),
                           (f'Return "{yes}" if x is {words} {c}, else "{no}".',
                            f'Say "{yes}" when x is {words} {c}, otherwise "{no}".'), (yes, no)))
    for c in range(2, 10):
        ops.append(_Op("cond", f"cond:%:{c}", "x", f"x % {c} == 0", (f"divisible_by_{c}", f"multiple_of_{c}"),
                       (f'Return "yes" if x is divisible by {c}, else "no".',
                        f'Say "yes" when x is a multiple of {c}, otherwise "no".'), ("yes", "no")))
    return ops


_BUILDERS = {"affine": _affine, "pair": _pair, "string": _string, "list": _list, "cond": _cond}


def _ops() -> dict[str, _Op]:
    return {op.key: op for family in CODE_FAMILIES for op in _BUILDERS[family]()}


def _split_of() -> dict[str, str]:
    """Key -> split: ranked by SHA-256 inside the family, cut 70/15/15 (not seed-dependent)."""
    split: dict[str, str] = {}
    for family in CODE_FAMILIES:
        keys = sorted((op.key for op in _BUILDERS[family]()), key=lambda k: hashlib.sha256(k.encode()).hexdigest())
        n_train = round(SPLIT_FRACTIONS[0] * len(keys))
        n_val = round(SPLIT_FRACTIONS[1] * len(keys))
        for i, key in enumerate(keys):
            split[key] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return split


def code_keys(split: str) -> list[str]:
    """The behaviour keys of one split, in a fixed order."""
    _check_split(split)
    return [k for k, s in _split_of().items() if s == split]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"code world split must be one of {', '.join(SPLITS)}, got {split!r}")


def _inputs(op: _Op, rng: random.Random) -> list[str]:
    """The test's argument lists (as Python source): fixed ones that tell the family's operations
    apart, plus one drawn at random."""
    if op.family == "affine":
        return ["0", "1", str(rng.randint(2, 20))]
    if op.family == "pair":
        return [f"{a}, {b}" for a, b in _PAIRS] + [f"{rng.randint(0, 9)}, {rng.randint(0, 9)}"]
    if op.family == "string":
        return [repr(w).replace("'", '"') for w in (*_WORDS, rng.choice(_EXTRA_WORDS))]
    if op.family == "list":
        extra = [rng.randint(0, 9) for _ in range(rng.randint(1, 4))]
        return [repr(xs) for xs in (*_LISTS, extra)]
    # cond: both sides of the threshold, and the fewest fixed values that tell every two
    # conditions apart that differ on integers (x > 4 and x >= 5 do not; both are right).
    c = int(op.key.rsplit(":", 1)[1])
    return [str(v) for v in dict.fromkeys([c - 1, c, c + 1, *_COND_VALUES])]


def _task(op: _Op, seed: int, round_: int) -> CodeTask:
    rng = random.Random(f"code/{seed}/{op.key}/{round_}")
    name = rng.choice(op.names)
    prefix = f'def {name}({op.args}):\n    """{rng.choice(op.docs)}"""\n'
    if op.labels is None:
        middle, suffix = f"    result = {op.body}\n", "    return result\n"
    else:
        middle = f"    if {op.body}:\n"
        suffix = f'        return "{op.labels[0]}"\n    return "{op.labels[1]}"\n'
    source = prefix + middle + suffix
    namespace: dict = {}
    exec(source, namespace)  # our own template: computes the expected values of the test
    lines = []
    for args in _inputs(op, rng):
        value = eval(f"{name}({args})", namespace)
        lines.append(f"assert {name}({args}) == {_literal(value)}\n")
    return CodeTask(name, prefix, middle, suffix, "".join(lines), op.family, op.key)


def _literal(value) -> str:
    return repr(value).replace("'", '"') if isinstance(value, str) else repr(value)


def code_tasks(seed: int, split: str, n: int) -> list[CodeTask]:
    """``n`` tasks of ``split``: its behaviours in a seeded order, each once before any repeats
    (a repeat gets a new name, docstring and random input)."""
    _check_split(split)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    ops = _ops()
    keys = code_keys(split)
    random.Random(f"code/{seed}/{split}").shuffle(keys)
    return [_task(ops[keys[i % len(keys)]], seed, i // len(keys)) for i in range(n)]


def code_documents(seed: int, split: str, n: int, tests: bool = True) -> list[str]:
    """Pretraining text of ``n`` tasks of ``split``: each function's source, then (``tests``) a
    blank line and its test.

    Without the tests a document ends where an infilling task's suffix ends, which is what a
    tiny model needs to learn where a middle stops. Measured with a 0.87M-parameter model
    trained on 4,000 documents for 600 steps of 4,096 tokens with 90% FIM (seven CPU minutes):
    33 held-out tasks in SPM order passed 8 without tests and 1 with them (the model, used to
    suffixes that run on into a test, did not stop at ``EOT``); PSM passed none either way at
    that size. With the tests, the documents also show what the functions compute."""
    return [t.document if tests else t.source for t in code_tasks(seed, split, n)]


def run_test(source: str, test: str, timeout: float = 10.0) -> bool:
    """Whether ``source`` followed by ``test`` runs without error in a fresh Python process
    (so a generated middle cannot touch this process)."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-I", "-c", source + "\n" + test], capture_output=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0
