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

``--init DIR`` continues pretraining from a model directory instead of a random init: Code
Llama's long-context fine-tuning (Code Llama §2.4: 16,384-token sequences with the RoPE base
raised from 10⁴ to 10⁶; Llama 2 Long, Xiong et al. 2023, raises it to 500,000) or linear
position interpolation (Chen et al. 2023, ``--model.rope-scaling``). The weights and the
shape come from DIR; only ``--model.rope-theta``, ``--model.rope-scaling`` and
``--model.max-seq-len`` may differ from DIR's (nothing in the weights depends on them), so
``--seq-len`` may exceed the old context. The optimizer starts fresh; a continued run resumes
from its own checkpoints like any other run.
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from llama2.checkpoint import load_model, load_state
from llama2.checkpoint.meta import find_tokenizer
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
from llama2.recipe import add_config_args, dump_recipe, load_config, read_recipe, setting
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
    model: ModelConfig = setting(default_factory=ModelConfig, help="model shape (default: Llama 2 7B; with "
                                                                   "--init: DIR's)")
    init: str = setting("", "continue pretraining from this model directory (Code Llama §2.4): its weights and "
                            "shape; only --model.rope-theta, --model.rope-scaling and --model.max-seq-len may "
                            "change; the optimizer starts fresh; empty: a random init", metavar="DIR")
    val_fraction: float = setting(0.01, "share of the embedded corpus's documents held out for validation")
    completion_weight: float = setting(1.0, "loss weight of a completion's token (the data's prompt/completion "
                                            "rows) against a plain text's, in training; 1: every target alike "
                                            "(the validation loss always weighs them alike)")

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_lora(self, "pretraining")
        if not self.completion_weight > 0:
            raise ValueError(f"completion_weight must be > 0, got {self.completion_weight}")
        if self.seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        # With --init the model's fields are DIR's, known only once it is read (check_init).
        if self.seq_len > self.model.max_seq_len and not self.init:
            raise ValueError(f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")


# What continued pretraining may change (Code Llama §2.4, Chen et al. 2023): nothing in the
# weights depends on them. Every other model field is the shape of DIR's tensors.
LONG_CONTEXT_FIELDS = ("rope_theta", "rope_scaling", "max_seq_len")


def init_model_config(init: str, given: dict) -> ModelConfig:
    """The model of a run continued from ``init``: the directory's config with the
    :data:`LONG_CONTEXT_FIELDS` among ``given`` (model fields set by a flag or a recipe file)
    replaced; any other given field must equal the directory's (one-line ValueError)."""
    base, _, _ = load_state(init, verify=False)  # config only: the tensor iterator is lazy
    for name, value in given.items():
        if name not in LONG_CONTEXT_FIELDS and value != getattr(base, name):
            raise ValueError(f"--model.{name.replace('_', '-')}={value} differs from {init}'s {getattr(base, name)}: "
                             f"continued pretraining keeps the model's shape (only "
                             f"{', '.join(LONG_CONTEXT_FIELDS)} may change)")
    return dataclasses.replace(base, **{k: v for k, v in given.items() if k in LONG_CONTEXT_FIELDS})


def check_init(cfg: PretrainConfig) -> ModelConfig | None:
    """With ``--init``: DIR's config, after checking that ``cfg.model`` has its shape and that
    ``seq_len`` fits the new context. None without ``--init``."""
    if not cfg.init:
        return None
    base, _, _ = load_state(cfg.init, verify=False)
    ours = {k: v for k, v in cfg.model.to_dict().items() if k not in LONG_CONTEXT_FIELDS}
    theirs = {k: v for k, v in base.to_dict().items() if k not in LONG_CONTEXT_FIELDS}
    for name in ours:
        if ours[name] != theirs[name]:
            raise ValueError(f"model.{name}={ours[name]} differs from {cfg.init}'s {theirs[name]}: continued "
                             f"pretraining keeps the model's shape (only {', '.join(LONG_CONTEXT_FIELDS)} may change)")
    if cfg.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len} ({cfg.init}'s "
                         f"context is {base.max_seq_len}); raise it with --model.max-seq-len")
    return base


def given_model_fields(args: argparse.Namespace, cfg: PretrainConfig) -> dict:
    """Model fields set explicitly: by a ``--model.*`` flag or in the ``--config`` recipe file
    (the built-in tiny recipe's shape is a default, not a request)."""
    names = {dest.split(".", 1)[1] for dest in vars(args) if dest.startswith("cfg__model.")}
    if getattr(args, "config", None):
        names |= set(read_recipe(args.config).get("model") or {})
    return {name: getattr(cfg.model, name) for name in names}


def init_model(cfg: PretrainConfig) -> Transformer:
    """DIR's weights in a model of ``cfg.model`` (its RoPE and context), float32 as a run from
    scratch trains."""
    loaded = load_model(cfg.init, dtype=torch.float32, training=True)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.load_state_dict(loaded.state_dict(), assign=True)
    return model.train()


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
    if cfg.init:  # a continued model reads the tokens of its own tokenizer
        data.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(init_tokenizer(cfg.init), tok_file)
    elif tok_file.is_file() and Tokenizer(tok_file).vocab_size == cfg.model.vocab_size:
        log(f"reusing tokenizer {tok_file}")
    else:
        log(f"training a {cfg.model.vocab_size}-piece tokenizer on the embedded corpus ({len(files)} files) ...")
        train_tokenizer(files, data, vocab_size=cfg.model.vocab_size, verbose=False)
    prepare(files, tok_file, data, val_fraction=cfg.val_fraction, log=log)
    return data


def init_tokenizer(init: str) -> Path:
    file = find_tokenizer(Path(init))
    if file is None:
        raise FileNotFoundError(f"{init}: no tokenizer.model to prepare the embedded corpus with; pass --data")
    return file


def check_init_data(cfg: PretrainConfig, data: Path, index: dict) -> None:
    """Data tokenized by another tokenizer than DIR's would train the model on wrong ids."""
    ours, theirs = data / index["tokenizer"], find_tokenizer(Path(cfg.init))
    if ours.is_file() and theirs is not None and not filecmp.cmp(ours, theirs, shallow=False):
        raise ValueError(f"{data}: prepared with {ours}, not with {theirs} of the model continued from {cfg.init}")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(PretrainConfig, args, stage="pretrain")
    if cfg.init:
        cfg = dataclasses.replace(cfg, model=init_model_config(cfg.init, given_model_fields(args, cfg)))
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
    base = check_init(cfg)
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
    if cfg.init:
        check_init_data(cfg, data, index)
    tokenizer = Tokenizer(data / index["tokenizer"]) if (data / index["tokenizer"]).is_file() else None

    accum = grad_accum_steps(cfg.batch_size, cfg.micro_batch_size, info.world_size)
    train_stream = TokenStream(data, "train")
    if cfg.completion_weight != 1.0 and not train_stream.masked:
        raise ValueError(f"completion_weight {cfg.completion_weight}: {data} has no prompt/completion rows to weigh")
    train = PackedLoader(PackedSequences(train_stream, cfg.seq_len, cfg.completion_weight), cfg.micro_batch_size,
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
    if base is not None:  # every rank reads DIR (FSDP then shards it); a resume overwrites the weights
        model = init_model(cfg)
        log(f"continuing from {cfg.init}: rope_theta {base.rope_theta:g} -> {cfg.model.rope_theta:g}, rope_scaling "
            f"{base.rope_scaling} -> {cfg.model.rope_scaling}, max_seq_len {base.max_seq_len} -> {cfg.model.max_seq_len}")
    else:
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
