"""Fine-tuning a chat model on conversations: what SFT, Ghost Attention, rejection sampling and
safety distillation share. Not a stage itself; each stage decides *which* conversations and
*which answers* carry the loss, then calls :func:`finetune`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llama2.data.chat_data import IGNORE, ChatSequences, Example, build_sequences
from llama2.recipe import setting
from llama2.train.core import TrainConfig, steps_for_epochs


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


def stage_main(cls, args, tiny_recipe: dict, run, required: tuple[str, ...] = ("model",)) -> int:
    """What every stage command does: resolve the config (the tiny recipe without --config),
    print it with --print-config, check that the input directories exist, run."""
    from llama2.recipe import dump_recipe, load_config

    cfg = load_config(cls, args, default_recipe=tiny_recipe, default_source="built-in tiny recipe")
    if getattr(args, "print_config", False):
        print(dump_recipe(cfg), end="")
        return 0
    for name in required:
        path = getattr(cfg, name)
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{path}: not found (train it first or pass --{name.replace('_', '-')})")
    run(cfg)
    return 0


def log_to_stderr(quiet: bool):
    def log(msg: str) -> None:
        if not quiet and int(os.environ.get("RANK", "0")) == 0:
            print(msg, file=sys.stderr, flush=True)
    return log


def finetune(cfg: FinetuneConfig, train: Sequence[Example], val: Sequence[Example], tokenizer,
             run_config=None, quiet: bool = False) -> dict:
    """Train ``cfg.model`` on tokenized conversations (labels already masked) and export
    ``cfg.out/model``. Returns the last logged metrics."""
    from llama2.checkpoint import load_model
    from llama2.data.shards import EvalBatches, PackedLoader
    from llama2.train.core import (
        Trainer,
        grad_accum_steps,
        init_distributed,
        lm_loss,
        transformer_flops_per_token,
    )

    log = log_to_stderr(quiet)
    info = init_distributed()
    accum = grad_accum_steps(cfg.batch_size, cfg.micro_batch_size, info.world_size)
    model = load_model(cfg.model, dtype=None)
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
    loader = PackedLoader(seqs, cfg.micro_batch_size, grad_accum=accum, seed=cfg.seed, rank=info.rank,
                          world_size=info.world_size)
    cfg = dataclasses.replace(cfg, max_steps=steps_for_epochs(cfg.max_steps, cfg.epochs, loader.steps_per_epoch))
    evals = None
    if val:
        val_seqs = ChatSequences(build_sequences(val, cfg.seq_len, cfg.packing)[0], cfg.seq_len,
                                 packed=cfg.packing, name="validation conversations")
        evals = EvalBatches(val_seqs, cfg.micro_batch_size, info.rank, info.world_size)
        if len(evals) == 0:
            evals = None
    n_answer = sum(sum(lab != -100 for lab in ex.labels) for ex in train)
    log(f"fine-tuning {cfg.model} ({model.num_params() / 1e6:,.1f}M parameters) on {len(train):,} conversations "
        f"({n_answer:,} answer tokens) in {len(packs):,} {'packed' if cfg.packing else 'padded'} sequences of "
        f"{cfg.seq_len}; {cfg.max_steps} steps of {cfg.batch_size}")
    trainer = Trainer(cfg, model, lm_loss, loader, evals, run_config=run_config or cfg, dist_info=info,
                      flops_per_token=transformer_flops_per_token(model.config, cfg.seq_len), quiet=quiet)
    last = trainer.fit()
    path = trainer.export(Path(cfg.out) / "model", tokenizer=tokenizer)
    if "val_loss" in last:
        log(f"final val loss {last['val_loss']:.4f}")
    log(f"model written to {path}")
    return last
