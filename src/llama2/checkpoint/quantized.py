"""A quantized model directory (``llama2 quantize``): int8 / int4 weights that reload as they are.

The directory is our Hugging Face-style directory (config.json, safetensors shards with an
index and checksums, tokenizer files) in which every linear layer's weight is stored quantized:

- int8: ``<layer>.weight`` int8 [out, in] and ``<layer>.weight_scale`` float32 [out], with
  ``w ≈ weight * weight_scale[:, None]`` (symmetric, per output channel);
- int4: ``<layer>.weight`` uint8 [out, in/2], two 4-bit values per byte (column 2j in the low
  nibble, 2j+1 in the high one), ``<layer>.weight_scale`` and ``<layer>.weight_zero`` bfloat16
  [out, in/group], with ``w ≈ (q - 8) * scale + zero`` per group of ``group_size`` columns.

Embeddings and norms keep their float type. These are exactly the numbers ``--quantize`` computes
when it quantizes a float model on load, so a reloaded directory gives the same logits; the
kernel-specific int4 packing is done on load, for the device the model runs on.

config.json's ``quantization_config`` says how (``{"quant_method": "llama2", "weights": "int4",
"group_size": 64, ...}``). Its ``model_type`` is ``llama2_quantized``, not ``llama``, on purpose:
transformers skips a ``quantization_config`` it does not know (with a warning) and would read
an int8 weight as if it were a float one; with an unknown model type it, vLLM and llama.cpp's
converter each stop with one line instead. To share a quantized model with those tools, export
GGUF (``llama2 convert --dtype q8_0|q4_0``) from the float model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from llama2.model import ModelConfig, Transformer
from llama2.model.quant import (
    Int4Linear,
    Int8Linear,
    int4_check,
    int4_from_bytes,
    int4_quantize,
    int4_to_bytes,
    int8_quantize,
    parse_quantize,
)

from .errors import CheckpointError

MODEL_TYPE = "llama2_quantized"
ARCHITECTURE = "Llama2QuantizedForCausalLM"
METHOD = "llama2"
SCALE, ZERO = ".weight_scale", ".weight_zero"


def quantization(raw: dict) -> dict | None:
    """The ``quantization_config`` of a config.json written by ``llama2 quantize``; None for a
    float model."""
    if raw.get("model_type") != MODEL_TYPE:
        return None
    return raw.get("quantization_config") or {}


def spec_of(qcfg: dict, source: Path | str = "config.json") -> str:
    """``quantization_config`` -> the ``--quantize`` spelling ("int8", "int4:64"), checked."""
    weights, group = qcfg.get("weights"), qcfg.get("group_size")
    spec = "int8" if weights == "int8" and group is None else f"{weights}:{group}"
    try:
        parse_quantize(spec)
    except ValueError:
        raise CheckpointError(f"{source}: quantization_config {qcfg!r} is not one llama2 writes "
                              f"(weights int8, or int4 with group_size 32, 64 or 128)") from None
    if qcfg.get("quant_method") != METHOD:
        raise CheckpointError(f"{source}: quantization_config.quant_method is {qcfg.get('quant_method')!r}, "
                              f"expected {METHOD!r}")
    return spec


def quantization_config(spec: str, dtype: torch.dtype) -> dict:
    kind, group = parse_quantize(spec)
    return {
        "quant_method": METHOD,
        "weights": kind,
        "group_size": group,
        "scheme": ("symmetric per output channel: w = weight * weight_scale[:, None]" if kind == "int8" else
                   "asymmetric per group of group_size input columns: w = (q - 8) * weight_scale + weight_zero; "
                   "weight holds q two per byte, column 2j in the low nibble"),
        "quantized": "every linear layer (attention, feed-forward, output head)",
        "unquantized_dtype": str(dtype).removeprefix("torch."),
    }


def linear_names(cfg: ModelConfig) -> set[str]:
    """Our names of the model's linear layers (those quantized), e.g. ``layers.0.attention.wq``."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def quantize_tensors(tensors: Iterator[tuple[str, torch.Tensor]], cfg: ModelConfig, spec: str,
                     dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, float tensor) -> (our name, stored tensor): each linear weight becomes its
    quantized parts, in order, one tensor at a time; the rest is cast to ``dtype`` (if given)."""
    kind, group = parse_quantize(spec)
    linears = linear_names(cfg)
    for name, t in tensors:
        module = name.removesuffix(".weight")
        if module not in linears:
            yield name, (t.to(dtype) if dtype is not None else t)
            continue
        if kind == "int8":
            q, scales = int8_quantize(t)
            yield name, q
            yield module + SCALE, scales
        else:
            int4_check(module, t.shape[0], t.shape[1], group, "cpu")
            q, sz = int4_quantize(t, group)  # sz: [in/group, out, 2]
            yield name, int4_to_bytes(q)
            yield module + SCALE, sz[..., 0].t().contiguous()
            yield module + ZERO, sz[..., 1].t().contiguous()
        del t


def expected(model: Transformer, spec: str) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """{our name: (shape, dtype or None for any float)} of a quantized directory's tensors."""
    kind, group = parse_quantize(spec)
    out: dict = {}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, t in model.state_dict().items():
        module = name.removesuffix(".weight")
        if module not in linears:
            out[name] = (tuple(t.shape), None)
            continue
        n, k = t.shape
        if kind == "int8":
            out[name] = ((n, k), torch.int8)
            out[module + SCALE] = ((n,), torch.float32)
        else:
            out[name] = ((n, k // 2), torch.uint8)
            out[module + SCALE] = ((n, k // group), torch.bfloat16)
            out[module + ZERO] = ((n, k // group), torch.bfloat16)
    return out


def build_layer(parts: dict[str, torch.Tensor], spec: str, name: str, device) -> nn.Module:
    """The quantized layer for one linear weight's stored parts ({"weight", "weight_scale"[,
    "weight_zero"]}), on ``device``."""
    kind, group = parse_quantize(spec)
    w = parts["weight"].to(device)
    if kind == "int8":
        return Int8Linear(w, parts["weight_scale"].to(device))
    n, k = w.shape[0], w.shape[1] * 2
    int4_check(name, n, k, group, device)
    sz = torch.stack((parts["weight_scale"], parts["weight_zero"]), dim=-1).transpose(0, 1).contiguous()
    return Int4Linear.from_quantized(int4_from_bytes(w), sz.to(device), group)


def check_shapes(cfg: ModelConfig, spec: str) -> None:
    """One line naming the first linear layer the kernels cannot take (before anything is
    written): int4 needs out % 16 == 0 and in % group == 0."""
    kind, group = parse_quantize(spec)
    if kind != "int4":
        return
    with torch.device("meta"):
        model = Transformer(cfg)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            int4_check(name, m.out_features, m.in_features, group, "cpu")
