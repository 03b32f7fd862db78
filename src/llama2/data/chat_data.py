"""Chat fine-tuning data: JSONL conversations -> token ids with answer-only loss labels -> packed batches.

Labels come from the per-turn token spans of :func:`llama2.chat.chat_segments` (by
construction, never by searching the token stream for a response template). Packing puts
several conversations in one sequence like the paper (§3.1); a block-diagonal attention
mask and per-document RoPE positions keep each conversation blind to the others, and since
every conversation starts with a prompt (label -100) no conversation learns to predict the
next one's first token.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from llama2.chat import chat_segments, validate_dialogue
from llama2.utils import DataError, read_jsonl

IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    def __len__(self) -> int:
        return len(self.ids)


def to_messages(obj: dict) -> list[dict]:
    """Accept OpenAI/TRL ``{"messages": [...]}`` or ``{"prompt", "completion"}`` rows."""
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list):
            raise ValueError("'messages' must be a list")
        return msgs
    if "prompt" in obj and "completion" in obj:
        msgs = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
        if obj.get("system"):
            msgs.insert(0, {"role": "system", "content": obj["system"]})
        return msgs
    raise ValueError("expected 'messages' or 'prompt' + 'completion'")


def load_conversations(path: str | os.PathLike) -> list[list[dict]]:
    """Conversations from a JSONL file, each validated (it must end with an assistant answer)."""
    out = []
    for n, obj in read_jsonl(path):
        try:
            msgs = to_messages(obj)
            validate_dialogue(msgs, allow_final_assistant=True)
            if msgs[-1]["role"] != "assistant":
                raise ValueError("the last message must be the assistant's answer to learn from")
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:  # a row of the wrong shape
            raise DataError(f"{path}:{n}: {e}") from None
        out.append(msgs)
    if not out:
        raise DataError(f"{path}: no conversations found")
    return out


def tokenize_conversation(tokenizer, messages: Sequence[dict], loss_turns: Iterable[int] | None = None) -> Example:
    """Token ids of a conversation in Meta's format, with labels on answers (and their EOS) only.

    ``loss_turns`` restricts the loss to the answers of those exchanges (Ghost Attention,
    §3.3, zeroes the loss of every earlier turn); None = every answer.
    """
    keep = None if loss_turns is None else set(loss_turns)
    ids: list[int] = []
    labels: list[int] = []
    for seg in chat_segments(tokenizer, messages, allow_final_assistant=True):
        ids += seg.ids
        learn = seg.is_answer and (keep is None or seg.turn in keep)
        labels += seg.ids if learn else [IGNORE] * len(seg.ids)
    return Example(ids, labels)


@dataclass
class Packed:
    ids: list[int]
    labels: list[int]
    doc: list[int]  # which example each token belongs to (for the attention mask and positions)


def pack(examples: Sequence[Example], seq_len: int) -> tuple[list[Packed], int]:
    """Greedily concatenate examples into sequences of at most ``seq_len + 1`` tokens (inputs and
    shifted targets). Returns the packed sequences and how many examples were truncated."""
    cap = seq_len + 1
    packs: list[Packed] = []
    cur = Packed([], [], [])
    truncated = 0
    for ex in examples:
        ids, labels = ex.ids, ex.labels
        if len(ids) > cap:
            ids, labels, truncated = ids[:cap], labels[:cap], truncated + 1
        if cur.ids and len(cur.ids) + len(ids) > cap:
            packs.append(cur)
            cur = Packed([], [], [])
        n_doc = (cur.doc[-1] + 1) if cur.doc else 0
        cur.ids += ids
        cur.labels += labels
        cur.doc += [n_doc] * len(ids)
    if cur.ids:
        packs.append(cur)
    return packs, truncated


def collate(seqs: Sequence[Packed], seq_len: int, pad_id: int = 0, packed: bool = True) -> dict[str, torch.Tensor]:
    """Right-pad to ``seq_len + 1`` and shift: tokens/labels [B, T], positions [B, T], mask [B,1,T,T].

    Padding tokens get label IGNORE and a document id of their own, so they neither learn nor
    are seen. Without packing (one example per row) only the causal + padding mask is needed.
    """
    B, T = len(seqs), seq_len + 1
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.ids)
        ids[i, :n] = torch.tensor(s.ids)
        labels[i, :n] = torch.tensor(s.labels)
        doc[i, :n] = torch.tensor(s.doc)
    doc_in = doc[:, :-1]
    # Position of each token inside its own document: index minus the document's first index.
    idx = torch.arange(T - 1).expand(B, -1)
    starts = torch.ones_like(doc_in, dtype=torch.bool)
    starts[:, 1:] = doc_in[:, 1:] != doc_in[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    positions = idx - first
    causal = torch.ones(T - 1, T - 1, dtype=torch.bool).tril()
    same = doc_in.unsqueeze(2) == doc_in.unsqueeze(1)
    mask = (same & causal).unsqueeze(1)
    if not packed:
        positions = idx.clone()
    return {"tokens": ids[:, :-1], "labels": labels[:, 1:], "positions": positions, "mask": mask}


class ChatSequences:
    """Packed (or padded) chat sequences indexed like token windows, for the trainer's loaders."""

    def __init__(self, seqs: Sequence[Packed], seq_len: int, pad_id: int = 0, packed: bool = True,
                 name: str = "chat data"):
        self.seqs, self.seq_len, self.pad_id, self.packed, self.name = list(seqs), seq_len, pad_id, packed, name

    def __len__(self) -> int:
        return len(self.seqs)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        return collate([self.seqs[int(i)] for i in indices], self.seq_len, self.pad_id, self.packed)


def build_sequences(examples: Sequence[Example], seq_len: int, packed: bool = True) -> tuple[list[Packed], int]:
    """Pack examples (the paper's choice, §3.1) or give each its own padded row."""
    if packed:
        return pack(examples, seq_len)
    rows, truncated = [], 0
    for ex in examples:
        n = min(len(ex), seq_len + 1)
        truncated += n < len(ex)
        rows.append(Packed(ex.ids[:n], ex.labels[:n], [0] * n))
    return rows, truncated
