"""ggml's k-quant reference quantizers (Q6_K and Q4_K) in numpy, byte for byte.

The ``gguf`` package can dequantize the k-quants but not quantize them, so this module is our
own port of llama.cpp's ``quantize_row_q6_K_ref`` and ``quantize_row_q4_K_ref``
(ggml/src/ggml-quants.c, MIT licence), which are what ``llama-quantize`` runs for these types
when it has no importance matrix. Same interface as ``gguf.quants.quantize``: a float32 array
``[..., K]`` (K a multiple of the 256-value super-block, ``QK_K``) in, ``uint8 [..., K // 256 *
bytes_per_block]`` out.

Every step is vectorized over all the (sub-)blocks of the array at once; the only Python loops
are over the positions within a sub-block (16 or 32) and over the C code's trial scales, so a
4096x4096 matrix takes about 3 s as Q6_K and 6 s as Q4_K on one core (C: about 1 and 2 s). To give the same bytes as C, the float32
arithmetic is done in C's order (sums accumulated position by position, never pairwise;
``a*b*c`` as ``(a*b)*c``), and:

* ``nearest_int`` (adding 12582912 = 1.5 * 2**23 and reading the mantissa) rounds half to
  even for |x| < 2**22, which is ``np.rint`` on float32; where the value is not bounded by
  construction (the final ``x/d``) the bit trick itself is reproduced, since a release build
  (NDEBUG: no assert) uses its wrapped result for a huge x beside a tiny sub-block scale;
* ``GGML_FP32_TO_FP16`` rounds to nearest even, which is numpy's ``astype(float16)``;
* an abs-max search written ``if (ax > amax)`` keeps the first of equal values, which is
  ``argmax``.

The arrays are laid out position-major (``[position, sub-block]``) so that each step of those
sums runs over contiguous memory, and the work is done a chunk of super-blocks at a time so the
temporaries stay small. Non-finite input is refused (C's ``nearest_int`` is undefined there).
The result matches C compiled without FMA contraction: the x86-64 default, and how llama.cpp's
CMake build compiles ggml-quants.c (it is in ggml-base, which gets no ``-march=native`` even
with GGML_NATIVE). Compiled with ``-march=native`` on an FMA machine, GCC fuses multiply-adds
in these loops and changes a few blocks (about 0.4% of Q6_K and 5.6% of Q4_K super-blocks of
random weights).
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # super-block size (ggml-common.h)
Q6_K_BYTES = 210  # block_q6_K: ql[128], qh[64], int8 scales[16], fp16 d
Q4_K_BYTES = 144  # block_q4_K: fp16 d, fp16 dmin, scales[12] (6-bit scales and mins), qs[128]

_GROUP_MAX_EPS = np.float32(1e-15)  # ggml-quants.c GROUP_MAX_EPS: below it a group counts as zero
_CHUNK = 4096  # super-blocks per chunk (1M values)
_F = np.float32


def _check(arr: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(arr, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % QK_K:
        raise ValueError(f"k-quant rows must be a multiple of {QK_K} values, got shape {x.shape}")
    return x


def _fp16_round(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML_FP32_TO_FP16 (round to nearest even) and GGML_FP16_TO_FP32 of the result."""
    h = v.astype(np.float16)
    return h, h.astype(np.float32)


def _nearest_int_exact(v: np.ndarray) -> np.ndarray:
    """nearest_int bit for bit, also past |x| = 2**22 where its assert is compiled out (release
    builds): the low 23 mantissa bits of ``v + 12582912.f``, less 2**22. As float32."""
    bits = (v + _F(12582912)).view(np.int32)
    return ((bits & 0x007FFFFF) - 0x00400000).astype(np.float32)


def _seq_sum(terms: np.ndarray) -> np.ndarray:
    """``s = 0; for i: s += terms[i]`` in float32, over the leading (position) axis."""
    s = np.zeros(terms.shape[1:], np.float32)
    for t in terms:
        s += t
    return s


def _make_qx_quants_q6(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n=16, nmax=32, rmse_type=1, qw=NULL) for every sub-block at once.

    ``x``: float32 [16, m] (position-major). Returns (scale [m], L [16, m] as float32 0..63)."""
    nmax = _F(32)
    ax = np.abs(x)
    first = ax.argmax(0)  # the first position with the largest |x| (C: `if (ax > amax)`)
    amax = np.take_along_axis(ax, first[None], 0)[0]
    vmax = np.take_along_axis(x, first[None], 0)[0]  # C's `max`: that value, with its sign
    zero = amax < _GROUP_MAX_EPS  # "all zero": L = 0, scale 0
    vmax = np.where(zero, _F(1), vmax)  # (any nonzero divisor; those results are discarded)

    w = x * x  # rmse_type 1: weight x[i]*x[i]
    wx = w * x  # C's `w*x[i]*l` is (w*x[i])*l

    def trial(iscale):
        lv = np.clip(np.rint(iscale * x), -nmax, nmax - 1)  # nearest_int, then MAX(-nmax, MIN(nmax-1, l))
        return lv, _seq_sum(wx * lv), _seq_sum((w * lv) * lv)  # sumlx, suml2

    # first pass: iscale = -nmax/max
    lv, sumlx, suml2 = trial(-nmax / vmax)
    L = lv + nmax
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, _F(1)), _F(0))  # suml2 ? sumlx/suml2 : 0
    best = scale * sumlx
    # the `is` loop: iscale = -(nmax + 0.1f*is)/max for is = -9..9 except 0; a trial replaces the
    # current one when suml2 > 0 and sumlx^2 > best*suml2
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, sumlx, suml2 = trial(-(nmax + _F(0.1) * _F(step)) / vmax)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        if better.any():
            L = np.where(better, lv + nmax, L)
            new_scale = sumlx / np.where(better, suml2, _F(1))
            scale = np.where(better, new_scale, scale)
            best = np.where(better, new_scale * sumlx, best)
    scale = np.where(zero, _F(0), scale)
    L = np.where(zero, _F(0), L)
    return scale, L


def _q6_k_chunk(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref over [nb, 256] float32 -> [nb, 210] uint8."""
    nb = x.shape[0]
    # sub-blocks of 16, position-major: xs[p, b, s] = x[b, 16*s + p]
    xs = np.ascontiguousarray(x.reshape(nb, 16, 16).transpose(2, 0, 1)).reshape(16, nb * 16)
    scales, L = _make_qx_quants_q6(xs)
    scales = scales.reshape(nb, 16)

    # the largest |scale| of the super-block, with its sign (first of equals)
    first = np.abs(scales).argmax(1)
    max_scale = np.take_along_axis(scales, first[:, None], 1)[:, 0]
    zero = np.abs(max_scale) < _GROUP_MAX_EPS  # whole block written as zeros (d = 0 too)
    max_scale = np.where(zero, _F(1), max_scale)

    # iscale = -128/max_scale; d = fp16(1/iscale); scales[ib] = MIN(127, nearest_int(iscale*scale)).
    # The sign flip makes the largest scale -128, which fits int8 where +128 would not.
    iscale = _F(-128) / max_scale
    d16, d = _fp16_round(_F(1) / iscale)
    sc = np.minimum(np.rint(iscale[:, None] * scales), 127).astype(np.int32).astype(np.int8)

    # requantize with the stored scale: l = nearest_int(x/d) clamped to [-32, 31], L = l + 32;
    # a sub-block whose d*scale is 0 keeps make_qx_quants's L (C's `if (!d) continue`)
    dsub = (d[:, None] * sc.astype(np.float32)).reshape(nb * 16)  # [b*16 + s]
    ok = dsub != 0
    q = np.clip(_nearest_int_exact(xs / np.where(ok, dsub, _F(1))), -32, 31) + _F(32)
    L = np.where(ok, q, L).astype(np.uint8)  # [16, nb*16]: L[p, b*16 + s] = value 16*s + p

    Lb = L.reshape(16, nb, 16).transpose(1, 2, 0).reshape(nb, 2, 4, 32)  # [b, half, quarter, l]: 128h + 32k + l
    ql = np.empty((nb, 2, 2, 32), np.uint8)  # per 128 values: ql[l] = q1 | q3 << 4, ql[l+32] = q2 | q4 << 4
    ql[:, :, 0] = (Lb[:, :, 0] & 0xF) | ((Lb[:, :, 2] & 0xF) << 4)
    ql[:, :, 1] = (Lb[:, :, 1] & 0xF) | ((Lb[:, :, 3] & 0xF) << 4)
    qh = (Lb[:, :, 0] >> 4) | ((Lb[:, :, 1] >> 4) << 2) | ((Lb[:, :, 2] >> 4) << 4) | ((Lb[:, :, 3] >> 4) << 6)

    out = np.empty((nb, Q6_K_BYTES), np.uint8)
    out[:, :128] = ql.reshape(nb, 128)
    out[:, 128:192] = qh.reshape(nb, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d16.astype("<f2").reshape(nb, 1).view(np.uint8)
    out[zero] = 0  # memset(&y[i], 0, ...) and d = fp16(0)
    return out


def _make_qkx2_quants_q4(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants(n=32, nmax=15, weights, rmin=-1, rdelta=0.1, nstep=20, use_mad=false)
    for every sub-block at once. ``x``, ``w``: float32 [32, m] (position-major).
    Returns (scale [m], the_min [m], L [32, m] as float32 0..15)."""
    nmax = _F(15)
    vmin = np.minimum(x.min(0), _F(0))  # `if (min > 0) min = 0`
    vmax = x.max(0)
    # sum_w = w[0]; sum_x = w[0]*x[0]; then += over i = 1..31
    sum_w = w[0].copy()
    sum_x = w[0] * x[0]
    for i in range(1, x.shape[0]):
        sum_w += w[i]
        sum_x += w[i] * x[i]
    flat = vmax == vmin  # L = 0, the_min = -min, scale 0
    rng = np.where(flat, _F(1), vmax - vmin)
    xm = x - vmin  # x[i] - min

    iscale = nmax / rng
    scale = _F(1) / iscale
    L = np.clip(np.rint(iscale * xm), 0, nmax)
    diff = (scale * L + vmin) - x
    best_error = _seq_sum(w * (diff * diff))
    vmin0 = vmin
    for step in range(21):  # is = 0..nstep
        # C's `min` is the best min so far (it changes when a trial wins), in both of these:
        # iscale = (rmin + rdelta*is + nmax)/(max - min), l = nearest_int(iscale*(x[i] - min))
        iscale = (_F(-1) + _F(0.1) * _F(step) + nmax) / np.where(flat, _F(1), vmax - vmin)
        laux = np.clip(_nearest_int_exact(iscale * (x - vmin)), 0, nmax)
        wl = w * laux
        sum_l = _seq_sum(wl)
        sum_l2 = _seq_sum(wl * laux)  # w*l*l
        sum_xl = _seq_sum(wl * x)  # w*l*x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        pos = D > 0
        Dd = np.where(pos, D, _F(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Dd
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Dd
        clamp = this_min > 0  # then min 0 and scale = sum_xl/sum_l2
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        this_min = np.where(clamp, _F(0), this_min)
        diff = (this_scale * laux + this_min) - x
        cur_error = _seq_sum(w * (diff * diff))
        better = pos & (cur_error < best_error)
        if better.any():
            L = np.where(better, laux, L)
            best_error = np.where(better, cur_error, best_error)
            scale = np.where(better, this_scale, scale)
            vmin = np.where(better, this_min, vmin)
    scale = np.where(flat, _F(0), scale)
    L = np.where(flat, _F(0), L)
    vmin = np.where(flat, vmin0, vmin)
    return scale, -vmin, L


def _q4_k_chunk(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref over [nb, 256] float32 -> [nb, 144] uint8."""
    nb = x.shape[0]
    # sub-blocks of 32, position-major: xs[p, b*8 + j] = x[b, 32*j + p]
    xs = np.ascontiguousarray(x.reshape(nb, 8, 32).transpose(2, 0, 1)).reshape(32, nb * 8)
    # weights[l] = av_x + |x|, av_x = sqrtf(sum_x2/32), sum_x2 accumulated in order
    av_x = np.sqrt(_seq_sum(xs * xs) / _F(32))
    w = av_x + np.abs(xs)
    scales, mins, L = _make_qkx2_quants_q4(xs, w)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)

    # max_scale / max_min start at 0 and take any larger value
    max_scale = np.maximum(scales.max(1), _F(0))
    max_min = np.maximum(mins.max(1), _F(0))
    inv_scale = np.where(max_scale > 0, _F(63) / max_scale, _F(0))
    inv_min = np.where(max_min > 0, _F(63) / max_min, _F(0))
    # ls = (uint8) nearest_int(inv_scale*scale), then MIN(63, ls); the same for the mins
    ls = np.minimum(np.rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    # the 12-byte scales field: j < 4 -> scales[j] = ls, scales[j+4] = lm; j >= 4 -> low nibbles in
    # scales[j+4], the top 2 bits of ls in scales[j-4] and of lm in scales[j] (bits 6-7)
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    d16, d = _fp16_round(max_scale / _F(63))
    dmin16, dmin = _fp16_round(max_min / _F(63))

    # requantize: d = fp16(d)*sc, dm = fp16(dmin)*m; l = nearest_int((x + dm)/d) in [0, 15];
    # a sub-block with d == 0 keeps make_qkx2_quants's L
    dsub = (d[:, None] * ls.astype(np.float32)).reshape(nb * 8)
    dmsub = (dmin[:, None] * lm.astype(np.float32)).reshape(nb * 8)
    ok = dsub != 0
    q = np.clip(_nearest_int_exact((xs + dmsub) / np.where(ok, dsub, _F(1))), 0, 15)
    L = np.where(ok, q, L).astype(np.uint8)  # [32, nb*8]: L[p, b*8 + j] = value 32*j + p

    Lb = L.reshape(32, nb, 4, 2).transpose(1, 2, 3, 0)  # [b, 64-chunk, half, l]
    qs = Lb[:, :, 0] | (Lb[:, :, 1] << 4)  # q[l] = L[j+l] | L[j+l+32] << 4 per 64 values

    out = np.empty((nb, Q4_K_BYTES), np.uint8)
    out[:, 0:2] = d16.astype("<f2").reshape(nb, 1).view(np.uint8)
    out[:, 2:4] = dmin16.astype("<f2").reshape(nb, 1).view(np.uint8)
    out[:, 4:16] = packed
    out[:, 16:] = qs.reshape(nb, 128)
    return out


def _quantize(arr: np.ndarray, chunk_fn, nbytes: int) -> np.ndarray:
    x = _check(arr)
    blocks = x.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], nbytes), np.uint8)
    # IEEE inf/NaN in discarded lanes (a zero group's division, fp16 overflow of a huge scale)
    # are expected, as in C: no warnings
    with np.errstate(all="ignore"):
        for start in range(0, blocks.shape[0], _CHUNK):
            chunk = blocks[start:start + _CHUNK]
            if not np.isfinite(chunk).all():
                raise ValueError("cannot k-quantize non-finite values")
            out[start:start + _CHUNK] = chunk_fn(chunk)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * nbytes)


def quantize_q6_k(arr: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q6_K_ref on each row: float32 [..., K] -> uint8 [..., K//256*210]."""
    return _quantize(arr, _q6_k_chunk, Q6_K_BYTES)


def quantize_q4_k(arr: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q4_K_ref on each row: float32 [..., K] -> uint8 [..., K//256*144]."""
    return _quantize(arr, _q4_k_chunk, Q4_K_BYTES)
