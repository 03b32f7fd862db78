"""Decoding's matrix-vector products in the form inductor compiles best on a CPU.

Decoding one token multiplies one row of activations by every weight matrix of the model once:
its speed is the speed at which the weights stream from memory. PyTorch's eager matrix-vector
kernels fall well short of that on some CPUs: on a 2-core AMD EPYC (Zen 4), 2 threads, MKL's
float32 ``F.linear`` read a 110m model's weights at ~11 GB/s where a copy moves ~30 GB/s
(benchmarks/decode.py). Written as an elementwise product and a sum over the input features, the
same product is one reduction that inductor turns into a vectorised loop over the weight, split
between the threads by output rows, streaming it at 26-34 GB/s, and fused with its neighbours
(the RMSNorm before it, SwiGLU's gate after). The weight is converted element by element inside
that loop, so 16-bit and int8 weights are read at their own width, never widened in memory.

:class:`MatVecMode` makes that rewrite, and writes decoding's attention as loops of the same
kind (:func:`attend`), while ``torch.compile`` traces a decode step
(``generate.compile_decode_step``), for one row or a batch of a few (:data:`MAX_ROWS`); the
model's modules stay plain ``nn.Linear`` and
:class:`~llama2.model.quant.Int8Linear`, and nothing changes in eager mode, where the product
would materialise a weight-sized temporary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

# Int8Linear's CPU kernel (model/quant.py): int8 weight [out, in], one scale per output row.
_INT8_MM = (torch.ops.aten._weight_int8pack_mm, torch.ops.aten._weight_int8pack_mm.default)


# Up to this many rows (a batch of decoding sequences) share one pass over the weight. Measured on
# the AMD EPYC above, 2 threads, a 110m model's float32 products alone, compiled against eager
# F.linear: 2.7x faster at 1 row, 3.2x at 2, 2.7x at 4, 1.6x at 8, ~1.15x at 12-16 (where the
# multiplications, not the memory, set the pace and a matrix kernel's blocking pays).
MAX_ROWS = 8


def few_rows(x: Tensor) -> bool:
    """Whether ``x`` [..., in] holds at most :data:`MAX_ROWS` rows of activations on a CPU."""
    return x.device.type == "cpu" and x.numel() <= MAX_ROWS * x.shape[-1]


def matvec(x: Tensor, weight: Tensor, scales: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight * scales[:, None], bias)`` for a few rows ``x`` [..., in], as products
    and sums over ``in`` accumulated in float32, returned in ``x``'s dtype.

    One sum per row: inductor fuses them into one loop over the weight, which reads each weight
    row once for all of them. (One [out, rows, in] sum instead was fast alone but, inside the
    model, 3.6x slower than eager at 4 rows: 12.9 against 46.8 tokens/s, random 110m.)"""
    rows, w = x.reshape(-1, x.shape[-1]).float(), weight.float()
    if rows.shape[0] == 1:  # (no stack: it would keep the sum from fusing with what follows)
        y = (rows * w).sum(-1).unsqueeze(0)
    else:
        y = torch.stack([(row * w).sum(-1) for row in rows.unbind(0)])
    if scales is not None:
        y = y * scales.float()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)`` for
    a few query positions, as products, sums and a softmax in float32, returned in ``q``'s dtype.

    q [B, H, T, D]; k, v [B, H_kv, S, D] (query head h reads key/value head h // (H / H_kv));
    ``mask`` broadcastable to [B, H, T, S], boolean (True: may attend) or additive. Inside a
    compiled decode step inductor turns it into a few loops over the cache, where SDPA's CPU
    kernel costs far more than its memory traffic: 12 calls over 256 slots in one graph on the AMD
    EPYC above, 172 us per call in float32 and 295 us in bfloat16, against 34 us for these loops
    in bfloat16. (Inductor must not recompute the rotated query for every key: see
    ``generate.compile_options``.)"""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    G = H // H_kv
    qf = q.float().reshape(B, H_kv, G * T, 1, D)  # the query heads of one K/V head side by side
    scores = (qf * k.float().unsqueeze(2)).sum(-1) * (D ** -0.5 if scale is None else scale)  # [B, H_kv, G*T, S]
    if mask is not None:
        m = mask.expand(B, H, T, S).reshape(B, H_kv, G * T, S)
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    p = torch.softmax(scores, dim=-1)
    out = (p.unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2)  # [B, H_kv, G*T, D]
    return out.reshape(B, H, T, D).to(q.dtype)


def _sdpa_arguments(args, kwargs) -> tuple:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    given = dict(zip(names, args)) | kwargs
    return (given["query"], given["key"], given["value"], given.get("attn_mask"), given.get("dropout_p", 0.0),
            given.get("is_causal", False), given.get("scale"))


class MatVecMode(TorchFunctionMode):
    """Within it, every ``F.linear`` and int8 weight-only product of a few rows on a CPU runs as
    :func:`matvec`, and attention of a few query positions as :func:`attend`; every other call,
    and every product of more rows (a prompt, a large batch, where the matrix kernels are
    compute-bound and better), is left as it is. For a traced region."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, mask, dropout, causal, scale = _sdpa_arguments(args, kwargs)
            if q.device.type == "cpu" and q.shape[0] * q.shape[2] <= MAX_ROWS and not dropout and not causal:
                return attend(q, k, v, mask, scale)
        elif func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if few_rows(x) and weight.dim() == 2:
                return matvec(x, weight, bias=bias)
        elif func in _INT8_MM and few_rows(args[0]):
            x, weight, scales = args
            return matvec(x, weight, scales=scales)
        return func(*args, **kwargs)
