"""LoRA and QLoRA: low-rank adapters on a frozen Llama, plain modules.

LoRA (Hu et al. 2021) learns ``W + (alpha / r) * B @ A`` for a frozen ``W``: ``A`` is [r, in]
(Kaiming-uniform, as PEFT draws it), ``B`` is [out, r] and starts at zero, so an adapted model
starts exactly equal to its base. QLoRA (Dettmers et al. 2023) stores the frozen ``W`` of every
linear layer in the blocks in 4-bit NormalFloat with double-quantized scales, dequantized to the
activations' dtype for each matmul; the NF4 tensor is torchao's (the one torchtune uses), not
ours.

Parameter names are the base model's plus ``<linear>.lora_A.weight`` / ``.lora_B.weight``, so
``checkpoint.hf.to_hf_name`` turns them into PEFT's names (``model.layers.0.self_attn.q_proj.
lora_A.weight``). Three things a stage does with an adapted model: train it (only adapters and a
scalar head have gradients), switch its adapters off (PPO's reference model, §3.2.3: the same
weights without a second copy), merge them (a plain model again).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Our short target names, the module each adapts inside a block, and transformers' name for it.
TARGETS = {
    "q": ("attention.wq", "q_proj"), "k": ("attention.wk", "k_proj"), "v": ("attention.wv", "v_proj"),
    "o": ("attention.wo", "o_proj"), "gate": ("feed_forward.w1", "gate_proj"),
    "up": ("feed_forward.w3", "up_proj"), "down": ("feed_forward.w2", "down_proj"),
}
HF_TO_TARGET = {hf: short for short, (_, hf) in TARGETS.items()}
NF4_BLOCK = 64            # weights per absmax scale (QLoRA §3: block size 64)
NF4_SCALER_BLOCK = 256    # scales per double-quantization block (QLoRA §3: 256)


def parse_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"q,v"`` / ``"all"`` / ``["q_proj", "v_proj"]`` -> our short names, in block order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() for s in items if s.strip()]
    if items == ["all"]:
        return tuple(TARGETS)
    out = []
    for s in items:
        short = HF_TO_TARGET.get(s, s)
        if short not in TARGETS:
            raise ValueError(f"unknown LoRA target {s!r}; choose from {','.join(TARGETS)} or 'all'")
        out.append(short)
    if not out:
        raise ValueError("LoRA needs at least one target (e.g. q,v or all)")
    return tuple(t for t in TARGETS if t in out)


def _nf4():
    import logging

    # torchao warns at import about its optional CUDA kernels (fp8, CUTLASS) that cannot load on
    # this machine, and torch about how torchao registers an enum; NF4 needs none of it.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        from torchao.quantization import to_nf4
    except ImportError as e:  # pragma: no cover - torchao is a dependency
        raise RuntimeError(f"QLoRA needs torchao's NF4 tensor: pip install torchao ({e})") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return to_nf4


def nf4_scaler_block(numel: int) -> int:
    """The double-quantization block: QLoRA's 256 where it divides the number of scales, else the
    largest power of two that does (small test models). torchao needs it to divide exactly."""
    if numel % NF4_BLOCK:
        raise ValueError(f"a weight of {numel} elements cannot be stored in NF4 (needs a multiple of {NF4_BLOCK})")
    scales = numel // NF4_BLOCK
    size = NF4_SCALER_BLOCK
    while scales % size:
        size //= 2
    return size


def to_nf4(weight: Tensor) -> Tensor:
    """``weight`` in 4-bit NormalFloat with double-quantized scales (torchao's NF4Tensor); it
    dequantizes to the input's dtype inside ``F.linear``."""
    return _nf4()(weight.detach(), NF4_BLOCK, nf4_scaler_block(weight.numel()))


def is_nf4(t: Tensor) -> bool:
    return type(t).__name__ == "NF4Tensor"


def dense(weight: Tensor) -> Tensor:
    """A weight as a plain tensor (an NF4 one dequantized to the dtype it was quantized from)."""
    return weight.get_original_weight() if is_nf4(weight) else weight


class LoRALinear(nn.Module):
    """``y = x W^T + scaling * B(A(dropout(x)))`` with ``W`` frozen (possibly NF4) and no bias.

    ``enabled = False`` gives the base layer's output, bit for bit."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None, use_rslora: bool = False):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRA here adapts bias-free linear layers (Llama has none)")
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        out_features, in_features = base.weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.rank, self.alpha = rank, alpha
        # rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r); PEFT's use_rslora.
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = base.weight.device
        # Adapters train in float32 whatever the base's dtype (bf16 autocast does the matmuls).
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=dev, dtype=torch.float32)
        self.reset_lora(generator)
        self.enabled = True

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        # PEFT's init: A ~ Kaiming-uniform(a=sqrt(5)) (nn.Linear's), B = 0; drawn on the CPU so one
        # seed gives one adapter on any device.
        a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        if not self.enabled:
            return y
        a = self.lora_A.weight
        delta = self.lora_B(self.lora_A(self.dropout(x if torch.is_autocast_enabled() else x.to(a.dtype))))
        return y + (delta * self.scaling).to(y.dtype)

    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` in float32, [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the adapter folded in (in the base weight's dtype)."""
        w = dense(self.weight.detach())
        layer = nn.Linear(self.in_features, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.merged_weight())
        layer.weight.requires_grad_(False)
        return layer

    def merged_weight(self) -> Tensor:
        w = dense(self.weight.detach())
        return (w.float() + self.delta_weight().to(w.device)).to(w.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, " \
               f"nf4={is_nf4(self.weight)}"


def _blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no transformer blocks to adapt")
    return layers


def _get(block: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        block = getattr(block, part)
    return block


def _set(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(block, parent) if parent else block, name, module)


BLOCK_LINEARS = tuple(path for path, _ in TARGETS.values())
TRAINABLE_HEADS = ("score",)  # a reward/value model's scalar head trains with its adapters (PEFT: modules_to_save)


def apply_lora(model: nn.Module, targets: Sequence[str] = ("q", "v"), rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, *, quantize_base: bool = False, seed: int = 0,
               device: torch.device | str | None = None, use_rslora: bool = False) -> list[str]:
    """Freeze ``model`` and put LoRA adapters on ``targets`` of every block, in place; with
    ``quantize_base`` every frozen linear weight of the blocks is stored in NF4 (QLoRA). A
    scalar head (``score``) stays trainable. ``device``: blocks are moved there one at a time
    before they are quantized, so the device never holds the whole full-precision model.
    Returns the names of the trainable parameters."""
    targets = parse_targets(targets)
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for block in _blocks(model):
        if device is not None:
            block.to(device)
        for path in BLOCK_LINEARS:
            linear = _get(block, path)
            if isinstance(linear, LoRALinear):
                raise ValueError("the model already has LoRA adapters; merge them first")
            short = next(s for s, (p, _) in TARGETS.items() if p == path)
            if quantize_base:
                w = nn.Parameter(to_nf4(linear.weight.detach()), requires_grad=False)
                if short not in targets:
                    linear.weight = w  # nn.Linear's F.linear dequantizes an NF4 weight itself
                    continue
            if short in targets:
                lora = LoRALinear(linear, rank, alpha, dropout, generator=gen, use_rslora=use_rslora)
                if quantize_base:
                    lora.weight = w
                _set(block, path, lora)
    if device is not None:
        model.to(device)
    for name in TRAINABLE_HEADS:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            head.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def quantize_nf4(model: nn.Module) -> nn.Module:
    """Freeze ``model`` and store every linear weight of its blocks in NF4, in place: a frozen
    scorer (PPO's reward models) at about a quarter of its bf16 memory."""
    model.requires_grad_(False)
    for block in _blocks(model):
        for path in BLOCK_LINEARS:
            linear = _get(block, path)
            if isinstance(linear, LoRALinear):
                raise ValueError("merge the model's LoRA adapters before quantizing it")
            if not is_nf4(linear.weight):
                linear.weight = nn.Parameter(to_nf4(linear.weight.detach()), requires_grad=False)
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_layers(model))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model inside the block: PPO's frozen reference (§3.2.3) is the policy with its
    adapters off, one copy of the weights instead of two."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.enabled = was


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (NF4 weights are dequantized), in place: a plain model."""
    for block in _blocks(model):
        for path in BLOCK_LINEARS:
            m = _get(block, path)
            if isinstance(m, LoRALinear):
                _set(block, path, m.merged())
            elif is_nf4(m.weight):
                m.weight = nn.Parameter(dense(m.weight.detach()), requires_grad=False)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What a LoRA run trains and saves: the adapters (and a scalar head), by parameter name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def lora_summary(model: nn.Module) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "fraction": trainable / max(1, total)}


# -- several adapters over one base, chosen per row (the server) --------------------------------

class MultiLoRALinear(nn.Module):
    """A frozen linear layer with N adapters stacked; ``rows`` (set by :func:`select_adapters`)
    gives each batch row its adapter, 0 = the base alone. Ranks may differ: smaller adapters are
    padded with zeros, which adds exactly nothing. Scaling is folded into ``B``."""

    def __init__(self, weight: Tensor, a: Tensor, b: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("A", a, persistent=False)   # [N + 1, r, in], row 0 zeros
        self.register_buffer("B", b, persistent=False)   # [N + 1, out, r], scaled
        self.rows: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        if self.rows is None:
            return y
        a, b = self.A[self.rows].to(x.dtype), self.B[self.rows].to(x.dtype)
        xa = torch.einsum("bti,bri->btr", x, a)
        return y + torch.einsum("btr,bor->bto", xa, b)


def stack_adapters(model: nn.Module, adapters: Sequence[dict[str, tuple[Tensor, Tensor, float]]]) -> None:
    """Put ``adapters`` (each ``{linear name: (A, B, scaling)}``, e.g. from
    ``checkpoint.peft.read_adapter``) over ``model``'s frozen weights, in place; adapter i is
    selected with ``rows == i + 1``. Layers no adapter touches stay plain ``nn.Linear``."""
    names = sorted({n for ad in adapters for n in ad})
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, attr)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"adapter targets {name!r}, which is not a plain linear layer of the model")
        out_f, in_f = base.weight.shape
        rank = max(ad[name][0].shape[0] for ad in adapters if name in ad)
        dev, dt = base.weight.device, base.weight.dtype
        a = torch.zeros(len(adapters) + 1, rank, in_f, device=dev, dtype=dt)
        b = torch.zeros(len(adapters) + 1, out_f, rank, device=dev, dtype=dt)
        for i, ad in enumerate(adapters, start=1):
            if name in ad:
                A, B, scaling = ad[name]
                if A.shape[1] != in_f or B.shape[0] != out_f:
                    raise ValueError(f"adapter {i} for {name!r}: shapes {tuple(B.shape)} @ {tuple(A.shape)} do not "
                                     f"fit the layer's {(out_f, in_f)}")
                a[i, : A.shape[0]] = A.to(dev, dt)
                b[i, :, : B.shape[1]] = (B.float() * scaling).to(dev, dt)
        setattr(parent, attr, MultiLoRALinear(base.weight.detach(), a, b))


def select_adapters(model: nn.Module, rows: Tensor | None) -> None:
    """Give each row of the next forward passes its adapter (0 = none); ``None`` = base for all."""
    for m in model.modules():
        if isinstance(m, MultiLoRALinear):
            m.rows = rows
