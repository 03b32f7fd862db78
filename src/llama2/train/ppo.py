"""``llama2 ppo``: proximal policy optimisation with the paper's reward (§3.2.3).

Each iteration:
1. sample a batch of prompts and answer them with the current policy (the batched KV-cache
   generator);
2. score the answers: Rc = Rs if the prompt is a safety prompt or Rs < 0.15, else Rh, then
   whiten(logit(Rc)) (rlhf.ppo_reward);
3. per-token rewards: -beta * (log pi - log pi_0) against the frozen starting policy on every
   answer token, plus the sequence score on the last one; advantages by GAE from a value
   model (initialised from the helpfulness reward model: it already reads answers);
4. one pass over the rollout in minibatches, one gradient step each, with the clipped policy
   and value losses (PPO clip 0.2).
Defaults are the paper's: AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, clip 1.0, constant LR
1e-6, batch 512, minibatch 64, beta 0.01 (0.005 for 34B/70B). Rollouts are seeded by
(seed, iteration), so a resumed run repeats exactly what the uninterrupted one would do.

On one GPU: ``--lora.method lora|qlora`` trains adapters; the reference is then the policy with
its adapters off and the value model the reward model's trunk with its own adapters;
``--quantize-rewards`` holds the reward models in NF4; ``--rollout-batch-size``,
``--micro-batch-size`` and ``--activation-checkpointing`` bound the KV cache and the update's
activations (``llama2 info --train ... --stage ppo`` plans them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from llama2.chat import encode_chat
from llama2.checkpoint import load_model, load_scalar_model, load_tokenizer, save_model
from llama2.checkpoint.safe import load_tensors, read_state_json, refuse_legacy, write_state_json
from llama2.generate import Generator, SamplingParams
from llama2.model.heads import ScalarModel
from llama2.model.lora import adapters_disabled
from llama2.recipe import add_config_args, setting
from llama2.scoring import RewardScorer, load_rl_prompts
from llama2.train.core import build_optimizer
from llama2.train.finetune import stage_main
from llama2.train.lora import LoraConfig, adapt, export_adapter, load_trainable, lora_setting, trainable_state
from llama2.train.rlhf import gae, masked_mean, ppo_policy_loss, ppo_reward, token_rewards, value_loss
from llama2.train.state import (
    RESUME_HELP,
    check_resume,
    checkpoint_folder,
    last_record,
    resolve_resume,
    rng_state,
    set_rng_state,
    truncate_metrics,
)
from llama2.utils import default_device, log_to_stderr


@dataclass
class PPOConfig:
    """Exactly the settings PPO reads; defaults are the paper's (§3.2.3). PPO is its own loop
    (rollout, score, update), not the :class:`~llama2.train.core.Trainer`'s: the learning rate is
    constant (no schedule, no warmup) and a minibatch is one forward pass (no micro-batches)."""

    out: str = setting("runs/ppo", "run folder: metrics.jsonl, checkpoints/, model/", metavar="DIR")
    model: str = setting("runs/rejection/model", "starting policy (also the frozen reference)", metavar="DIR")
    reward_model: str = setting("runs/reward-helpfulness/model", "helpfulness reward model", metavar="DIR")
    safety_model: str = setting("runs/reward-safety/model", "safety reward model; empty: helpfulness only",
                                metavar="DIR")
    value_init: Literal["reward", "policy"] = setting("reward", "initialise the value model from the helpfulness "
                                                                "reward model or from the policy's trunk")
    data: str = setting("", "prompts, JSONL {\"messages\"|\"prompt\", \"safety\": bool}; empty: the bundled world",
                        metavar="FILE")
    prompts: int = setting(4000, "prompts drawn from the bundled world when --data is empty")
    max_steps: int = setting(200, "PPO iterations (§3.2.3: 200 to 400, with early stopping)")
    batch_size: int = setting(512, "prompts per iteration (§3.2.3: 512)")
    minibatch_size: int = setting(64, "rollouts per gradient step (§3.2.3: 64; one step per minibatch)")
    micro_batch_size: int = setting(0, "rollouts per forward pass: each minibatch's gradient is accumulated over "
                                       "micro-batches of this many (and rollouts are scored this many at a time); "
                                       "0 = the whole minibatch in one pass")
    rollout_batch_size: int = setting(0, "prompts answered together (rows of the KV cache); 0 = the whole batch at "
                                         "once")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in backward (policy and "
                                                    "value model)")
    lr: float = setting(1e-6, "policy learning rate, constant (§3.2.3: 1e-6)")
    value_lr: float = setting(1e-6, "value-model learning rate, constant")
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only (§3.2.3: 0.1)")
    beta1: float = setting(0.9, "AdamW beta1 (§3.2.3)")
    beta2: float = setting(0.95, "AdamW beta2 (§3.2.3)")
    eps: float = setting(1e-5, "AdamW epsilon (§3.2.3)")
    grad_clip: float = setting(1.0, "clip each model's gradient norm to this (§3.2.3: 1.0); 0 = no clipping")
    kl_coef: float = setting(0.01, "beta of the KL penalty (§3.2.3: 0.01 for 7B/13B, 0.005 for 34B/70B)")
    safety_threshold: float = setting(0.15, "Rs below this lets the safety reward decide (§3.2.3)")
    ppo_clip: float = setting(0.2, "PPO ratio clip (§3.2.3: 0.2)")
    value_clip: float = setting(0.2, "value-prediction clip")
    gamma: float = setting(1.0, "discount")
    lam: float = setting(0.95, "GAE lambda")
    temperature: float = setting(1.0, "rollout sampling temperature")
    top_p: float = setting(1.0, "rollout nucleus sampling (1.0 = off)")
    max_new_tokens: int = setting(128, "longest answer in a rollout")
    max_kl: float = setting(10.0, "stop early when the mean per-answer KL to the reference exceeds this")
    seed: int = setting(0, "seed of the value head, the rollouts' prompts and samples, and the minibatch order")
    save_every: int = setting(10, "checkpoint every N iterations (and at the end); 0 = only at the end")
    keep_last: int = setting(3, "checkpoints to keep (older ones are deleted); 0 = keep all")
    resume: str = setting("auto", RESUME_HELP, const="latest", metavar="auto|latest|never|DIR")
    progress: bool = setting(True, "show a progress bar (when attached to a terminal)")
    world_seed: int = setting(0, "seed of the bundled assistant world")
    quantize_rewards: bool = setting(False, "hold the two frozen reward models with their linear weights in 4-bit "
                                            "NF4 (QLoRA's format): about a quarter of their bf16 memory")
    lora: LoraConfig = lora_setting()

    def __post_init__(self) -> None:
        problems = [f"{name} must be positive, got {getattr(self, name)}"
                    for name in ("max_steps", "batch_size", "minibatch_size", "max_new_tokens")
                    if getattr(self, name) <= 0]
        problems += [f"{name} must be positive, got {getattr(self, name)}" for name in ("lr", "value_lr")
                     if getattr(self, name) <= 0]
        problems += [f"{name} must be >= 0, got {getattr(self, name)}"
                     for name in ("save_every", "keep_last", "micro_batch_size", "rollout_batch_size")
                     if getattr(self, name) < 0]
        if not problems and self.batch_size % self.minibatch_size:
            problems.append(f"batch_size={self.batch_size} is not divisible by minibatch_size={self.minibatch_size}")
        if problems:
            raise ValueError("; ".join(problems))


def load_prompts(cfg: PPOConfig) -> list[dict]:
    return load_rl_prompts(cfg.data, cfg.prompts, cfg.world_seed)


def token_logprobs(model, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for every t, [B, T-1]."""
    logits = model(tokens[:, :-1])
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


def build_rollout(prompts: list[list[int]], answers: list[list[int]]) -> dict:
    """Right-padded prompt+answer rows and the mask of positions that predict an answer token:
    only those get policy gradient (prompt and padding never do)."""
    rows = [p + a for p, a in zip(prompts, answers)]
    T = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T - 1)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, len(p) - 1: len(r) - 1] = 1.0  # position t predicts token t+1
    return {"tokens": tokens, "mask": mask}


class PPOTrainer:
    def __init__(self, cfg: PPOConfig, quiet: bool = False):
        check_resume(cfg.out, cfg.resume)  # refused before loading five models
        self.cfg, self.log = cfg, log_to_stderr(quiet)
        self.out = Path(cfg.out)
        torch.manual_seed(cfg.seed)
        # All five models on one device: rollouts, scoring and the updates run on the GPU when
        # there is one, each model in the dtype it was saved in.
        self.device = device = default_device()
        lora = cfg.lora.enabled
        self.policy = load_model(cfg.model, device="cpu" if lora else device, training=True)
        self.tokenizer = load_tokenizer(cfg.model, self.policy.config.vocab_size)
        self.value = (load_scalar_model(cfg.reward_model, device="cpu" if lora else device)
                      if cfg.value_init == "reward" else ScalarModel.from_language_model(self.policy, seed=cfg.seed))
        if lora:
            # With LoRA the reference is the policy with its adapters off (one copy of the base,
            # §3.2.3's frozen pi_0), and the value model is the reward model's trunk with its own
            # adapters; QLoRA holds both bases in NF4. Blocks move to the GPU one at a time.
            adapt(self.policy, cfg.lora, cfg.seed, device=device)
            adapt(self.value, cfg.lora, cfg.seed + 1, device=device)
            self.reference = None
        else:
            self.reference = load_model(cfg.model, device=device).eval().requires_grad_(False)
        self.policy.train()
        self.value.train()
        self.policy.gradient_checkpointing = self.value.gradient_checkpointing = cfg.activation_checkpointing
        self.scorer = RewardScorer(cfg.reward_model, cfg.safety_model or None, device=device,
                                   quantize=cfg.quantize_rewards)
        self.opt_policy = build_optimizer(self.policy, cfg)
        self.opt_value = build_optimizer(self.value, dataclasses.replace(cfg, lr=cfg.value_lr))
        self.prompts = load_prompts(cfg)
        self.iteration = 0
        self._resume()

    # -- one iteration --------------------------------------------------------------------------
    def batch_prompts(self) -> list[dict]:
        rng = random.Random(f"{self.cfg.seed}/{self.iteration}")
        return rng.sample(self.prompts, min(self.cfg.batch_size, len(self.prompts)))

    @torch.no_grad()
    def rollout(self, batch: list[dict]) -> dict:
        cfg = self.cfg
        self.policy.eval()
        prompt_ids = [encode_chat(self.tokenizer, b["messages"]) for b in batch]
        gen = Generator(self.policy, self.tokenizer)
        t0 = time.perf_counter()
        # --rollout-batch-size bounds the KV cache (rows generated together); each further chunk
        # draws from its own seed.
        n, outs = cfg.rollout_batch_size or len(prompt_ids), []
        for c, i in enumerate(range(0, len(prompt_ids), n)):
            outs += gen.generate(prompt_ids[i:i + n], SamplingParams(
                temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                seed=cfg.seed * 1_000_003 + self.iteration + c * 1_000_000_007))
        gen_seconds = time.perf_counter() - t0
        # An answer that ended with EOS keeps it: emitting EOS is part of the policy's action.
        answers = [o.tokens + ([self.tokenizer.eos_id] if o.finish_reason == "stop" else []) for o in outs]
        answers = [a or [self.tokenizer.eos_id] for a in answers]
        t1 = time.perf_counter()
        s = self.scorer.combined([b["messages"] for b in batch], [o.text.strip() for o in outs],
                                 [b["safety"] for b in batch], cfg.safety_threshold)
        score_seconds = time.perf_counter() - t1
        roll = {k: v.to(self.device) for k, v in build_rollout(prompt_ids, answers).items()}
        roll["score"] = ppo_reward(s["helpful"], s["safety"], torch.tensor([b["safety"] for b in batch]),
                                   cfg.safety_threshold).to(self.device)
        # Old log-probs, reference log-probs and values one minibatch at a time: float32 logits of
        # all 512 rollouts at once would be the largest tensor of the whole run (8 bytes x vocab
        # per token, ~84 GB at 7B).
        def chunked(fn):
            n = cfg.micro_batch_size or cfg.minibatch_size
            return torch.cat([fn(roll["tokens"][i:i + n]) for i in range(0, len(roll["tokens"]), n)])

        roll["logp"] = chunked(lambda t: token_logprobs(self.policy, t))
        if self.reference is None:
            with adapters_disabled(self.policy):
                roll["ref_logp"] = chunked(lambda t: token_logprobs(self.policy, t))
        else:
            roll["ref_logp"] = chunked(lambda t: token_logprobs(self.reference, t))
        roll["values"] = chunked(lambda t: self.value(t[:, :-1]))
        self.policy.train()
        n_new = sum(len(a) for a in answers)
        stats = {f"reward_{k}": float(v.mean()) for k, v in s.items()}
        stats.update(answer_len=n_new / len(answers), rollout_tokens_per_s=n_new / max(gen_seconds, 1e-9),
                     generation_s=gen_seconds, scoring_s=score_seconds)
        return roll | {"stats": stats}

    def step(self) -> dict:
        cfg = self.cfg
        roll = self.rollout(self.batch_prompts())
        mask = roll["mask"]
        t0 = time.perf_counter()
        rewards, kl = token_rewards(roll["score"], roll["logp"], roll["ref_logp"], mask, cfg.kl_coef)
        adv, returns = gae(rewards, roll["values"], mask, cfg.gamma, cfg.lam)
        valid = mask.bool()
        adv = torch.where(valid, (adv - adv[valid].mean()) / (adv[valid].std() + 1e-8), adv) * mask
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.iteration)
        order = torch.randperm(len(mask), generator=gen)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        totals = {"policy_loss": 0.0, "value_loss": 0.0, "clip_frac": 0.0, "entropy": 0.0}
        n_mb = 0
        micro = cfg.micro_batch_size or cfg.minibatch_size
        for start in range(0, len(order), cfg.minibatch_size):  # one gradient step per minibatch
            idx = order[start:start + cfg.minibatch_size]
            n_answer = mask[idx].sum().clamp(min=1)
            self.opt_policy.zero_grad(set_to_none=True)
            self.opt_value.zero_grad(set_to_none=True)
            # The minibatch's gradient, accumulated over micro-batches of `micro` rollouts (one
            # forward pass each): each micro-batch's token-mean losses weighted by its share of the
            # minibatch's answer tokens sum to the minibatch's token means.
            for part in idx.split(micro):
                tokens, m = roll["tokens"][part], mask[part]
                share = m.sum() / n_answer if len(part) < len(idx) else 1.0
                logits = self.policy(tokens[:, :-1])
                logp_all = torch.log_softmax(logits.float(), dim=-1)
                logp = logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1)
                p_loss, clip_frac = ppo_policy_loss(logp, roll["logp"][part], adv[part], m, cfg.ppo_clip)
                entropy = masked_mean(-(logp_all.exp() * logp_all).sum(-1), m)
                values = self.value(tokens[:, :-1])
                v_loss = value_loss(values, roll["values"][part], returns[part], m, cfg.value_clip)
                (p_loss * share).backward()
                (v_loss * share).backward()
                for k, v in (("policy_loss", p_loss.detach()), ("value_loss", v_loss.detach()),
                             ("clip_frac", clip_frac), ("entropy", entropy.detach())):
                    totals[k] += float(v * share)
            for model, opt in ((self.policy, self.opt_policy), (self.value, self.opt_value)):
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                opt.step()
            n_mb += 1
        self.iteration += 1
        return {"iteration": self.iteration, **roll["stats"], "kl": float(kl.sum(1).mean()),
                "train_s": time.perf_counter() - t0, **{k: v / n_mb for k, v in totals.items()}}

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """``checkpoints/step-N`` (N = iteration), atomically, as the trainer writes its own."""
        with checkpoint_folder(self.out, self.iteration, self.cfg.keep_last) as tmp:
            lora = self.cfg.lora.enabled
            torch.save({"policy": trainable_state(self.policy, lora), "value": trainable_state(self.value, lora),
                        "opt_policy": self.opt_policy.state_dict(), "opt_value": self.opt_value.state_dict()},
                       tmp / "model.pt")
            # Tensors only (RNG states) in a .pt file, the rest in plain JSON: neither can run code.
            torch.save({"rng": rng_state()}, tmp / "rank-0.pt")
            # trainer.json is written last: it marks a complete checkpoint
            write_state_json(tmp / "trainer.json", {"step": self.iteration, "config": dataclasses.asdict(self.cfg)})
        return self.out / "checkpoints" / f"step-{self.iteration}"

    def _resume(self) -> None:
        path = resolve_resume(self.out, self.cfg.resume)
        if path is None:
            # Starting over: forget what an earlier run logged.
            truncate_metrics(self.out / "metrics.jsonl", "iteration", -1, self.log)
            return
        refuse_legacy(path)
        if not (path / "trainer.json").is_file():
            raise FileNotFoundError(f"{path}: not a checkpoint (no trainer.json)")
        trainer = read_state_json(path / "trainer.json")
        state = load_tensors(path / "model.pt", map_location=self.device)
        for name, model in (("policy", self.policy), ("value", self.value)):
            load_trainable(model, state[name], self.cfg.lora.enabled, path / f"model.pt[{name}]")
        self.opt_policy.load_state_dict(state["opt_policy"])
        self.opt_value.load_state_dict(state["opt_value"])
        self.iteration = trainer["step"]
        set_rng_state(load_tensors(path / "rank-0.pt")["rng"])
        # forget iterations logged after this checkpoint
        truncate_metrics(self.out / "metrics.jsonl", "iteration", self.iteration, self.log)
        self.log(f"resumed PPO from {path} (iteration {self.iteration})")

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict:
        # Resumed: the last iteration's record, what the interrupted run would have returned.
        cfg, last = self.cfg, last_record(self.out / "metrics.jsonl") if self.iteration else {}
        self.out.mkdir(parents=True, exist_ok=True)
        self.log(f"PPO from {cfg.model}: {cfg.max_steps} iterations of {cfg.batch_size} prompts, minibatch "
                 f"{cfg.minibatch_size}, beta {cfg.kl_coef}, safety threshold {cfg.safety_threshold}")
        bar = tqdm(total=cfg.max_steps, initial=self.iteration, unit="iter", disable=not cfg.progress or None)
        # An early stop is final: a run resumed from its checkpoint does not train on.
        while self.iteration < cfg.max_steps and not last.get("kl", 0.0) > cfg.max_kl:
            last = self.step()
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(last) + "\n")
            bar.set_postfix(reward=f"{last['reward_combined']:.3f}", kl=f"{last['kl']:.3f}")
            bar.update(1)
            stop = last["kl"] > cfg.max_kl
            if stop or self.iteration == cfg.max_steps or (cfg.save_every and self.iteration % cfg.save_every == 0):
                self.save_checkpoint()
            if stop:
                self.log(f"early stop: KL {last['kl']:.3f} > max_kl {cfg.max_kl}")
                break
        bar.close()
        if self.cfg.lora.enabled:
            export_adapter({k: v.cpu() for k, v in trainable_state(self.policy, True).items()}, cfg.lora, cfg.model,
                           self.out, tokenizer=self.tokenizer, max_len=self.policy.config.max_seq_len)
        else:
            save_model(self.policy, self.out / "model", tokenizer=self.tokenizer)
        self.log(f"PPO policy written to {self.out / 'model'}")
        return last


def run(cfg: PPOConfig, quiet: bool = False) -> dict:
    return PPOTrainer(cfg, quiet).fit()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Without --config the tiny recipe's ppo block applies "
                     "(src/llama2/resources/recipes/tiny.yaml).")
    add_config_args(parser, PPOConfig)


def main(args: argparse.Namespace) -> int:
    return stage_main(PPOConfig, args, "ppo", run, required=("model", "reward_model", "safety_model"))
