"""Quantized inference: int8 and int4 linear layers on PyTorch's packed kernels (weight-only),
and int8 weights with int8 activations on fbgemm's (``w8a8``, CPU; :class:`Int8Linear`).

``quantize_model(model, "int8")`` swaps every ``nn.Linear`` (attention wq/wk/wv/wo, feed-forward
w1/w2/w3 and the output head; embeddings and norms stay) for an :class:`Int8Linear`: one int8
weight per element and one float scale per output channel, symmetric (``w ≈ q * scale``, as
gpt-fast). ``"int4"`` / ``"int4:GROUP"`` gives :class:`Int4Linear`: 4-bit weights with a scale
and a zero per group of GROUP input columns (32, 64 or 128; default 128), asymmetric, in the
tinygemm convention ``w ≈ (q - 8) * scale + zero`` (gpt-fast's ``WeightOnlyInt4Linear``).

The matmuls are PyTorch's own kernels, not ours: ``aten._weight_int8pack_mm`` and
``aten._weight_int4pack_mm_for_cpu`` on CPU. The CUDA paths (``F.linear`` on the int8 weight cast
to the activations' dtype, as gpt-fast; ``aten._weight_int4pack_mm`` for int4) follow the ops'
documented signatures but are untested here (no GPU). The packed int4 weight is an opaque,
device-specific layout: a quantized model is saved (``llama2 quantize``, checkpoint/quantized.py)
as the plain 4-bit values two per byte plus the scales and zeros, and packed for the kernel of
the device it is loaded on (:meth:`Int4Linear.from_quantized`).
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INT4_GROUPS = (32, 64, 128)
INT4_DEFAULT_GROUP = 128
INT4_INNER_K_TILES = 8  # gpt-fast's and torchao's choice (CUDA); the CPU op ignores it


def parse_quantize(spec: str) -> tuple[str, int | None]:
    """``"int8"`` -> ("int8", None); ``"w8a8"`` -> ("w8a8", None); ``"int4"`` -> ("int4", 128);
    ``"int4:64"`` -> ("int4", 64)."""
    kind, _, group = spec.strip().lower().partition(":")
    if kind in ("int8", "w8a8") and not group:
        return kind, None
    if kind == "int4":
        if not group:
            return "int4", INT4_DEFAULT_GROUP
        if group.isdigit() and int(group) in INT4_GROUPS:
            return "int4", int(group)
        raise ValueError(f"--quantize {spec!r}: the int4 group size must be one of "
                         f"{', '.join(map(str, INT4_GROUPS))} (e.g. int4:{INT4_DEFAULT_GROUP})")
    raise ValueError(f"--quantize {spec!r}: expected int8, w8a8, int4 or int4:GROUP (GROUP = "
                     f"{', '.join(map(str, INT4_GROUPS))})")


# -- int8, per output channel, symmetric --------------------------------------------------------
def int8_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """[N, K] float -> (int8 [N, K], float32 scales [N]) with ``w ≈ q * scales[:, None]``."""
    w = w.detach().float()
    scales = (w.amax(dim=1).maximum(-w.amin(dim=1)) / 127).clamp(min=1e-10)
    # in place: one float temporary, not four (a 70B feed-forward weight is ~1 GB in float32)
    q = (w / scales[:, None]).round_().clamp_(-128, 127).to(torch.int8)
    return q, scales


@functools.cache
def cpu_has_vnni() -> bool:
    """Whether this x86 CPU multiplies int8 with 32-bit accumulation (AVX-512 VNNI / AVX-VNNI):
    without it fbgemm's int8 kernels saturate 16-bit sums, and need 7-bit activations."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# fbgemm's prepacked weight is an opaque TorchScript object that torch.compile cannot trace, so
# the w8a8 product is an op of our own that names its layer by a number: a compiled decode step
# calls it as one opaque kernel and compiles everything around it (norms, RoPE, attention).
# Defined with torch.library's low-level API rather than @custom_op, whose Python wrapper costs
# ~10 us a call (85 calls per token of the 110m; this way ~3 us).
_W8A8_LAYERS: dict[int, weakref.ref] = {}
_w8a8_keys = itertools.count()
_lib = torch.library.Library("llama2", "DEF")
_lib.define("w8a8_linear(Tensor x, int layer, int out_features) -> Tensor")


def _w8a8_linear(x: Tensor, layer: int, out_features: int) -> Tensor:
    """``x`` [rows, in] float32 times the int8 weight of the :class:`Int8Linear` registered as
    ``layer``, with ``x`` quantized to int8 per tensor (fbgemm's dynamic quantized linear)."""
    return _W8A8_LAYERS[layer]()._w8a8_product(x)


_lib.impl("w8a8_linear", _w8a8_linear, "CPU")


@torch.library.register_fake("llama2::w8a8_linear", lib=_lib)
def _(x: Tensor, layer: int, out_features: int) -> Tensor:
    return x.new_empty(x.shape[0], out_features)


class Int8Linear(nn.Module):
    """A bias-free linear layer with an int8 weight [out, in] and float32 scales [out].

    ``dynamic_activations`` (``--quantize w8a8``, CPU): the activations are quantized to int8 as
    well, per tensor at run time, and the product is fbgemm's int8 GEMM (what
    ``torch.ao``'s dynamic quantized Linear runs) — as llama.cpp's q8_0 does, which quantizes
    activations to 8 bits for its dot products. Several times faster than the weight-only
    kernel on CPUs with VNNI, at the cost of the activations' rounding."""

    def __init__(self, weight: Tensor, scales: Tensor, dynamic_activations: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        # The CPU kernel's scales, in its activations' dtype: a buffer rather than a cast in
        # forward, which torch.compile's lowering of the kernel cannot take as an input.
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16), persistent=False)
        if dynamic_activations and weight.device.type != "cpu":
            raise ValueError(f"--quantize w8a8 runs on the CPU only (fbgemm's int8 kernels), not on "
                             f"{weight.device.type}; use int8 there")
        self.dynamic_activations = dynamic_activations
        self._packed = None  # fbgemm's prepacked weight, built on first use (not saved)
        if dynamic_activations:
            self._register()

    def _register(self) -> None:
        """Give this layer its own number for the ``llama2::w8a8_linear`` op (a copy gets a new one)."""
        self._layer = next(_w8a8_keys)
        _W8A8_LAYERS[self._layer] = weakref.ref(self)
        weakref.finalize(self, _W8A8_LAYERS.pop, self._layer, None)

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy and pickle
        super().__setstate__(state)
        if self.dynamic_activations:
            self._register()

    @classmethod
    def from_linear(cls, linear: nn.Linear, dynamic_activations: bool = False) -> Int8Linear:
        return cls(*int8_quantize(linear.weight), dynamic_activations=dynamic_activations)

    def dequantize(self) -> Tensor:
        return self.weight.float() * self.scales[:, None]

    def _w8a8_product(self, x2: Tensor) -> Tensor:
        if self._packed is None:
            zeros = torch.zeros(self.out_features, dtype=torch.long)
            # PyTorch marks its quantized tensors deprecated (in favour of torchao, whose CPU int8
            # matmul, torch._int_mm, is ~2.5x slower at one token); they work in the torch this
            # project pins, and only the packing touches them.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                qw = torch._make_per_channel_quantized_tensor(self.weight, self.scales.double(), zeros, 0)
                self._packed = torch.ops.quantized.linear_prepack(qw, None)
        return torch.ops.quantized.linear_dynamic(x2, self._packed, not cpu_has_vnni())

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.dynamic_activations:
            y = torch.ops.llama2.w8a8_linear(x2.float().contiguous(), self._layer, self.out_features)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if x.device.type == "cpu":
            # The CPU kernel is fast only with bfloat16 activations. Measured on a Xeon with
            # AVX-512 bf16/AMX, 1 thread, one token through 110m's w1 (768 -> 2048): float32
            # F.linear 273 us; the int8 op on float32 input 1215 us (4.5x slower), on bfloat16
            # input 107 us (133 us with the casts). (4096x4096: 2.8-5.6 ms, 14-18 ms, 1.1-1.3 ms.)
            # So cast in and out; the scales must have the input's dtype.
            scales = self.scales_bf16.to(torch.bfloat16)  # (a no-op unless a .to(dtype) moved it)
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, scales).to(x.dtype)
        else:  # CUDA etc. (untested here): gpt-fast's form, fused by torch.compile
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = "int8 weights and activations" if self.dynamic_activations else "int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


# -- int4, group-wise, asymmetric (gpt-fast / tinygemm) ------------------------------------------
def int4_quantize(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """[N, K] float -> (int32 [N, K] in 0..15, bfloat16 scales_and_zeros [K/group, N, 2]).

    Per group: ``scale = (max - min) / 15`` and ``zero = min + 8 * scale`` (the value at q = 8),
    both rounded to bfloat16 first, then ``q = round((w - (zero - 8 * scale)) / scale)``."""
    N, K = w.shape
    t = w.detach().float().reshape(-1, group_size)
    mx, mn = t.amax(dim=1, keepdim=True), t.amin(dim=1, keepdim=True)
    scales = ((mx - mn).clamp(min=1e-6) / 15).to(torch.bfloat16)
    zeros = (mn + scales.float() * 8).to(torch.bfloat16)
    low = zeros.float() - scales.float() * 8
    q = t.sub(low).div_(scales.float()).round_().clamp_(0, 15).to(torch.int32).reshape(N, K)
    sz = torch.stack((scales.reshape(N, -1), zeros.reshape(N, -1)), dim=-1)  # [N, K/group, 2]
    return q, sz.transpose(0, 1).contiguous()


def int4_dequantize(q: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """The float32 weight [N, K] that ``int4_quantize``'s output stands for."""
    N, K = q.shape
    sz = scales_and_zeros.float().transpose(0, 1).reshape(-1, 2)  # [N * K/group, 2]
    t = (q.reshape(-1, group_size).float() - 8) * sz[:, :1] + sz[:, 1:]
    return t.reshape(N, K)


def int4_to_bytes(q: Tensor) -> Tensor:
    """int 0..15 [N, K] -> uint8 [N, K/2], two per byte: column 2j in the low nibble, 2j+1 in the
    high one. A portable form for files; the kernels' packed layouts are per device."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def int4_from_bytes(b: Tensor) -> Tensor:
    """``int4_to_bytes``'s inverse: uint8 [N, K/2] -> int32 [N, K] in 0..15."""
    q = torch.stack((b & 15, b >> 4), dim=-1)  # [N, K/2, 2]: low nibble first
    return q.reshape(b.shape[0], -1).to(torch.int32)


def int4_check(name: str, out_features: int, in_features: int, group_size: int, device) -> None:
    """A one-line ValueError if the kernels cannot take an [out, in] weight."""
    need = [(out_features % 16 == 0, "out_features divisible by 16"),
            (in_features % group_size == 0, f"in_features divisible by the group size {group_size}")]
    if torch.device(device).type == "cuda":
        tile = INT4_INNER_K_TILES * 16
        need.append((in_features % tile == 0, f"in_features divisible by {tile} on CUDA"))
    for ok, what in need:
        if not ok:
            raise ValueError(f"cannot quantize {name} [{out_features}, {in_features}] to int4: needs {what} "
                             "(use int8, or another int4 group size)")


class Int4Linear(nn.Module):
    """A bias-free linear layer with a packed 4-bit weight and bfloat16 scales/zeros per group."""

    def __init__(self, packed: Tensor, scales_and_zeros: Tensor, in_features: int, out_features: int,
                 group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_DEFAULT_GROUP, name: str = "linear") -> Int4Linear:
        w = linear.weight
        N, K = w.shape
        int4_check(name, N, K, group_size, w.device)
        q, sz = int4_quantize(w, group_size)
        return cls.from_quantized(q, sz, group_size)

    @classmethod
    def from_quantized(cls, q: Tensor, scales_and_zeros: Tensor, group_size: int) -> Int4Linear:
        """From ``int4_quantize``'s output (on the device the layer will run on): packed here,
        since the packed layout belongs to one device's kernel."""
        N, K = q.shape
        if q.device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), INT4_INNER_K_TILES)
        else:  # CUDA (untested here): two per byte, high nibble first
            q8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(q8, INT4_INNER_K_TILES)
        return cls(packed, scales_and_zeros.to(device=q.device, dtype=torch.bfloat16), K, N, group_size)

    def forward(self, x: Tensor) -> Tensor:
        # Both kernels take bfloat16 activations. On CPU float32 ones work but run ~15x slower
        # than float32 F.linear (4096x4096, 1 thread: 42 ms vs 2.8-5.6 ms); bfloat16 ones 1.1 ms,
        # and 117 us with the casts for 110m's w1 (768 -> 2048), against 273 us for F.linear.
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        else:  # CUDA (untested here)
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group_size, self.scales_and_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4, "
                f"group_size={self.group_size}")


# -- whole models ---------------------------------------------------------------------------------
def quantize_model(model: nn.Module, spec: str) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` in place (``spec``: "int8", "w8a8", "int4", "int4:GROUP").

    Every layer's shape is checked before any is replaced, so an unsupported model is left as it
    was. Layers are quantized one at a time and each float weight is dropped as soon as its
    quantized copy exists, so the peak memory is the float model plus one layer."""
    kind, group = parse_quantize(spec)
    if any("LoRA" in type(m).__name__ for m in model.modules()):
        raise ValueError("cannot quantize a model with LoRA adapters stacked on it; merge them first")
    names = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if m.bias is not None:
            raise ValueError(f"cannot quantize {name}: it has a bias (Llama's linear layers have none)")
        if kind == "int4":
            int4_check(name, m.out_features, m.in_features, group, m.weight.device)
        names.append(name)
    for name in names:  # by name, so no list keeps the float layers alive
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        if kind == "int4":
            new = Int4Linear.from_linear(linear, group, name)
        else:
            new = Int8Linear.from_linear(linear, dynamic_activations=kind == "w8a8")
        setattr(parent, attr, new)  # the float weight goes with the last reference to it
        del linear
    return model


def quantized_linear(weight: Tensor, spec: str, name: str = "linear") -> nn.Module:
    """One float weight [out, in] (on the device it will run on) -> its quantized layer: what
    ``checkpoint.load_model(..., quantize=spec)`` builds tensor by tensor as it streams a
    checkpoint, so the float model never exists whole."""
    kind, group = parse_quantize(spec)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if kind in ("int8", "w8a8"):
        return Int8Linear.from_linear(linear, dynamic_activations=kind == "w8a8")
    int4_check(name, weight.shape[0], weight.shape[1], group, weight.device)
    return Int4Linear.from_linear(linear, group, name)
