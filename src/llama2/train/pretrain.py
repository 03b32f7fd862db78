"""``llama2 pretrain``: Llama 2's pretraining recipe (paper §2.2) on the shared trainer.

Next-token prediction on packed 4096-token sequences of the prepared shards, with AdamW
(0.9, 0.95, eps 1e-5, weight decay 0.1), a cosine schedule with 2000 warmup steps decaying
to 10% of the peak, gradient clipping at 1.0 and 4M-token global batches. Those are the
defaults of :class:`PretrainConfig` (with the 7B shape); recipes/ holds the 1B, 7B, 13B and
70B recipes.

Without ``--config`` the ``pretrain`` block of the built-in tiny recipe (tiny.yaml, the one
``llama2 run`` uses) applies, and without ``--data`` the corpus shipped in the
package is used: on first use a tokenizer of ``model.vocab_size`` pieces is trained on it
and the shards are prepared into ``OUT/data`` (reused by later runs into the same folder).
So ``llama2 pretrain`` with no arguments trains a ~5M-parameter model on a laptop CPU in a
few minutes, and ``torchrun --nproc_per_node 8 -m llama2 pretrain --config
recipes/pretrain-7b.yaml --data DIR`` is the same loop on GPUs.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llama2.corpus import default_corpus_files
from llama2.data.shards import (
    INDEX,
    EvalBatches,
    PackedLoader,
    PackedSequences,
    TokenStream,
    prepare,
    read_index,
)
from llama2.model import ModelConfig, Transformer
from llama2.recipe import add_config_args, dump_recipe, load_config, setting
from llama2.tokenizer import Tokenizer, train_tokenizer
from llama2.train.core import (
    TrainConfig,
    Trainer,
    grad_accum_steps,
    init_distributed,
    lm_loss,
    parallel_mode,
    transformer_flops_per_token,
)
from llama2.train.lora import refuse_lora
from llama2.train.state import barrier, check_resume
from llama2.utils import log_to_stderr


@dataclass
class PretrainConfig(TrainConfig):
    out: str = setting("runs/pretrain", "run folder: metrics.jsonl, checkpoints/, model/", metavar="DIR")
    data: str = setting("", "prepared data directory (`llama2 prepare`); empty: the embedded corpus, "
                            "prepared into OUT/data on first use", metavar="DIR")
    seq_len: int = setting(4096, "tokens per training sequence (§2.2: 4096)")
    model: ModelConfig = setting(default_factory=ModelConfig, help="model shape (default: Llama 2 7B)")
    val_fraction: float = setting(0.01, "share of the embedded corpus's documents held out for validation")

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_lora(self, "pretraining")
        if self.seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Without --config the tiny recipe's pretrain block applies (src/llama2/resources/recipes/tiny.yaml); the "
                     "dataclass defaults are the paper's 7B settings. Multi-GPU/multi-node: "
                     "torchrun --nproc_per_node N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT] "
                     "-m llama2 pretrain --config FILE")
    add_config_args(parser, PretrainConfig)


def check_config(cfg: PretrainConfig, world_size: int) -> None:
    """The checks that need no data and no compute: fail early with one line."""
    grad_accum_steps(cfg.batch_size, cfg.micro_batch_size, world_size)
    if cfg.data:
        read_index(cfg.data)  # missing data: FileNotFoundError naming the directory


def default_data(cfg: PretrainConfig, log=print) -> Path:
    """The embedded corpus, tokenized with a tokenizer trained on it, in ``OUT/data``."""
    data = Path(cfg.out) / "data"
    if (data / INDEX).is_file():
        index = read_index(data)
        if index["vocab_size"] != cfg.model.vocab_size:
            raise ValueError(
                f"{data}: prepared with a {index['vocab_size']}-piece tokenizer but model.vocab_size="
                f"{cfg.model.vocab_size}; use another --out or delete {data}")
        return data
    files = default_corpus_files()
    tok_file = data / "tokenizer.model"
    if tok_file.is_file() and Tokenizer(tok_file).vocab_size == cfg.model.vocab_size:
        log(f"reusing tokenizer {tok_file}")
    else:
        log(f"training a {cfg.model.vocab_size}-piece tokenizer on the embedded corpus ({len(files)} files) ...")
        train_tokenizer(files, data, vocab_size=cfg.model.vocab_size, verbose=False)
    prepare(files, tok_file, data, val_fraction=cfg.val_fraction, log=log)
    return data


def main(args: argparse.Namespace) -> int:
    cfg = load_config(PretrainConfig, args, stage="pretrain")
    if getattr(args, "print_config", False):
        print(dump_recipe(cfg), end="")
        return 0
    run(cfg)
    return 0


def run(cfg: PretrainConfig, quiet: bool = False) -> dict:
    check_resume(cfg.out, cfg.resume)  # refused before preparing data
    log = log_to_stderr(quiet)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_config(cfg, world)
    info = init_distributed(group=cfg.distributed == "fsdp")  # FSDP on one GPU needs a group too
    if cfg.data:
        data = Path(cfg.data)
    else:
        if info.is_main:
            data = default_data(cfg, log)
        barrier(info)
        data = Path(cfg.out) / "data"
    index = read_index(data)
    if index["vocab_size"] != cfg.model.vocab_size:
        raise ValueError(f"{data}: tokenizer has {index['vocab_size']} pieces but model.vocab_size="
                         f"{cfg.model.vocab_size}")
    tokenizer = Tokenizer(data / index["tokenizer"]) if (data / index["tokenizer"]).is_file() else None

    accum = grad_accum_steps(cfg.batch_size, cfg.micro_batch_size, info.world_size)
    train = PackedLoader(PackedSequences(TokenStream(data, "train"), cfg.seq_len), cfg.micro_batch_size,
                         grad_accum=accum, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    val_seqs = PackedSequences(TokenStream(data, "val"), cfg.seq_len)
    evals = EvalBatches(val_seqs, cfg.micro_batch_size, info.rank, info.world_size, max_batches=cfg.eval_batches)
    if cfg.eval_every and evals.total == 0:
        log(f"warning: {data} has too little validation data for one batch; no validation loss")
        evals = None

    # FSDP on GPUs: the model is created on the meta device and materialised shard by shard
    # (a 70B model fits on no single device). Elsewhere it is initialised whole from the seed,
    # so any number of ranks starts from the same weights.
    on_meta = info.device.type == "cuda" and parallel_mode(cfg, info) == "fsdp"
    model = Transformer.from_config(cfg.model, device="meta" if on_meta else None, seed=cfg.seed)
    trainer = Trainer(cfg, model, lm_loss, train, evals, run_config=cfg, dist_info=info,
                      flops_per_token=transformer_flops_per_token(cfg.model, cfg.seq_len),
                      init_weights=lambda m: m.init_weights(), quiet=quiet)
    n = cfg.model.num_params()
    log(f"pretraining {n / 1e6:,.1f}M parameters on {index['tokens']['train']:,} tokens "
        f"({train.n:,} sequences of {cfg.seq_len}, {train.steps_per_epoch:,} steps per epoch); "
        f"{info.world_size} rank(s) x {cfg.micro_batch_size} x {accum} accumulation = {cfg.batch_size} "
        f"sequences ({cfg.batch_size * cfg.seq_len:,} tokens) per step; {trainer.mode}, "
        f"{'bf16' if trainer.bf16 else 'fp32'} on {info.device.type}")
    last = trainer.fit()
    path = trainer.export(Path(cfg.out) / "model", tokenizer=tokenizer)
    if "val_loss" in last:
        log(f"final val loss {last['val_loss']:.4f} (ppl {last['val_ppl']:.1f})")
    log(f"model written to {path}; try: llama2 generate --model {path} --prompt \"It is a truth\"")
    if (info.enabled or trainer.mode == "fsdp") and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return last
