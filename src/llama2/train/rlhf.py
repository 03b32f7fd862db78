"""The paper's RLHF formulas, shared by reward-model training, rejection sampling and PPO.

Plain functions on tensors so each is unit-tested against hand computations. The gated
reward Rc (:func:`combine_rewards`, §3.2.3) lives with the reward scorer in
:mod:`llama2.scoring`, since evaluation reads it too; it is imported here with the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llama2.scoring import combine_rewards


def ranking_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float = 0.0) -> Tensor:
    """§3.2.2: L = -log(sigmoid(r(x, y_c) - r(x, y_r) - m(r))), averaged over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def centering_penalty(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Mean of (r_chosen + r_rejected)^2: pulls the scores of a pair around zero. The ranking loss
    only sees differences, so without it the absolute level drifts, and the safety gate
    ``Rs < 0.15`` (§3.2.3) reads an absolute level (Eisenstein et al. 2023; TRL's
    ``center_rewards_coefficient``)."""
    return ((r_chosen + r_rejected) ** 2).mean()


def whiten(x: Tensor, eps: float = 1e-8, shift_mean: bool = True) -> Tensor:
    """Zero mean (optional), unit variance over the batch."""
    mean, var = x.mean(), x.var(unbiased=False)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def logit(p: Tensor, eps: float = 1e-6) -> Tensor:
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def ppo_reward(r_helpful: Tensor, r_safety: Tensor, is_safety: Tensor, threshold: float = 0.15) -> Tensor:
    """The sequence-level reward before the KL term: whiten(logit(Rc)) (§3.2.3)."""
    return whiten(logit(combine_rewards(r_helpful, r_safety, is_safety, threshold)))


def token_rewards(score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards: -kl_coef * (log pi - log pi_0) on every answer token, plus the sequence
    score on the last one. Returns (rewards [B, T], per-token KL [B, T])."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = mask.long().cumsum(1).argmax(1)  # index of each row's last answer token
    rewards[torch.arange(len(score), device=score.device), last] += score
    return rewards * mask, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over answer tokens. Returns (advantages, returns)."""
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0)
        adv[:, t] = last * mask[:, t]
    return adv, (adv + values) * mask


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def ppo_policy_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, clip: float = 0.2) -> tuple[Tensor, Tensor]:
    """Clipped surrogate objective (PPO clip 0.2 in §3.2.3). Returns (loss, clip fraction)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2) -> Tensor:
    """Clipped value loss: the larger of the plain and clipped squared errors, halved."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
