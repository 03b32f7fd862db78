"""Fine-tuning a chat model on conversations: what SFT, Ghost Attention, rejection sampling,
safety distillation and the guard share. Not a stage itself; each stage decides *which*
conversations and *which answers* carry the loss, then calls :func:`finetune`. The reward
models, which start from the chat model too, share its second half, :func:`train_and_export`
(loader, number of steps, validation, the trainer, the exported model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llama2.checkpoint import load_model, save_model
from llama2.data.chat_data import IGNORE, ChatSequences, Example, build_sequences
from llama2.data.shards import EvalBatches, PackedLoader
from llama2.recipe import dump_recipe, load_config, setting
from llama2.train.core import (
    DistInfo,
    TrainConfig,
    Trainer,
    grad_accum_steps,
    init_distributed,
    lm_loss,
    steps_for_epochs,
    transformer_flops_per_token,
)
from llama2.train.state import check_resume
from llama2.utils import log_to_stderr


@dataclass
class FinetuneConfig(TrainConfig):
    """Defaults are the paper's SFT settings (§3.1): cosine from 2e-5, weight decay 0.1, batch 64
    sequences of 4096 tokens, 2 epochs, prompts and answers packed together."""

    out: str = setting("runs/sft", "run folder: metrics.jsonl, checkpoints/, model/", metavar="DIR")
    model: str = setting("runs/pretrain/model", "model directory to start from", metavar="DIR")
    seq_len: int = setting(4096, "tokens per packed training sequence (§3.1: 4096)")
    packing: bool = setting(True, "pack several conversations per sequence (§3.1); attention and loss never "
                                  "cross them. Off: one padded conversation per row")
    epochs: int = setting(2, "passes over the data (§3.1: 2); sets max_steps unless max_steps is given")
    max_steps: int = setting(0, "optimizer steps; 0 = epochs x steps per epoch")
    batch_size: int = setting(64, "sequences per optimizer step (§3.1: 64)")
    lr: float = setting(2e-5, "peak learning rate (§3.1: 2e-5), cosine decay")
    warmup_steps: int = setting(0, "linear warmup steps (the paper gives none for SFT)")
    eval_every: int = setting(50, "validation loss every N steps (and at the start and end); 0 = never")
    eval_batches: int = setting(8, "micro-batches per validation")
    save_every: int = setting(200, "checkpoint every N steps (and at the end)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")


NO_VALIDATION = "this stage has no validation data during training: must be 0"


def refuse_validation(cfg: TrainConfig, stage: str) -> None:
    """A stage that fine-tunes without validation data (rejection sampling, distillation) has
    nothing for ``eval_every``/``eval_batches`` to act on: setting either is an error, not a no-op."""
    for name in ("eval_every", "eval_batches"):
        if getattr(cfg, name):
            raise ValueError(f"{name}={getattr(cfg, name)}: {stage} has no validation data; leave it at 0")


def stage_main(cls, args, stage: str, run, required: tuple[str, ...] = ("model",)) -> int:
    """What every stage command does: resolve the config (without --config, ``stage``'s block of
    tiny.yaml), print it with --print-config, check that the input directories exist, run."""
    cfg = load_config(cls, args, stage=stage)
    if getattr(args, "print_config", False):
        print(dump_recipe(cfg), end="")
        return 0
    for name in required:
        path = getattr(cfg, name)
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{path}: not found (train it first or pass --{name.replace('_', '-')})")
    run(cfg)
    return 0


def finetune(cfg: FinetuneConfig, train: Sequence[Example], val: Sequence[Example], tokenizer,
             run_config=None, quiet: bool = False) -> dict:
    """Train ``cfg.model`` on tokenized conversations (labels already masked) and export
    ``cfg.out/model``. Returns the last logged metrics."""
    check_resume(cfg.out, cfg.resume)  # refused before loading anything
    log = log_to_stderr(quiet)
    info = init_distributed()
    grad_accum_steps(cfg.batch_size, cfg.micro_batch_size, info.world_size)  # fail before loading anything
    model = load_model(cfg.model, dtype=None, training=True)
    if model.config.max_seq_len < cfg.seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's context ({model.config.max_seq_len}) "
                         f"in {cfg.model}")
    # An example whose answer lies beyond seq_len teaches nothing (and a batch of only such rows
    # has no loss at all): drop it, and stop if that leaves nothing.
    keep = [ex for ex in train if any(lab != IGNORE for lab in ex.labels[1:cfg.seq_len + 1])]
    if not keep:
        raise ValueError(f"no training conversation has an answer token within seq_len={cfg.seq_len} (the "
                         f"longest is {max(len(ex) for ex in train)} tokens); raise --seq-len")
    if len(keep) < len(train):
        log(f"warning: {len(train) - len(keep)} of {len(train)} conversations have no answer token within "
            f"seq_len={cfg.seq_len} and were dropped")
        train = keep
    packs, truncated = build_sequences(train, cfg.seq_len, cfg.packing)
    if truncated:
        log(f"warning: {truncated} of {len(train)} conversations were longer than seq_len={cfg.seq_len} "
            "and were truncated")
    seqs = ChatSequences(packs, cfg.seq_len, packed=cfg.packing, name="training conversations")
    val_seqs = ChatSequences(build_sequences(val, cfg.seq_len, cfg.packing)[0], cfg.seq_len,
                             packed=cfg.packing, name="validation conversations") if val else None
    n_answer = sum(sum(lab != -100 for lab in ex.labels) for ex in train)

    def describe(cfg: FinetuneConfig) -> str:
        return (f"fine-tuning {cfg.model} ({model.num_params() / 1e6:,.1f}M parameters) on {len(train):,} "
                f"conversations ({n_answer:,} answer tokens) in {len(packs):,} "
                f"{'packed' if cfg.packing else 'padded'} sequences of {cfg.seq_len}; {cfg.max_steps} steps of "
                f"{cfg.batch_size}")

    last, path = train_and_export(cfg, model, lm_loss, seqs, val_seqs, tokenizer, info=info, describe=describe,
                                  run_config=run_config or cfg,
                                  flops_per_token=transformer_flops_per_token(model.config, cfg.seq_len,
                                                                              frozen_weights=cfg.lora.enabled),
                                  quiet=quiet)
    if "val_loss" in last:
        log(f"final val loss {last['val_loss']:.4f}")
    log(f"model written to {path}")
    return last


def train_and_export(cfg: TrainConfig, model, loss_fn, train_data, val_data, tokenizer, *, info: DistInfo,
                     describe: Callable[[TrainConfig], str], warmup_fraction: float | None = None,
                     run_config=None, flops_per_token: float | None = None, save: Callable = save_model,
                     quiet: bool = False, **save_meta) -> tuple[dict, Path]:
    """What a fine-tuning stage does once its model and its datasets of sequences are ready
    (conversations for SFT and its kin, preference pairs for the reward models): micro-batches
    of ``train_data`` in a seeded order, ``cfg.epochs`` passes unless ``cfg.max_steps`` is given,
    warmup ``warmup_fraction`` of those steps (at least 5, §3.2.2) if given, validation on
    ``val_data`` (None: none), the :class:`Trainer`, and the model written to ``cfg.out/model``
    by ``save(model, path, tokenizer=tokenizer, **save_meta)``. ``describe(cfg)`` is logged
    once the number of steps is known. Returns the last metrics and the model's directory."""
    accum = grad_accum_steps(cfg.batch_size, cfg.micro_batch_size, info.world_size)
    loader = PackedLoader(train_data, cfg.micro_batch_size, grad_accum=accum, seed=cfg.seed, rank=info.rank,
                          world_size=info.world_size)
    steps = steps_for_epochs(cfg.max_steps, cfg.epochs, loader.steps_per_epoch)
    cfg = dataclasses.replace(cfg, max_steps=steps)
    if warmup_fraction is not None:
        cfg = dataclasses.replace(cfg, warmup_steps=max(5, round(warmup_fraction * steps)))
    evals = EvalBatches(val_data, cfg.micro_batch_size, info.rank, info.world_size) if val_data is not None else None
    if evals is not None and len(evals) == 0:
        evals = None
    log_to_stderr(quiet)(describe(cfg))
    trainer = Trainer(cfg, model, loss_fn, loader, evals, run_config=run_config, dist_info=info,
                      flops_per_token=flops_per_token, quiet=quiet)
    last = trainer.fit()
    path = trainer.export(Path(cfg.out) / "model", tokenizer=tokenizer, save=save, base=getattr(cfg, "model", None),
                          **save_meta)
    return last, path
