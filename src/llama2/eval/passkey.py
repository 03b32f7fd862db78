"""Passkey retrieval: a synthetic probe of how far a model's usable context reaches.

A key is hidden at some depth inside filler of a given token length, and the prompt ends with a
question the model must answer with the key. Position interpolation (Chen et al. 2023) and
Llama 2 Long (Xiong et al. 2023) use this probe to show that a model whose RoPE was stretched and
fine-tuned on long sequences retrieves from the whole window, while one used past its training
length fails. Code Llama's long-context fine-tuning (Code Llama §2.4) is measured with a code
version of it (Code Llama §3.3, key retrieval: a function returning a number hidden in Python
code, and an ``assert`` on its value to complete).

The filler is code-like: lines of plain Python statements drawn at random from a small pool.
Code-like because the models probed here are code models, whose training text is code. As in the
original probe (Mohtashami & Jaggi 2023, the one Chen et al. use, whose answer starts by
repeating the words that introduced the key), the prompt ends with the very tokens that come
before the key in its line:

    # A long file. One line below sets the passkey; remember it.
    total = total + step
    (more filler lines)
    passkey = falcon  # remember this word
    (more filler lines)
    # What is the passkey?
    passkey =

The key is one word of :data:`KEYS` (64 nouns, none of them in the filler), not the literature's
five-digit number, and that is what a model of a few million parameters can learn in minutes:
finding a word of a class seen nowhere else in the window and copying it takes one attention
head, while copying five digits in order takes an induction circuit (a head that finds the
previous occurrence of the current digit and one that copies the token after it, Olsson et al.
2022), which at the code recipe's size and budget never formed (0% in every cell, and from
scratch on passkey texts alone it needed ~1,000 steps and only some seeds). What the probe
measures is the same: whether attention reaches the key from anywhere in the window, past the
training length or not. Chance is 1 in 64.

The answer (`` falcon``) is right when the first word the model writes is the key.
``passkey_documents`` gives training texts of the same shape with the answer appended, from a
separate seed space: a small model fine-tuned on them at some length (the code recipe uses 4x
the pretraining length, as Code Llama §2.4 extends 4k to 16k) can then be probed at that length
and beyond. A prompt's ``depth`` is the fraction of its filler lines that come before the key:
0 puts the key right after the header, 1 right before the question.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from llama2.eval.infill import greedy_complete

HEADER = "# A long file. One line below sets the passkey; remember it."
KEY_LINE = "passkey = {key}  # remember this word"
# The keys: concrete nouns, none a word of the header, the filler or the question.
KEYS = (
    "anchor", "apple", "basket", "bridge", "candle", "canyon", "castle", "cherry", "cloud", "comet", "copper",
    "desert", "dragon", "eagle", "engine", "falcon", "feather", "forest", "garden", "ginger", "glacier", "hammer",
    "harbor", "island", "jacket", "kettle", "ladder", "lantern", "lemon", "magnet", "marble", "meadow", "mirror",
    "needle", "ocean", "orange", "otter", "parrot", "pebble", "pepper", "pillow", "planet", "pocket", "rabbit",
    "raven", "river", "rocket", "saddle", "salmon", "silver", "spider", "sunset", "thunder", "tiger", "tomato",
    "tunnel", "turtle", "velvet", "violet", "walnut", "willow", "window", "wizard", "zebra",
)
QUESTION = "# What is the passkey?\npasskey ="
# Plain statements, no blocks (any order is valid Python), no word of KEYS (the key is the only one).
FILLER = (
    "total = total + step",
    "name = name.strip()",
    "items.append(value)",
    "value = max(value, limit)",
    "words = text.split()",
    "count = count + len(words)",
    "result = result or default",
    "line = line.rstrip()",
    "seen.add(item)",
    "parts = path.split(sep)",
    "size = size * scale",
    "flag = not flag",
)


@dataclass
class PasskeyPrompt:
    """``ids``: the prompt's tokens (BOS first), the tokens of ``text``; ``key``: the word to
    answer; ``key_position``: the index of the key line's first token in ``ids``."""

    text: str
    ids: list[int]
    key: str
    length: int
    depth: float
    key_position: int


def _text(filler: Sequence[str], before: int, after: int, key: str) -> tuple[str, str]:
    """(the text up to the key line, the whole prompt text)."""
    head = "\n".join([HEADER, *filler[:before]]) + "\n"
    rest = "\n".join([KEY_LINE.format(key=key), *filler[before:before + after], QUESTION])
    return head, head + rest


def _line_costs(tok) -> dict[str, int]:
    """Tokens each filler line adds in the middle of a file (pieces never cross a newline)."""
    base = len(tok.encode(HEADER + "\n"))
    return {line: len(tok.encode(HEADER + "\n" + line + "\n")) - base for line in FILLER}


def _build(tok, rng: random.Random, length: int, depth: float, costs: dict[str, int]) -> PasskeyPrompt:
    key = rng.choice(KEYS)
    filler = [rng.choice(FILLER) for _ in range(length)]  # more lines than can ever fit: each is >= 1 token
    fixed = len(tok.encode(_text([], 0, 0, key)[1], bos=True))

    def split(n: int) -> tuple[int, int]:
        before = round(depth * n)
        return before, n - before

    # The most filler lines that fit, by their summed cost; then checked against the real
    # tokenization of the whole text and trimmed if a boundary tokenized differently.
    n, used = 0, fixed
    while n < len(filler) and used + costs[filler[n]] <= length:
        used += costs[filler[n]]
        n += 1
    # The key splits the first n lines; which lines are used does not depend on depth's rounding.
    while True:
        before, after = split(n)
        head, text = _text(filler, before, after, key)
        ids = tok.encode(text, bos=True)
        if len(ids) <= length or n == 0:
            break
        n -= 1
    return PasskeyPrompt(text=text, ids=ids, key=key, length=length, depth=depth,
                         key_position=len(tok.encode(head, bos=True)))


def _fixed_tokens(tok) -> int:
    """Tokens of a prompt without filler (BOS, header, key line, question) with the longest key: the
    least any prompt takes, whatever key it draws."""
    return max(len(tok.encode(_text([], 0, 0, k)[1], bos=True)) for k in KEYS)


def _check(length: int, depths: Sequence[float], n: int) -> None:
    if length < 1:
        raise ValueError(f"passkey length must be >= 1 token, got {length}")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"passkey depth {bad[0]} is outside [0, 1]")
    if n < 1:
        raise ValueError(f"passkey n must be >= 1, got {n}")


def passkey_prompts(tok, length: int, depths: Sequence[float], n: int, seed: int = 0) -> list[PasskeyPrompt]:
    """``n`` prompts for each depth, of at most ``length`` tokens (BOS included) and within one
    filler line of it. Deterministic in ``seed``; each (length, depth, i) has its own random
    stream, so adding a depth or a length leaves the other prompts unchanged."""
    _check(length, depths, n)
    fixed = _fixed_tokens(tok)
    if fixed + 1 > length:
        raise ValueError(f"passkey length {length} is too short: the header, key line and question alone "
                         f"take {fixed} tokens")
    depths = list(dict.fromkeys(float(d) for d in depths))  # a depth given twice is one cell; 1 is 1.0
    costs = _line_costs(tok)
    return [_build(tok, random.Random(f"passkey-probe/{seed}/{length}/{depth!r}/{i}"), length, depth, costs)
            for depth in depths for i in range(n)]


def passkey_examples(length_tokens: int, n: int, seed: int, tok) -> list[tuple[str, str]]:
    """``n`` training examples as (prompt, answer): a probe-shaped prompt at a uniform random
    depth, and the key with a newline, each exactly ``length_tokens`` tokens as ``BOS prompt answer
    EOS`` (blank lines between filler lines make up what whole lines leave), so a trainer's window
    of that length holds one whole example. Their seed space is separate from the probe's (same
    seed, different keys and filler), so the probe never tests a training text."""
    _check(length_tokens, [0.0], n)
    costs = _line_costs(tok)
    answer = max(len(tok.encode(f" {k}\n")) for k in KEYS) + 1  # room for the longest answer and EOS
    fixed = _fixed_tokens(tok)
    if fixed + answer + 1 > length_tokens:
        raise ValueError(f"passkey training texts of {length_tokens} tokens are too short for this tokenizer: "
                         f"{answer} go to the answer and EOS, and the header, key line and question alone take "
                         f"{fixed} tokens")
    examples = []
    for i in range(n):
        rng = random.Random(f"passkey-train/{seed}/{length_tokens}/{i}")
        depth = rng.random()
        p = _build(tok, rng, length_tokens - answer, depth, costs)
        prompt, reply = p.text, f" {p.key}\n"
        short = length_tokens - len(tok.encode(prompt + reply, bos=True, eos=True))
        if short > 0:  # a newline is a token of its own (Llama 2's byte pieces), so each adds one
            lines = prompt.split("\n")
            for at in sorted(rng.choices(range(1, len(lines) - 1), k=short), reverse=True):
                lines.insert(at, "")
            prompt = "\n".join(lines)
        if len(tok.encode(prompt + reply, bos=True, eos=True)) != length_tokens:
            raise ValueError(f"cannot make a passkey text of exactly {length_tokens} tokens with this tokenizer "
                             "(blank lines do not add one token each)")
        examples.append((prompt, reply))
    return examples


def passkey_documents(length_tokens: int, n: int, seed: int, tok) -> list[str]:
    """:func:`passkey_examples` as whole texts, the answer after its prompt."""
    return [prompt + answer for prompt, answer in passkey_examples(length_tokens, n, seed, tok)]


def read_answer(text: str) -> str | None:
    """The first word (a run of letters) of a model's answer, or None."""
    m = re.search(r"[A-Za-z]+", text)
    return m.group(0) if m else None


def passkey_eval(model, tok, lengths: Sequence[int], depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                 n_per_cell: int = 5, seed: int = 0, batch_size: int = 4, max_new_tokens: int = 8,
                 samples: int = 3) -> dict:
    """Greedy passkey retrieval on a length x depth grid: ``{"cells": [{"length", "depth",
    "accuracy", "n"}, ...], "accuracy", "samples"}``. A length plus ``max_new_tokens`` must fit in
    the model's context (probe past the fine-tuning length, not past ``max_seq_len``)."""
    if not lengths:
        raise ValueError("passkey_eval: no lengths")
    depths = list(dict.fromkeys(float(d) for d in depths))
    limit = model.config.max_seq_len
    for length in lengths:
        if length + max_new_tokens > limit:
            raise ValueError(f"passkey length {length} + {max_new_tokens} answer tokens exceeds the model's "
                             f"context of {limit} tokens")
    cells, shown, right_all = [], [], 0
    stop = [tok.eos_id] if tok.eos_id is not None and tok.eos_id >= 0 else []
    for length in lengths:
        prompts = passkey_prompts(tok, length, depths, n_per_cell, seed)
        outs = greedy_complete(model, [p.ids for p in prompts], stop, max_new_tokens, batch_size)
        answers = [read_answer(tok.decode(ids)) for ids, _ in outs]
        for depth in depths:
            hits = [a == p.key for p, a in zip(prompts, answers) if p.depth == depth]
            cells.append({"length": length, "depth": depth, "accuracy": sum(hits) / len(hits), "n": len(hits)})
            right_all += sum(hits)
        for p, (ids, _) in list(zip(prompts, outs))[:samples]:
            shown.append({"length": length, "depth": p.depth, "key": p.key, "answer": tok.decode(ids)})
    total = sum(c["n"] for c in cells)
    return {"cells": cells, "accuracy": right_all / total, "n": total, "samples": shown}


def accuracy_by_length(result: dict) -> dict[int, float]:
    """A :func:`passkey_eval` result's accuracy at each length, over all its depths."""
    lengths = dict.fromkeys(c["length"] for c in result["cells"])
    return {n: sum(c["accuracy"] * c["n"] for c in result["cells"] if c["length"] == n) /
            sum(c["n"] for c in result["cells"] if c["length"] == n) for n in lengths}


def format_passkey_table(result: dict) -> str:
    """Accuracy as a markdown grid: one row per depth, one column per length."""
    cells = result["cells"]
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in cells}
    lines = ["| depth \\ length | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for d in depths:
        row = [f"{100 * acc[(n, d)]:.0f}%" if (n, d) in acc else "–" for n in lengths]
        lines.append(f"| {d:.2f} | " + " | ".join(row) + " |")
    return "\n".join(lines)
