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
