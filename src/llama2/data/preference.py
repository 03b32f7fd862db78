"""Preference pairs for reward models (§3.2.1–3.2.2): JSONL -> tokenized chosen/rejected pairs.

A row is ``{"prompt" | "messages", "chosen", "rejected", "rating"}`` with an optional
``safety`` label and an optional explicit numeric ``margin``. Both answers are encoded in
the chat format after the same prompt, so the reward model reads the answer's last token
(its EOS) with the whole dialogue in view.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llama2.chat import chat_segments, validate_dialogue
from llama2.utils import DataError, read_jsonl

# Table 27: margin m(r) by rating, "small" and "large" variants. The paper does not say which
# the final models used; "small" is our default because it helped most on similar pairs.
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
MARGINS = {
    "none": {"significantly_better": 0.0, "better": 0.0, "slightly_better": 0.0, "negligibly_better": 0.0},
    "small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0.0},
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0},
}


def normalize_rating(rating: str) -> str:
    r = rating.strip().lower().replace(" ", "_").replace("-", "_")
    if r == "unsure":  # the paper pools "negligibly better / unsure"
        return "negligibly_better"
    if r not in RATINGS:
        raise ValueError(f"unknown rating {rating!r}; expected one of {', '.join(RATINGS)} or unsure")
    return r


def margin_for(rating: str, table: str = "small") -> float:
    if table not in MARGINS:
        raise ValueError(f"unknown margin table {table!r}; choose none, small or large")
    return MARGINS[table][normalize_rating(rating)]


@dataclass
class Pair:
    messages: list[dict]  # the dialogue up to and including the last user turn
    chosen: str
    rejected: str
    rating: str
    safety: bool = False
    margin: float | None = None  # explicit margin overrides the rating's
    safety_label: str | None = None  # §3.2.1: "chosen_only_safe", "both_safe" or "neither_safe"


def parse_pair(obj: dict) -> Pair:
    if "messages" in obj:
        messages = obj["messages"]
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise ValueError("'prompt' must be a string")
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        raise ValueError("expected 'prompt' or 'messages'")
    validate_dialogue(messages)
    for key in ("chosen", "rejected"):
        if not isinstance(obj.get(key), str):
            raise ValueError(f"'{key}' must be a string answer")
    if "rating" not in obj:
        raise ValueError("missing 'rating'")
    margin = obj.get("margin")
    if margin is not None and not isinstance(margin, (int, float)):
        raise ValueError("'margin' must be a number")
    label = obj.get("safety_label")
    if label not in (None, "chosen_only_safe", "both_safe", "neither_safe"):
        raise ValueError(f"unknown safety_label {label!r}; expected chosen_only_safe, both_safe or neither_safe")
    return Pair(list(messages), obj["chosen"], obj["rejected"], normalize_rating(str(obj["rating"])),
                bool(obj.get("safety", False)), None if margin is None else float(margin), label)


def load_pairs(path: str | os.PathLike) -> list[Pair]:
    pairs = []
    for n, obj in read_jsonl(path):
        try:
            pairs.append(parse_pair(obj))
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:  # a row of the wrong shape
            raise DataError(f"{path}:{n}: {e}") from None
    if not pairs:
        raise DataError(f"{path}: no preference pairs found")
    return pairs


def mix(helpful: Sequence[Pair], safety: Sequence[Pair], kind: str, seed: int = 0) -> list[Pair]:
    """§3.2.2 data mixing: the Helpfulness RM sees all helpfulness data plus an equal amount of
    safety data; the Safety RM sees all safety data plus 10% helpfulness data."""
    rng = random.Random(seed)
    if kind == "helpfulness":
        extra = rng.sample(list(safety), min(len(safety), len(helpful)))
        out = list(helpful) + extra
    elif kind == "safety":
        extra = rng.sample(list(helpful), min(len(helpful), len(safety) // 10))
        out = list(safety) + extra
    else:
        raise ValueError(f"unknown reward model kind {kind!r}; choose helpfulness or safety")
    rng.shuffle(out)
    return out


def encode_answer(tokenizer, messages: Sequence[dict], answer: str) -> list[int]:
    dialogue = list(messages) + [{"role": "assistant", "content": answer}]
    return [i for seg in chat_segments(tokenizer, dialogue, allow_final_assistant=True) for i in seg.ids]


def pad_rows(rows: Sequence[Sequence[int]], max_len: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [N, T] tokens and lengths; over-long rows keep their end (the answer and its
    EOS, which is what a reward model scores)."""
    rows = [list(r)[-max_len:] for r in rows]
    tokens = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    return tokens, torch.tensor([len(r) for r in rows])


def collate_pairs(tokenizer, pairs: Sequence[Pair], margin_table: str, max_len: int, pad_id: int = 0) -> dict:
    """Chosen rows then rejected rows in one right-padded batch (one forward pass for both),
    with each row's length (the reward is read at its last token) and the pair margins."""
    rows = [encode_answer(tokenizer, p.messages, p.chosen) for p in pairs]
    rows += [encode_answer(tokenizer, p.messages, p.rejected) for p in pairs]
    tokens, lengths = pad_rows(rows, max_len, pad_id)
    margins = [p.margin if p.margin is not None else margin_for(p.rating, margin_table) for p in pairs]
    return {
        "tokens": tokens,
        "lengths": lengths,
        "margin": torch.tensor(margins, dtype=torch.float32),
        "rating": [p.rating for p in pairs],
        "safety": torch.tensor([p.safety for p in pairs]),
    }


class PairDataset:
    """Preference pairs indexed for the trainer's loaders: ``batch(indices)`` collates them."""

    def __init__(self, pairs: Sequence[Pair], tokenizer, margin_table: str, max_len: int, name: str = "pairs"):
        self.pairs, self.tokenizer, self.margin_table, self.max_len = list(pairs), tokenizer, margin_table, max_len
        self.seq_len, self.name = max_len, name

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, indices) -> dict:
        return collate_pairs(self.tokenizer, [self.pairs[int(i)] for i in indices], self.margin_table, self.max_len)
