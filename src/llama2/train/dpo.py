"""``llama2 dpo``: Direct Preference Optimization on preference pairs, beside PPO.

Not in the Llama 2 paper, which aligns with a reward model and PPO (§3.2.3). DPO (Rafailov et
al. 2023) optimises the same KL-regularised objective without a reward model or sampling: with
pi the policy and pi_ref the frozen starting (SFT) model, each pair (x, y_c, y_r) contributes

    L = -log sigmoid(beta * [(log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))])

(DPO paper Eq. 7), log pi(y|x) being the sum of the answer tokens' log-probabilities, prompt
tokens masked. ``beta * (log pi - log pi_ref)`` is the answer's implicit reward (DPO paper
§5). ``--label-smoothing e`` is conservative DPO (Mitchell 2023; TRL's ``label_smoothing``):
the labels are taken to be flipped with probability e, so the loss is
``(1 - e) L(h) + e L(-h)``. Tulu 2 (Ivison et al. 2023) aligned Llama 2 this way; the
defaults are its full fine-tuning settings for 7B.

The data is the reward models' (data/preference.py: JSONL ``{prompt|messages, chosen,
rejected, rating}``, both answers in the chat format after the same prompt) or the bundled
assistant world's pairs of both kinds, helpfulness and safety.

The reference model is used only through its log-probabilities of the training (and
validation) answers, and these never change: they are computed once, in one pass over the
data before the first step, kept per pair, and the reference model is not held during
training, so each step runs one model instead of two. Full fine-tuning computes them with the
SFT model as loaded (the policy's starting point); a LoRA/QLoRA run with the policy's adapters
switched off (its frozen, possibly NF4, base: exactly the policy at step 0). They are written
to ``OUT/reference_logps.pt`` with a fingerprint of the model and data, so a resumed run reads
them back instead of recomputing them (recomputing gives the same numbers on CPU, too).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from llama2.chat import chat_segments
from llama2.checkpoint import CheckpointError, load_model, load_tokenizer
from llama2.checkpoint.safe import load_tensors
from llama2.data.preference import Pair, load_pairs, parse_pair
from llama2.data.shards import EvalBatches, PackedLoader
from llama2.data.world import World
from llama2.model.lora import adapters_disabled
from llama2.recipe import add_config_args, setting
from llama2.train.core import (
    TrainConfig,
    Trainer,
    grad_accum_steps,
    init_distributed,
    steps_for_epochs,
    transformer_flops_per_token,
)
from llama2.train.finetune import stage_main
from llama2.train.state import barrier, check_resume
from llama2.utils import DataError, log_to_stderr

REFERENCE_FILE = "reference_logps.pt"


@dataclass
class DPOConfig(TrainConfig):
    """Defaults are Tulu 2's DPO settings for full fine-tuning of Llama 2 7B (Ivison et al. 2023
    §2): beta 0.1, learning rate 5e-7 with 10% warmup, 3 epochs of 32 pairs, no weight decay.
    The tiny recipe's ``dpo`` block (tiny.yaml) overrides them for a 5M model."""

    out: str = setting("runs/dpo", "run folder: metrics.jsonl, checkpoints/, model/, reference_logps.pt",
                       metavar="DIR")
    model: str = setting("runs/sft/model", "chat (SFT) model to start from; also the frozen reference",
                         metavar="DIR")
    data: str = setting("", "preference pairs, JSONL {prompt|messages, chosen, rejected, rating} (the reward "
                            "models' format), several files separated by commas; empty: the bundled assistant "
                            "world's helpfulness and safety pairs", metavar="FILE[,FILE...]")
    val_data: str = setting("", "held-out pairs for validation (same format, commas for several files); empty: "
                                "the bundled world's validation pairs when training on it, else none",
                            metavar="FILE[,FILE...]")
    world_pairs: int = setting(4000, "pairs of each kind (helpfulness, safety) drawn from the bundled world when "
                                     "--data is empty")
    world_seed: int = setting(0, "seed of the bundled assistant world")
    beta: float = setting(0.1, "strength of the KL constraint to the reference model (DPO paper, TRL, Tulu 2: 0.1); "
                               "smaller lets the policy move further")
    label_smoothing: float = setting(0.0, "conservative DPO: assumed probability that a pair's labels are flipped, "
                                          "in [0, 0.5); 0 = the plain sigmoid loss")
    max_len: int = setting(4096, "longest dialogue + answer in tokens (the end is kept: the answer and its EOS); "
                                 "Tulu 2 used 8192, Llama 2's context is 4096")
    epochs: int = setting(3, "passes over the pairs (Tulu 2: 3); sets max_steps unless max_steps is given")
    max_steps: int = setting(0, "optimizer steps; 0 = epochs x steps per epoch")
    batch_size: int = setting(32, "pairs per optimizer step (Tulu 2: 32)")
    lr: float = setting(5e-7, "peak learning rate (Tulu 2: 5e-7 for full fine-tuning of 7B; LoRA and small models "
                              "need far more)")
    min_lr_ratio: float = setting(0.0, "final learning rate as a fraction of the peak (Tulu 2 decays to 0)")
    weight_decay: float = setting(0.0, "AdamW weight decay (Tulu 2 and TRL: none)")
    warmup_fraction: float = setting(0.1, "warmup as a share of the steps (Tulu 2: 10%), unless warmup_steps is "
                                          "given")
    warmup_steps: int | None = setting(None, "linear warmup steps; default: warmup_fraction of the steps")
    eval_every: int = setting(50, "validation (loss, implicit-reward accuracy and margin) every N steps (and at "
                                  "the start and end); 0 = never")
    eval_batches: int = setting(8, "validation micro-batches")
    save_every: int = setting(200, "checkpoint every N steps (and at the end)")

    def __post_init__(self) -> None:
        problems = []
        if not self.beta > 0:
            problems.append(f"beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            problems.append(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.max_len < 2:
            problems.append(f"max_len must be at least 2, got {self.max_len}")
        if not 0 <= self.warmup_fraction < 1:
            problems.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.world_pairs <= 0:
            problems.append(f"world_pairs must be positive, got {self.world_pairs}")
        if problems:
            raise ValueError("; ".join(problems))
        super().__post_init__()


# ---- the loss ------------------------------------------------------------------------------------

def dpo_loss(logp_chosen: Tensor, logp_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair sigmoid DPO loss (DPO paper Eq. 7; with ``label_smoothing`` e, conservative DPO:
    ``(1 - e) * -log sigmoid(beta h) + e * -log sigmoid(-beta h)``) and the implicit rewards
    ``beta * (log pi - log pi_ref)`` of the chosen and rejected answers (DPO paper §5), detached.
    ``h = (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)``."""
    chosen, rejected = logp_chosen - ref_chosen, logp_rejected - ref_rejected
    h = beta * (chosen - rejected)
    losses = -F.logsigmoid(h)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-h)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def answer_logps(logits: Tensor, targets: Tensor, answer: Tensor) -> Tensor:
    """Sum over each row of the log-probabilities of the target tokens where ``answer`` is set
    (the final answer and its EOS; prompt and padding count nothing), in float32. ``logits[b, t]``
    predicts ``targets[b, t]``."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(answer, logp, torch.zeros_like(logp)).sum(-1)


def pair_logps(model, batch: dict) -> tuple[Tensor, Tensor]:
    """(log pi(chosen), log pi(rejected)) for a batch of [chosen..., rejected...] rows, one forward."""
    logps = answer_logps(model(batch["tokens"]), batch["targets"], batch["answer"])
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]


def make_loss_fn(beta: float, label_smoothing: float = 0.0):
    """The trainer's ``loss_fn``: mean DPO loss of the micro-batch's pairs, with the rewards,
    their margin and accuracy (share of pairs whose chosen answer has the higher implicit
    reward) as metrics."""
    def loss_fn(model, batch: dict) -> tuple[Tensor, dict]:
        logp_c, logp_r = pair_logps(model, batch)
        losses, r_c, r_r = dpo_loss(logp_c, logp_r, batch["ref"][:, 0], batch["ref"][:, 1], beta, label_smoothing)
        return losses.mean(), {
            "rewards/chosen": r_c.mean(), "rewards/rejected": r_r.mean(), "rewards/margin": (r_c - r_r).mean(),
            "rewards/accuracy": (r_c > r_r).float().mean(), "logps/chosen": logp_c.detach().mean(),
            "logps/rejected": logp_r.detach().mean(), "ntokens": batch["answer"].shape[0] * batch["answer"].shape[1],
        }
    return loss_fn


# ---- the data ------------------------------------------------------------------------------------

def encode_answer(tokenizer, messages: Sequence[dict], answer: str) -> tuple[list[int], list[bool]]:
    """Token ids of the dialogue + answer in the chat format (as the SFT and reward stages encode
    it) and, per token, whether it belongs to the final answer (with its EOS): the tokens whose
    log-probabilities DPO sums. An earlier assistant turn of a multi-turn prompt is prompt."""
    segments = chat_segments(tokenizer, [*messages, {"role": "assistant", "content": answer}],
                             allow_final_assistant=True)
    last = segments[-1].turn
    ids, is_answer = [], []
    for seg in segments:
        ids += seg.ids
        is_answer += [seg.is_answer and seg.turn == last] * len(seg.ids)
    return ids, is_answer


class DPOPairs:
    """Tokenized pairs for the trainer's loaders: ``batch(indices)`` gives [chosen..., rejected...]
    rows right-padded, their next-token targets, the answer mask over the targets and the
    pairs' reference log-probabilities ``ref`` [B, 2] once :attr:`ref` is set."""

    def __init__(self, pairs: Sequence[Pair], tokenizer, max_len: int, name: str = "preference pairs"):
        self.rows: list[tuple[list[int], list[bool]]] = []
        self.truncated = 0
        for p in pairs:
            for answer in (p.chosen, p.rejected):
                ids, mask = encode_answer(tokenizer, p.messages, answer)
                if len(ids) > max_len:  # keep the end: the answer and its EOS
                    ids, mask, self.truncated = ids[-max_len:], mask[-max_len:], self.truncated + 1
                self.rows.append((ids, mask))
        self.seq_len, self.name = max_len, name
        self.ref: Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows) // 2

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ids, mask in self.rows:
            h.update(json.dumps([ids, [int(m) for m in mask]]).encode())
        return h.hexdigest()

    def encode(self, indices) -> dict:
        idx = [int(i) for i in indices]
        rows = [self.rows[2 * i] for i in idx] + [self.rows[2 * i + 1] for i in idx]
        width = max(len(ids) for ids, _ in rows) - 1
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.zeros(len(rows), width, dtype=torch.long)
        answer = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            tokens[r, :n] = torch.tensor(ids[:-1])
            targets[r, :n] = torch.tensor(ids[1:])
            answer[r, :n] = torch.tensor(mask[1:])
        return {"tokens": tokens, "targets": targets, "answer": answer}

    def batch(self, indices) -> dict:
        if self.ref is None:
            raise RuntimeError(f"{self.name}: reference log-probabilities not computed yet")
        out = self.encode(indices)
        out["ref"] = self.ref[torch.as_tensor([int(i) for i in indices], dtype=torch.long)]
        return out


def _split_files(spec: str) -> list[str]:
    return [f.strip() for f in spec.split(",") if f.strip()]


def load_dpo_pairs(cfg: DPOConfig) -> tuple[list[Pair], list[Pair]]:
    """(train, validation) pairs: the given files, or the bundled world's helpfulness and safety
    pairs (``world_pairs`` of each) with its validation pairs."""
    if cfg.data:
        train = [p for f in _split_files(cfg.data) for p in load_pairs(f)]
        if not train:
            raise DataError(f"{cfg.data}: no preference pairs found")
    else:
        world = World(cfg.world_seed)
        train = [parse_pair(r) for kind in ("helpfulness", "safety")
                 for r in world.preference_pairs("train", cfg.world_pairs, kind)]
    if cfg.val_data:
        val = [p for f in _split_files(cfg.val_data) for p in load_pairs(f)]
    elif not cfg.data:
        world = World(cfg.world_seed)
        val = [parse_pair(r) for kind in ("helpfulness", "safety")
               for r in world.preference_pairs("val", max(32, cfg.world_pairs // 20), kind)]
    else:
        val = []
    return train, val


# ---- the reference pass --------------------------------------------------------------------------

@torch.no_grad()
def reference_logps(model, data: DPOPairs, micro_batch_size: int, device, bf16: bool = False) -> Tensor:
    """[N, 2] float32 log-probabilities (chosen, rejected) of every pair's answers under ``model``,
    in one pass over ``data`` in order."""
    was_training = model.training
    model.eval()
    out = torch.empty(len(data), 2, dtype=torch.float32)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for start in range(0, len(data), micro_batch_size):
        idx = range(start, min(len(data), start + micro_batch_size))
        batch = {k: v.to(device) for k, v in data.encode(idx).items()}
        with autocast:
            c, r = pair_logps(model, batch)
        out[start:start + len(idx)] = torch.stack([c, r], dim=1).float().cpu()
    model.train(was_training)
    return out


def _model_fingerprint(cfg: DPOConfig, bf16: bool) -> dict:
    d = Path(cfg.model)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in d.iterdir() if f.is_file()) \
        if d.is_dir() else []
    return {"model": str(d.resolve()), "files": files, "lora": dataclasses.asdict(cfg.lora), "bf16": bf16, "max_len": cfg.max_len}


def _fingerprint(cfg: DPOConfig, bf16: bool, sets: Sequence[DPOPairs]) -> str:
    h = hashlib.sha256(json.dumps(_model_fingerprint(cfg, bf16)).encode())
    for s in sets:
        h.update(s.fingerprint().encode())
    return h.hexdigest()


def attach_reference(cfg: DPOConfig, model, sets: Sequence[DPOPairs], device, bf16: bool, is_main: bool,
                     log=print) -> None:
    """Set each dataset's ``ref``: read from ``OUT/reference_logps.pt`` if its fingerprint (model
    files, LoRA method, precision, tokenized pairs) matches, else computed with ``model`` and
    written there (by the main rank, atomically)."""
    file = Path(cfg.out) / REFERENCE_FILE
    key = _fingerprint(cfg, bf16, sets)
    cached = None
    if file.is_file():
        try:
            cached = load_tensors(file)
        except CheckpointError as e:  # torn or foreign: computed again
            log(f"warning: {e}; computing the reference log-probabilities again")
    if isinstance(cached, dict) and cached.get("fingerprint") == key:
        for i, s in enumerate(sets):
            s.ref = cached[f"set{i}"]
        log(f"reference log-probabilities read from {file}")
        return
    n = sum(len(s) for s in sets)
    log(f"reference pass: log-probabilities of {2 * n:,} answers under the frozen {cfg.model}")
    for s in sets:
        s.ref = reference_logps(model, s, cfg.micro_batch_size, device, bf16)
    if is_main:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        torch.save({"fingerprint": key, **{f"set{i}": s.ref for i, s in enumerate(sets)}}, tmp)
        os.replace(tmp, file)


# ---- the trainer ---------------------------------------------------------------------------------

class DPOTrainer(Trainer):
    """The shared trainer, with a validation that also reports the implicit-reward metrics."""

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.eval_data is None or self.cfg.eval_batches == 0:
            return {}
        self.model.eval()
        names = ("loss", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected")
        total = torch.zeros(len(names) + 1, device=self.device)
        per_rank = -(-self.cfg.eval_batches // self.dist.world_size)
        for batch in itertools.islice(iter(self.eval_data), per_rank):
            with self._autocast():
                loss, m = self.loss_fn(self.model, self.to_device(batch))
            total += torch.stack([loss.float(), *(torch.as_tensor(m[k], device=self.device).float()
                                                  for k in names[1:]), torch.ones((), device=self.device)])
        self.model.train()
        if self.dist.enabled:
            dist.all_reduce(total)
        if total[-1] == 0:
            return {}
        mean = (total[:-1] / total[-1]).tolist()
        # val_ppl only because the trainer's log lines print it: exp of a DPO loss means nothing.
        return {"val_loss": mean[0], "val_ppl": math.exp(min(mean[0], 50.0)),
                **{f"val_{k}": v for k, v in zip(names[1:], mean[1:])}}


def run(cfg: DPOConfig, quiet: bool = False) -> dict:
    check_resume(cfg.out, cfg.resume)  # refused before any work
    log = log_to_stderr(quiet)
    info = init_distributed()
    accum = grad_accum_steps(cfg.batch_size, cfg.micro_batch_size, info.world_size)  # fail before loading
    train_pairs, val_pairs = load_dpo_pairs(cfg)
    model = load_model(cfg.model, dtype=None, training=True)
    if model.config.max_seq_len < cfg.max_len:
        raise ValueError(f"max_len={cfg.max_len} exceeds the model's context ({model.config.max_seq_len}) in "
                         f"{cfg.model}")
    tokenizer = load_tokenizer(cfg.model, model.config.vocab_size)
    train = DPOPairs(train_pairs, tokenizer, cfg.max_len)
    val = DPOPairs(val_pairs, tokenizer, cfg.max_len, name="validation pairs") if val_pairs else None
    if train.truncated:
        log(f"warning: {train.truncated} of {2 * len(train)} dialogues + answers were longer than "
            f"max_len={cfg.max_len} and lost their beginning")
    loader = PackedLoader(train, cfg.micro_batch_size, grad_accum=accum, seed=cfg.seed, rank=info.rank,
                          world_size=info.world_size)
    steps = steps_for_epochs(cfg.max_steps, cfg.epochs, loader.steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_fraction * steps)
    tcfg = dataclasses.replace(cfg, max_steps=steps, warmup_steps=warmup)
    evals = EvalBatches(val, cfg.micro_batch_size, info.rank, info.world_size) if val is not None else None
    if evals is not None and len(evals) == 0:
        evals = None
    sets = [train] + ([val] if val is not None else [])
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and info.device.type == "cuda")
    n_params = model.num_params()
    if not cfg.lora.enabled:
        # Full fine-tuning: the reference is the model as loaded, before the trainer resumes
        # (and so changes) its weights. It then becomes the policy; no second copy is kept.
        model.to(info.device)
        attach_reference(cfg, model, sets, info.device, bf16, info.is_main, log)
    trainer = DPOTrainer(tcfg, model, make_loss_fn(cfg.beta, cfg.label_smoothing), loader, evals, run_config=cfg,
                         dist_info=info, quiet=quiet,
                         flops_per_token=transformer_flops_per_token(model.config, cfg.max_len,
                                                                     frozen_weights=cfg.lora.enabled))
    if cfg.lora.enabled:
        # LoRA/QLoRA: the reference is the policy with its adapters off (its frozen base as
        # trained over, NF4 included), whatever the adapters hold after a resume.
        with adapters_disabled(trainer.module):
            attach_reference(cfg, trainer.module, sets, info.device, bf16, info.is_main, log)
    barrier(info)
    log(f"DPO of {cfg.model} ({n_params / 1e6:,.1f}M parameters) on {len(train):,} pairs"
        f"{f' ({len(val):,} held out)' if val is not None else ''}, beta {cfg.beta:g}"
        f"{f', label smoothing {cfg.label_smoothing:g}' if cfg.label_smoothing else ''}; {steps} steps of "
        f"{cfg.batch_size} pairs")
    last = trainer.fit()
    path = trainer.export(Path(cfg.out) / "model", tokenizer=tokenizer, base=cfg.model)
    if "rewards/accuracy" in last:
        log(f"last step: loss {last['loss']:.4f}, reward accuracy {last['rewards/accuracy']:.1%}, margin "
            f"{last['rewards/margin']:.3f}")
    if "val_rewards/accuracy" in last:
        log(f"validation: loss {last['val_loss']:.4f}, reward accuracy {last['val_rewards/accuracy']:.1%}, "
            f"margin {last['val_rewards/margin']:.3f}")
    log(f"model written to {path}")
    return last


# ---- CLI ---------------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Without --config the tiny recipe's dpo block applies (src/llama2/resources/recipes/"
                     "tiny.yaml); the dataclass defaults are Tulu 2's for a 7B model.")
    add_config_args(parser, DPOConfig)


def main(args: argparse.Namespace) -> int:
    return stage_main(DPOConfig, args, "dpo", run)
