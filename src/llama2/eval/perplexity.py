"""Perplexity on held-out text, computed the way llama.cpp's ``llama-perplexity`` computes it,
so the two numbers are comparable.

llama.cpp's rules (``examples/perplexity/perplexity.cpp``, ``perplexity()``):

* the whole text is tokenized once, with BOS in front;
* it needs at least ``2 * n_ctx`` tokens, and splits them into ``len(tokens) // n_ctx``
  non-overlapping chunks of ``n_ctx`` tokens (``--chunks N`` keeps the first N); the tail
  that does not fill a chunk is dropped;
* each chunk is evaluated on its own, with its first token replaced by BOS;
* only the second half is scored: with ``first = n_ctx // 2``, the logits at positions
  ``first .. n_ctx - 2`` predict the tokens at ``first + 1 .. n_ctx - 1``, i.e.
  ``n_ctx - first - 1`` tokens per chunk (255 for ``n_ctx = 512``);
* PPL = exp(mean NLL) over every scored token, and its "±" is ``PPL * sem``, where
  ``sem = sqrt((mean(NLL²) - mean(NLL)²) / (count - 1))``, the standard error of the mean NLL.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch


def read_text(path: str | os.PathLike) -> str:
    """A text file as ``llama-perplexity -f`` reads it: bytes as they are (no newline
    translation), decoded as UTF-8, one trailing newline dropped."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    return text[:-1] if text.endswith("\n") else text


def chunk_tokens(tokens: list[int], ctx: int, max_chunks: int | None = None) -> list[list[int]]:
    """The non-overlapping ``ctx``-token chunks llama.cpp scores (the partial tail dropped)."""
    n = len(tokens) // ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    return [tokens[i * ctx:(i + 1) * ctx] for i in range(n)]


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, ctx: int = 512, max_chunks: int | None = None,
               batch_size: int = 4, name: str = "text") -> dict:
    """llama.cpp's perplexity of ``model`` on ``text`` (see the module docstring).

    ``batch_size`` chunks run per forward pass (llama.cpp's default n_batch 2048 holds four
    512-token chunks); ``name`` names the text in errors (the file it came from).
    Returns ``perplexity``, ``stderr`` (llama.cpp's ±), ``nll`` (mean), ``chunks``,
    ``tokens`` (scored), ``ctx`` and ``text_tokens`` (the whole text's token count)."""
    if ctx < 4:
        raise ValueError(f"ctx must be at least 4, got {ctx}")
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"max_chunks must be at least 1, got {max_chunks}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    limit = model.config.max_seq_len
    if ctx > limit:
        raise ValueError(f"ctx {ctx} is longer than the model's context ({limit} tokens)")
    tokens = tokenizer.encode(text, bos=True)
    if len(tokens) < 2 * ctx:
        raise ValueError(f"{name}: {len(tokens)} tokens, but perplexity with a context of {ctx} needs at "
                         f"least {2 * ctx} (two chunks)")
    chunks = chunk_tokens(tokens, ctx, max_chunks)
    first = ctx // 2
    model.eval()
    device = next(model.parameters()).device
    nll_sum, nll2_sum, count = 0.0, 0.0, 0
    for start in range(0, len(chunks), batch_size):
        batch = torch.tensor(chunks[start:start + batch_size], dtype=torch.long, device=device)
        batch[:, 0] = tokenizer.bos_id
        hidden = model.hidden_states(batch)[:, first:ctx - 1]  # only the scored positions reach the head
        logp = torch.log_softmax(model.output(hidden).float(), dim=-1)
        targets = batch[:, first + 1:]
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
        nll_sum += float(nll.sum())
        nll2_sum += float((nll * nll).sum())
        count += nll.numel()
    mean = nll_sum / count
    var = nll2_sum / count - mean * mean
    ppl = math.exp(mean)
    sem = math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
    return {"perplexity": ppl, "stderr": ppl * sem, "nll": mean, "chunks": len(chunks), "tokens": count,
            "ctx": ctx, "text_tokens": len(tokens)}


@torch.inference_mode()
def loss_by_position(model, chunks: Sequence[Sequence[int]], edges: Sequence[int], bos_id: int | None = None) -> dict:
    """Mean next-token loss by position in the window, the curve that shows how far a model's
    context reaches (Code Llama §3.3, Figure 4a: perplexity by context length; Chen et al. 2023).

    Each chunk (token ids, at least ``edges[-1]`` long, first token replaced by ``bos_id`` when
    given) is read whole from position 0; the loss of predicting the token at position ``p``
    counts towards bucket ``k`` when ``edges[k] <= p < edges[k + 1]``. A model used past the
    length it was trained at sees relative distances it never saw, and its loss there rises.
    Returns ``edges``, ``nll`` (mean per bucket), ``perplexity`` (its exp), ``tokens`` (scored
    per bucket) and ``chunks``."""
    edges = [int(e) for e in edges]
    if len(edges) < 2 or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must be increasing positions >= 0, at least two; got {edges}")
    length = edges[-1]
    chunks = [list(c[:length]) for c in chunks if len(c) >= length]
    if not chunks:
        raise ValueError(f"no chunk of at least {length} tokens to score")
    device = next(model.parameters()).device
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    counts = torch.zeros(len(edges) - 1, dtype=torch.long)
    # The token at position p (1 <= p < length) is predicted from positions 0..p-1.
    bucket = torch.bucketize(torch.arange(1, length), torch.tensor(edges[1:]), right=True)
    for chunk in chunks:
        x = torch.tensor([chunk], dtype=torch.long, device=device)
        if bos_id is not None:
            x[0, 0] = bos_id
        logp = torch.log_softmax(model(x[:, :-1]).float(), dim=-1)[0]
        nll = -logp.gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1).double().cpu()
        sums.index_add_(0, bucket, nll)
        counts.index_add_(0, bucket, torch.ones_like(bucket))
    nll = (sums / counts.clamp(min=1)).tolist()
    return {"edges": edges, "nll": nll, "perplexity": [math.exp(v) for v in nll], "tokens": counts.tolist(),
            "chunks": len(chunks)}
