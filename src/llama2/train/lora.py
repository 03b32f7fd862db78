"""The ``--lora.*`` settings every training stage shares, and what a stage's trainer does with them.

``--lora.method lora`` freezes the starting model and trains LoRA adapters on ``--lora.targets``
(plus a reward/value model's scalar head); ``qlora`` also stores the frozen linear weights in
4-bit NF4 (torchao). The run's checkpoints hold the adapters and their optimizer only; the
stage's ``model/`` is the adapter in PEFT's format (every ``llama2`` command loads it as base
+ adapter), or, with ``--lora.merge``, a plain model directory (the adapter then goes to
``adapter/``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from llama2.checkpoint import convert, hf, peft
from llama2.model.lora import adapter_state_dict, apply_lora, parse_targets
from llama2.recipe import setting


@dataclass
class LoraConfig:
    """Defaults: the LoRA paper's attention targets (q, v; Hu et al. 2021 §7.1), rank 8, alpha 16
    (torchtune's and PEFT's usual Llama 2 settings), dropout 0.05 (QLoRA's for small models)."""

    method: Literal["full", "lora", "qlora"] = setting(
        "full", "full = train every weight; lora = frozen base + low-rank adapters; qlora = adapters over a "
                "4-bit NF4 base (torchao)")
    rank: int = setting(8, "adapter rank r")
    alpha: float = setting(16.0, "adapter scale: the update is (alpha / r) * B @ A")
    dropout: float = setting(0.05, "dropout on the adapters' input")
    targets: str = setting("q,v", "linear layers to adapt: comma list of q,k,v,o,gate,up,down, or all")
    use_rslora: bool = setting(False, "scale by alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r")
    merge: bool = setting(False, "write model/ as a plain model with the adapter folded in (the adapter "
                                 "then goes to adapter/); off: model/ is the adapter in PEFT's format")

    def __post_init__(self) -> None:
        problems = []
        if self.rank <= 0:
            problems.append(f"lora.rank must be positive, got {self.rank}")
        if self.alpha <= 0:
            problems.append(f"lora.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            problems.append(f"lora.dropout must be in [0, 1), got {self.dropout}")
        try:
            parse_targets(self.targets)
        except ValueError as e:
            problems.append(f"lora.targets: {e}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def enabled(self) -> bool:
        return self.method != "full"


def lora_setting():
    return setting(default_factory=LoraConfig, help="LoRA / QLoRA (off by default: full fine-tuning)")


def refuse_lora(cfg, stage: str) -> None:
    """A stage that cannot train adapters says so instead of ignoring ``--lora.*``."""
    if cfg.lora.enabled:
        raise ValueError(f"lora.method={cfg.lora.method}: {stage} trains every weight from scratch; LoRA is for "
                         "the fine-tuning stages")


def adapt(model: nn.Module, lora: LoraConfig, seed: int, device=None) -> list[str]:
    """Freeze ``model`` and add the adapters ``lora`` asks for (QLoRA: NF4 base); trainable names."""
    return apply_lora(model, parse_targets(lora.targets), lora.rank, lora.alpha, lora.dropout,
                      quantize_base=lora.method == "qlora", seed=seed, device=device, use_rslora=lora.use_rslora)


def trainable_state(model: nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of a model: every weight, or with LoRA the adapters (and a scalar
    head) only: megabytes; the frozen base is the starting model's, read again on resume."""
    return adapter_state_dict(model) if lora else model.state_dict()


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor], lora: bool, file: Path) -> None:
    """Load what :func:`trainable_state` saved; a LoRA checkpoint whose adapters are not this
    run's (other targets or rank, or full weights) is refused in one line naming ``file``."""
    if not lora:
        model.load_state_dict(state)
        return
    want = set(adapter_state_dict(model))
    if set(state) != want:
        extra, missing = sorted(set(state) - want), sorted(want - set(state))
        what = "full weights" if len(state) > 2 * len(want) else "other adapters"
        raise ValueError(f"{file}: holds {what} ({(extra or missing)[0]!r} {'unexpected' if extra else 'missing'}); "
                         "resume with the --lora settings it was written with")
    model.load_state_dict(state, strict=False)


def export_adapter(tensors: dict[str, torch.Tensor], lora: LoraConfig, base: str | Path, out: Path,
                   tokenizer=None, scalar: bool = False, max_len: int = 4096, **config) -> Path:
    """Write a run's result: ``out/model`` the adapter (PEFT's format), or with ``lora.merge``
    ``out/adapter`` the adapter and ``out/model`` base + adapter as a plain model directory
    (streamed, one tensor at a time, from the full-precision base: not the NF4 copy QLoRA trained
    over). ``config`` goes into the model's config.json when loaded (e.g. ``reward_kind``)."""
    acfg = peft.adapter_config(lora.rank, lora.alpha, lora.dropout, lora.targets, str(Path(base).resolve()),
                               "SEQ_CLS" if scalar else "CAUSAL_LM", lora.use_rslora,
                               method=lora.method, **({"config": config} if config else {}))
    adapter_dir = out / ("adapter" if lora.merge else "model")
    peft.save_adapter(adapter_dir, tensors, acfg, tokenizer, max_len)
    if not lora.merge:
        return adapter_dir
    merged = out / "model"
    if merged.exists():
        shutil.rmtree(merged)
    convert(adapter_dir, merged, "hf", verify=False)
    if scalar or config:
        raw = hf.read_config(merged)
        if scalar:
            raw.update(architectures=["LlamaForSequenceClassification"], num_labels=1, pad_token_id=0)
        raw.update(config)
        hf.write_json(merged / "config.json", raw)  # checksums.json covers the weight files only
    return merged
