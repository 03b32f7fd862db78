"""The one training loop of every gradient-descent stage: pretraining, SFT and the stages built
on it (GAtt, rejection sampling, distillation, the guard), the reward models. PPO runs its own
loop (rollout, score, update) on this module's optimizer and on train/state.py's checkpoints.

A stage hands the :class:`Trainer` a model, a ``loss_fn(model, batch) -> (loss, metrics)``, a
batch iterator with ``state_dict()``/``load_state_dict()`` and a :class:`TrainConfig`; the
trainer owns everything else. One optimizer step is::

    lr = schedule(step)                                  # cosine with warmup (§2.2)
    for each of grad_accum micro-batches:                # reach the global batch
        loss = loss_fn(model, batch) / grad_accum        # bf16 autocast on GPU, fp32 on CPU
        loss.backward()                                  # gradients sync on the last one only
    clip_grad_norm_(params, 1.0); optimizer.step()       # AdamW 0.9/0.95, eps 1e-5, wd 0.1

around which it logs ``metrics.jsonl`` and a progress bar, evaluates every ``eval_every``
steps and writes atomic checkpoints (train/state.py) every ``save_every`` steps. The defaults are the paper's
pretraining values (Touvron et al. 2023, §2.2); stages override them in their own
config dataclasses (which subclass :class:`TrainConfig`).

Distributed: launch with ``torchrun``; ``init_distributed`` reads its environment. FSDP2
(``fully_shard``, one unit per transformer block) is the default on GPUs; DDP elsewhere.
Checkpoints of FSDP runs go through ``torch.distributed.checkpoint`` (each rank writes its
shards); DDP and single-process runs are saved by rank 0 with ``torch.save`` (every rank holds
the full state, so there is nothing to gather).

Exact resume: the checkpoint holds the weights, the optimizer moments, the step (the schedule
is a pure function of it), the data position and every RNG state, so N steps + resume + N
steps reproduce 2N steps bit for bit (on CPU; GPU kernels may not be deterministic). Nothing
in a checkpoint can run code when resumed: ``trainer.json`` is plain JSON, the ``.pt`` files hold
tensors and plain values only (RNG states included) and are read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from llama2.checkpoint import save_model
from llama2.checkpoint.safe import load_dcp, load_tensors, read_state_json, refuse_legacy, write_state_json
from llama2.model.lora import lora_summary
from llama2.recipe import config_diff, setting, to_dict, write_recipe
from llama2.train.lora import LoraConfig, adapt, export_adapter, load_trainable, lora_setting, trainable_state
from llama2.train.state import (
    RESUME_HELP,
    barrier,
    checkpoint_folder,
    last_record,
    resolve_resume,
    rng_state,
    set_rng_state,
    truncate_metrics,
)

IGNORE_INDEX = -100


# ==========================================================================================
# Config
# ==========================================================================================

@dataclass
class TrainConfig:
    """The loop's settings; defaults are Llama 2's pretraining recipe (§2.2)."""

    out: str = setting("runs/train", "run folder: metrics.jsonl, checkpoints/, model/", metavar="DIR")
    max_steps: int = setting(476_837, "optimizer steps to train for (2T tokens / 4M-token batches, §2.2)")
    batch_size: int = setting(1024, "global batch, in sequences/examples per optimizer step, all ranks "
                                    "together (1024 x 4096 tokens = 4M, §2.2)")
    micro_batch_size: int = setting(1, "sequences per forward pass on each rank; gradient accumulation "
                                       "makes up the rest of the global batch")
    lr: float = setting(3e-4, "peak learning rate (3e-4 for 7B/13B, 1.5e-4 for 34B/70B, §2.2)")
    schedule: Literal["cosine", "constant"] = setting("cosine", "learning-rate schedule after warmup")
    warmup_steps: int = setting(2000, "linear warmup steps (§2.2)")
    decay_steps: int | None = setting(None, "steps over which the cosine decays (default: max_steps)")
    min_lr_ratio: float = setting(0.1, "final learning rate as a fraction of the peak (§2.2: 10%)")
    weight_decay: float = setting(0.1, "AdamW weight decay, applied to matrices only (§2.2)")
    beta1: float = setting(0.9, "AdamW beta1 (§2.2)")
    beta2: float = setting(0.95, "AdamW beta2 (§2.2)")
    eps: float = setting(1e-5, "AdamW epsilon (§2.2)")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (§2.2); 0 = no clipping")
    seed: int = setting(0, "seed for model init, data order and every RNG")
    precision: Literal["auto", "bf16", "fp32"] = setting(
        "auto", "auto = bf16 autocast on CUDA, float32 on CPU")
    distributed: Literal["auto", "fsdp", "ddp"] = setting(
        "auto", "data parallelism under torchrun: auto = FSDP2 on CUDA, DDP otherwise")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in backward")
    compile: bool = setting(False, "torch.compile the model")
    save_every: int = setting(1000, "write a checkpoint every N steps (and at the end); 0 = only at the end")
    keep_last: int = setting(3, "checkpoints to keep (older ones are deleted); 0 = keep all")
    eval_every: int = setting(1000, "validation loss every N steps (and at the start and end); 0 = never")
    eval_batches: int = setting(50, "validation micro-batches, all ranks together")
    log_every: int = setting(10, "console line every N steps when there is no progress bar")
    resume: str = setting("auto", RESUME_HELP, const="latest", metavar="auto|latest|never|DIR")
    peak_tflops: float | None = setting(None, "device peak for MFU, TFLOP/s per rank (default: known GPUs' "
                                              "dense bf16 peak; CPU: 0.1 per thread, an assumption)")
    progress: bool = setting(True, "show a progress bar (rank 0, when attached to a terminal)")
    lora: LoraConfig = lora_setting()

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_steps", "batch_size", "micro_batch_size"):
            # A stage that trains for a number of epochs may leave max_steps at 0 until its data,
            # and so its steps per epoch, is known (see steps_for_epochs).
            if getattr(self, name) <= 0 and not (name == "max_steps" and self.max_steps == 0
                                                 and hasattr(self, "epochs")):
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if getattr(self, "epochs", 1) <= 0:
            problems.append(f"epochs must be positive, got {self.epochs}")
        for name in ("warmup_steps", "save_every", "keep_last", "eval_every", "eval_batches"):
            if (getattr(self, name) or 0) < 0:  # None: a stage derives it (the reward models' warmup)
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if problems:
            raise ValueError("; ".join(problems))


def grad_accum_steps(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank; a batch that does not divide is an error."""
    per_step = micro_batch_size * world_size
    if batch_size % per_step:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by micro_batch_size={micro_batch_size} x "
            f"{world_size} rank(s) = {per_step}; choose a batch that is a multiple of it")
    return batch_size // per_step


# ==========================================================================================
# Schedule, optimizer, loss
# ==========================================================================================

def steps_for_epochs(max_steps: int, epochs: int, steps_per_epoch: int) -> int:
    """The optimizer steps of a run: ``max_steps`` if given, else ``epochs`` passes over the data."""
    return max_steps or max(1, epochs * steps_per_epoch)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to the peak over
    ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x peak at ``decay_steps`` (§2.2)."""
    peak = cfg.lr
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    total = cfg.decay_steps or cfg.max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    floor = cfg.min_lr_ratio * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW with the paper's betas/eps; weight decay on matrices (ndim >= 2) only: norms'
    gains (and any biases) are not decayed. ``cfg``: any config with ``lr``, ``weight_decay``,
    ``beta1``, ``beta2`` and ``eps`` (a :class:`TrainConfig`, PPO's config)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel (CPU and CUDA) is the fastest; it does not take DTensors (FSDP2).
    from torch.distributed.tensor import DTensor

    fused = not any(isinstance(p, DTensor) for p in params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused or None)


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX,
                  weights: Tensor | None = None) -> Tensor:
    """Mean next-token loss over the positions whose label is not ``ignore_index`` (-100), in
    float32. ``labels[b, t]`` is the target for ``logits[b, t]`` (already shifted). A batch with
    no such position (all prompt or padding) has loss 0 and no gradient, not NaN. ``weights``
    (the labels' shape): a weighted mean instead, ``sum(w * loss) / sum(w)``."""
    labels = labels.flatten()
    if weights is None:
        total = F.cross_entropy(logits.float().flatten(0, -2), labels, ignore_index=ignore_index, reduction="sum")
        return total / (labels != ignore_index).sum().clamp(min=1)
    each = F.cross_entropy(logits.float().flatten(0, -2), labels, ignore_index=ignore_index, reduction="none")
    weights = weights.flatten().float() * (labels != ignore_index)
    return (each * weights).sum() / weights.sum().clamp(min=1e-12)


def lm_loss(model: nn.Module, batch: dict) -> tuple[Tensor, dict]:
    """Language-model loss for a batch ``{"tokens", "labels"[, "positions", "mask", "weights"]}``:
    the ``loss_fn`` of pretraining, and of SFT once prompt labels are -100 and packed documents
    carry ``positions`` and a block-diagonal ``mask``."""
    logits = model(batch["tokens"], positions=batch.get("positions"), mask=batch.get("mask"))
    return cross_entropy(logits, batch["labels"], weights=batch.get("weights")), {}


# ==========================================================================================
# Throughput: FLOPs and MFU
# ==========================================================================================

def transformer_flops_per_token(model_cfg, seq_len: int, frozen_weights: bool = False) -> float:
    """Training FLOPs per token: 6N for the weight matmuls (forward 2N, backward 4N; N without
    the embedding lookup) plus 12 * layers * dim * seq_len for attention scores and values
    (PaLM appendix B; counted for the full, not the causal, square as is customary). With
    ``frozen_weights`` (LoRA) the backward pass computes no weight gradients: 4N (the adapters'
    own FLOPs are a rounding error)."""
    n = model_cfg.num_params() - model_cfg.vocab_size * model_cfg.dim
    return (4.0 if frozen_weights else 6.0) * n + 12.0 * model_cfg.n_layers * model_cfg.dim * seq_len


# Dense bf16 peaks, TFLOP/s, by CUDA device name fragment (first match wins).
GPU_PEAK_TFLOPS = [("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0),
                   ("L40S", 362.0), ("A6000", 155.0), ("L4", 121.0), ("A10", 125.0), ("4090", 165.0),
                   ("3090", 71.0), ("V100", 125.0), ("T4", 65.0)]
CPU_TFLOPS_PER_THREAD = 0.1  # an assumption: ~ one AVX-512 core, fp32 FMA at ~3 GHz; use --peak-tflops


def device_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one rank's device, or None when unknown (MFU is then not reported)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((t * 1e12 for key, t in GPU_PEAK_TFLOPS if key in name), None)
    if device.type == "cpu":
        return CPU_TFLOPS_PER_THREAD * 1e12 * torch.get_num_threads()
    return None


# ==========================================================================================
# Distributed
# ==========================================================================================

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None, group: bool = False) -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment (NCCL on GPUs, gloo on
    CPU); a plain ``python`` run is rank 0 of 1. Multi-node is the same code: torchrun's
    ``--nnodes/--node-rank/--rdzv-endpoint`` set the same variables. ``group=True`` joins a
    group even of one process when a launcher set ``MASTER_ADDR``/``MASTER_PORT`` (torchrun
    --nproc_per_node 1): FSDP needs one (see :func:`parallel_mode`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    launched = "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ
    if (world > 1 or (group and launched)) and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local, dev)


def parallel_mode(cfg: TrainConfig, info: DistInfo) -> str:
    """``"single"``, ``"ddp"`` or ``"fsdp"``. Several ranks: ``cfg.distributed`` (auto = FSDP2 on
    CUDA, DDP elsewhere). One rank: no wrapper, except an explicit ``--distributed fsdp`` in a
    joined process group (``torchrun --nproc_per_node 1``): FSDP2 on one device, with the
    meta-device init and DCP checkpoints of a run at scale."""
    if info.enabled:
        return cfg.distributed if cfg.distributed != "auto" else ("fsdp" if info.device.type == "cuda" else "ddp")
    if cfg.distributed == "fsdp" and dist.is_initialized():
        return "fsdp"
    return "single"


def _mean_over_ranks(x: Tensor, info: DistInfo) -> Tensor:
    if info.enabled:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)  # gloo has no AVG
        x /= info.world_size
    return x


# ==========================================================================================
# The trainer
# ==========================================================================================

class BatchIterator(Protocol):
    """What the trainer needs from training data: endless micro-batches and a resumable position."""

    def __iter__(self) -> Iterator[Any]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


LossFn = Callable[[nn.Module, Any], tuple[Tensor, dict]]


class Trainer:
    """Runs :class:`TrainConfig` on a model.

    ``loss_fn(model, batch) -> (loss, metrics)``: ``loss`` is the micro-batch mean (each
    micro-batch weighs the same in the step); ``metrics`` are floats/0-d tensors averaged into
    the step's log, except ``ntokens`` (tokens processed, for tokens/s; default: the size of
    ``batch["tokens"]``). The loss_fn must go through ``model(...)``, the wrapped module's
    forward, so that DDP/FSDP see the computation.

    ``train_data`` yields micro-batches for this rank (dicts of tensors or anything
    ``to_device`` understands) and has ``state_dict``/``load_state_dict``; ``eval_data`` is a
    re-iterable (each ``iter()`` starts over) of validation micro-batches, or None.

    ``model`` may live on the meta device (FSDP at scale): it is then materialised after
    sharding and initialised by ``init_weights(model)``.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, loss_fn: LossFn, train_data: BatchIterator,
                 eval_data: Iterable | None = None, *, run_config: Any = None,
                 flops_per_token: float | None = None, dist_info: DistInfo | None = None,
                 init_weights: Callable[[nn.Module], None] | None = None, quiet: bool = False):
        self.cfg = cfg
        self.run_config = run_config if run_config is not None else cfg
        self.dist = dist_info or init_distributed()
        self.loss_fn, self.train_data, self.eval_data = loss_fn, train_data, eval_data
        self.out = Path(cfg.out)
        self.quiet = quiet
        self.grad_accum = grad_accum_steps(cfg.batch_size, cfg.micro_batch_size, self.dist.world_size)
        self.device = self.dist.device
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.mode = parallel_mode(cfg, self.dist)
        torch.manual_seed(cfg.seed)

        self.module = model  # the unwrapped model: its state_dict has the plain parameter names
        self.lora = cfg.lora.enabled
        if self.lora:
            if any(p.is_meta for p in model.parameters()):
                raise ValueError("LoRA adapts a trained model; this one is on the meta device (pretraining)")
            # QLoRA on a GPU: each block is moved there and quantized in turn, so the device never
            # holds the full-precision model.
            adapt(model, cfg.lora, cfg.seed, device=self.device if self.device.type == "cuda" else None)
            s = lora_summary(model)
            self.log(f"{cfg.lora.method}: training {s['trainable']:,} of {s['total']:,} parameters "
                     f"({s['fraction']:.2%}); rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g}, targets {cfg.lora.targets}")
        self.model = self._wrap(model, init_weights)
        self.optimizer = build_optimizer(self.module, cfg)
        n_params = sum(p.numel() for p in self.module.parameters())
        self.flops_per_token = flops_per_token or (4.0 if self.lora else 6.0) * n_params
        self.peak_flops = device_peak_flops(self.device, cfg.peak_tflops)
        self.step = 0
        self.tokens_seen = 0
        self._last_saved = -1
        self._resume()

    # -- set-up ----------------------------------------------------------------------------
    def _wrap(self, model: nn.Module, init_weights) -> nn.Module:
        cfg = self.cfg
        if cfg.activation_checkpointing:
            found = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
            if not found:
                raise ValueError("activation_checkpointing: the model has no gradient_checkpointing switch")
            for m in found:
                m.gradient_checkpointing = True
        on_meta = any(p.is_meta for p in model.parameters())
        if self.mode == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            # bf16 compute with float32 master weights and float32 gradient reduction.
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if self.bf16 else MixedPrecisionPolicy()
            for blocks in (m for m in model.modules() if isinstance(m, nn.ModuleList)):
                for block in blocks:
                    fully_shard(block, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
            self.bf16_autocast = False  # FSDP casts the parameters itself
        else:
            self.bf16_autocast = self.bf16
        if on_meta:
            if init_weights is None:
                raise ValueError("a model on the meta device needs init_weights")
            model.to_empty(device=self.device)
            with torch.no_grad():
                init_weights(model)
        else:
            model.to(self.device)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            model.compile()  # in place: parameter names stay unchanged
        return model

    def _autocast(self):
        if self.bf16_autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync_grads(self, enabled: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.mode == "ddp" and not enabled:
            return self.model.no_sync()
        if self.mode == "fsdp":
            self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def to_device(self, batch):
        if isinstance(batch, Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(v) for v in batch)
        return batch

    def log(self, msg: str) -> None:
        if self.dist.is_main and not self.quiet:
            tqdm.write(msg, file=sys.stderr)

    # -- the loop --------------------------------------------------------------------------
    def train_step(self, batches: Iterator) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        sums: dict[str, float] = {}
        ntokens = 0
        for micro in range(self.grad_accum):
            batch = self.to_device(next(batches))
            with self._sync_grads(micro == self.grad_accum - 1), self._autocast():
                loss, metrics = self.loss_fn(self.model, batch)
            (loss / self.grad_accum).backward()
            loss_sum += loss.detach()
            n = metrics.pop("ntokens", None)
            ntokens += int(n) if n is not None else (batch["tokens"].numel() if isinstance(batch, dict)
                                                      and "tokens" in batch else 0)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = _mean_over_ranks(loss_sum / self.grad_accum, self.dist)
        ntokens *= self.dist.world_size  # ranks see equal-sized micro-batches
        self.tokens_seen += ntokens
        return {"loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm), "ntokens": ntokens,
                **{k: v / self.grad_accum for k, v in sums.items()}}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation loss over the micro-batches of ``eval_data`` (each rank its own, at
        most ``ceil(eval_batches / world_size)``; every micro-batch weighs the same), and
        perplexity."""
        if self.eval_data is None or self.cfg.eval_batches == 0:
            return {}
        self.model.eval()
        total = torch.zeros(2, device=self.device)
        per_rank = -(-self.cfg.eval_batches // self.dist.world_size)
        for batch in itertools.islice(iter(self.eval_data), per_rank):
            with self._autocast():
                loss, _ = self.loss_fn(self.model, self.to_device(batch))
            total += torch.stack([loss.float(), torch.ones((), device=self.device)])
        self.model.train()
        if self.dist.enabled:
            dist.all_reduce(total)
        if total[1] == 0:
            return {}
        val = (total[0] / total[1]).item()
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    def fit(self) -> dict:
        """Train to ``max_steps`` (from wherever the resume left off); returns the last metrics."""
        cfg = self.cfg
        self.model.train()
        batches = iter(self.train_data)
        last: dict = {"step": self.step}
        if self.step >= cfg.max_steps:
            self.log(f"already at step {self.step} >= max_steps={cfg.max_steps}: nothing to train")
            # What the run that got here returned, so that a resumed stage reports the same.
            return last_record(self.out / "metrics.jsonl") or last
        if self.step == 0 and cfg.eval_every:
            first = self.evaluate()
            if first:
                self._write_metrics({"step": 0, **first})
                self.log(f"step 0: val loss {first['val_loss']:.4f} (ppl {first['val_ppl']:.1f})")
        bar = self._progress_bar()
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            m = self.train_step(batches)
            dt = time.perf_counter() - t0
            tps = m.pop("ntokens") / dt
            record = {"step": self.step, **m, "tokens_per_s": tps, "tokens": self.tokens_seen,
                      "mfu": (self.flops_per_token * tps / (self.peak_flops * self.dist.world_size)
                              if self.peak_flops else None)}
            done = self.step == cfg.max_steps
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or done):
                record.update(self.evaluate())
            self._write_metrics(record)
            last = record
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tps:,.0f}",
                                **({"mfu": f"{record['mfu']:.1%}"} if record["mfu"] is not None else {}))
                bar.update(1)
            elif self.step % cfg.log_every == 0 or done or self.step == 1:
                self.log(f"step {self.step}/{cfg.max_steps} loss {m['loss']:.4f} lr {m['lr']:.2e} "
                         f"grad_norm {m['grad_norm']:.3f} tok/s {tps:,.0f}")
            if "val_loss" in record:
                self.log(f"step {self.step}: val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f})")
            if (cfg.save_every and self.step % cfg.save_every == 0) or done:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        return last

    def _progress_bar(self):
        if not (self.cfg.progress and self.dist.is_main and not self.quiet and sys.stderr.isatty()):
            return None
        return tqdm(total=self.cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True)

    def _write_metrics(self, record: dict) -> None:
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically (:func:`~llama2.train.state.checkpoint_folder`):
        everything goes into ``.tmp-step-N`` first, which is renamed only once complete; then all
        but the newest ``keep_last`` are deleted."""
        with checkpoint_folder(self.out, self.step, self.cfg.keep_last, self.dist) as tmp:
            if self.mode == "fsdp":
                import torch.distributed.checkpoint as dcp
                from torch.distributed.checkpoint.state_dict import get_state_dict

                model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._sd_options())
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
            elif self.dist.is_main:
                torch.save(self._weights(), tmp / "model.pt")
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            # Each rank's own RNG and data position.
            torch.save({"rng": rng_state(), "data": self.train_data.state_dict()},
                       tmp / f"rank-{self.dist.rank}.pt")
            barrier(self.dist)
            if self.dist.is_main:
                write_recipe(self.run_config, tmp / "config.yaml")
                # Plain JSON: the one file read before anything else can never run code.
                write_state_json(tmp / "trainer.json", {
                    "step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.dist.world_size,
                    "mode": self.mode, "schedule": {"kind": self.cfg.schedule, "lr": self.cfg.lr,
                                                    "warmup_steps": self.cfg.warmup_steps,
                                                    "decay_steps": self.cfg.decay_steps or self.cfg.max_steps,
                                                    "min_lr_ratio": self.cfg.min_lr_ratio},
                    "data": self.train_data.state_dict(), "config": to_dict(self.run_config),
                })  # written last: its presence marks a complete checkpoint
        self._last_saved = self.step
        return self.out / "checkpoints" / f"step-{self.step}"

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        refuse_legacy(path)
        if not (path / "trainer.json").is_file():
            raise FileNotFoundError(f"{path}: not a checkpoint (no trainer.json)")
        state = read_state_json(path / "trainer.json")
        if (path / "dcp").is_dir():
            if self.mode != "fsdp":
                raise ValueError(f"{path}: written by an FSDP run; resume it with --distributed fsdp under torchrun")
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._sd_options())
            sd = {"model": model_sd, "optim": optim_sd}
            load_dcp(sd, path / "dcp")
            set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                           options=self._sd_options(loading=True))
        else:
            if self.mode == "fsdp":
                raise ValueError(f"{path}: written without FSDP; resume it with --distributed ddp")
            load_trainable(self.module, load_tensors(path / "model.pt", map_location=self.device), self.lora,
                           path / "model.pt")
            self.optimizer.load_state_dict(load_tensors(path / "optimizer.pt", map_location=self.device))
        mine = path / f"rank-{self.dist.rank}.pt"
        if mine.is_file() and state.get("world_size") == self.dist.world_size:
            rank_state = load_tensors(mine)
            set_rng_state(rank_state["rng"])
            self.train_data.load_state_dict(rank_state["data"])
        else:  # a different world size: the data position is global, RNG streams restart
            self.train_data.load_state_dict(state["data"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self._last_saved = self.step
        changed = config_diff(state.get("config", {}), to_dict(self.run_config))
        if changed:
            self.log(f"resuming with changed settings: {', '.join(changed)}")

    def _weights(self) -> dict[str, Tensor]:
        return trainable_state(self.module, self.lora)

    def _sd_options(self, loading: bool = False):
        """FSDP's state-dict options: a LoRA run's checkpoints leave the frozen base out (and so
        loading one must not ask for it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=self.lora, strict=not (loading and self.lora))

    def _resume(self) -> None:
        path = resolve_resume(self.out, self.cfg.resume, self.dist)
        if path is not None:
            self.load_checkpoint(path)
            self.log(f"resumed from {path} (step {self.step})")
        if self.dist.is_main:  # forget metrics logged after this point by an earlier, interrupted run
            self._truncate_metrics(self.step if path is not None else -1)

    def _truncate_metrics(self, step: int) -> None:
        truncate_metrics(self.out / "metrics.jsonl", "step", step, self.log)

    # -- export ----------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole model's weights on CPU (gathered from every rank under FSDP; collective)."""
        if self.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.lora))
        return {k: v.detach().cpu() for k, v in self._weights().items()}

    def export(self, path: str | Path | None = None, tokenizer=None, save: Callable = save_model,
               base: str | Path | None = None, **meta) -> Path:
        """Write the model directory (``out/model``) that ``llama2.load_model`` and transformers
        read: ``save(model, path, tokenizer=tokenizer, **meta)`` on the main rank, e.g.
        ``save_scalar_model`` and its ``reward_kind``. Call on every rank. A LoRA run writes
        its adapter over ``base`` (the starting model's directory) instead (train/lora.py)."""
        path = Path(path or self.out / "model")
        if self.lora and base is None:
            raise ValueError("a LoRA run's export needs the base model directory its adapters are over")
        state = self.full_state_dict()
        if self.lora:
            if self.dist.is_main:
                path = export_adapter(state, self.cfg.lora, base, path.parent, tokenizer=tokenizer,
                                      scalar=hasattr(self.module, "score"),
                                      max_len=self.module.config.max_seq_len, **meta)
            barrier(self.dist)
            return path
        if self.dist.is_main:
            shell = SimpleNamespace(config=self.module.config, state_dict=lambda: state)
            save(shell, path, tokenizer=tokenizer, **meta)
        barrier(self.dist)
        return path
