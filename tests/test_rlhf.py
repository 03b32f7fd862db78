"""The paper's RLHF formulas on hand-made numbers (§3.2.2, §3.2.3)."""

import math

import pytest
import torch

from llama2.data.preference import margin_for
from llama2.train.rlhf import (
    combine_rewards,
    gae,
    logit,
    ppo_policy_loss,
    ppo_reward,
    ranking_loss,
    token_rewards,
    value_loss,
    whiten,
)


def test_margin_tables_follow_table_27():
    assert [margin_for(r, "small") for r in ("significantly_better", "better", "slightly_better", "unsure")] == [
        1.0, 2 / 3, 1 / 3, 0.0]
    assert [margin_for(r, "large") for r in ("significantly_better", "better", "slightly_better", "negligibly_better")] == [
        3.0, 2.0, 1.0, 0.0]
    assert margin_for("better", "none") == 0.0
    with pytest.raises(ValueError, match="unknown rating"):
        margin_for("much_better")


def test_ranking_loss_is_minus_log_sigmoid_of_the_margin_gap():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0])
    margin = torch.tensor([1.0, 0.0])
    expected = (-math.log(1 / (1 + math.exp(-0.0))) - math.log(1 / (1 + math.exp(0.5)))) / 2
    assert ranking_loss(chosen, rejected, margin).item() == pytest.approx(expected, rel=1e-6)
    # a margin makes the same gap cost more
    assert ranking_loss(chosen, rejected, 1.0) > ranking_loss(chosen, rejected, 0.0)


def test_safety_reward_wins_on_safety_prompts_or_below_the_threshold():
    rh = torch.tensor([0.9, 0.9, 0.9, 0.9])
    rs = torch.tensor([0.8, 0.10, 0.8, 0.14])
    is_safety = torch.tensor([True, False, False, False])
    assert combine_rewards(rh, rs, is_safety).tolist() == pytest.approx([0.8, 0.10, 0.9, 0.14])
    assert combine_rewards(rh, rs, is_safety, threshold=0.05).tolist() == pytest.approx([0.8, 0.9, 0.9, 0.9])


def test_whitening_gives_zero_mean_unit_variance():
    w = whiten(torch.tensor([1.0, 2.0, 3.0, 10.0]))
    assert w.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert w.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_ppo_reward_is_whitened_logit_of_the_gated_score():
    rh, rs, safe = torch.tensor([0.7, 0.2, 0.9]), torch.tensor([0.5, 0.05, 0.6]), torch.tensor([False, False, True])
    gated = torch.tensor([0.7, 0.05, 0.6])
    expected = whiten(torch.log(gated / (1 - gated)))
    torch.testing.assert_close(ppo_reward(rh, rs, safe), expected)
    assert logit(torch.tensor(0.5)).item() == 0.0


def test_token_rewards_put_the_score_on_the_last_answer_token_and_kl_everywhere():
    score = torch.tensor([2.0])
    logp, ref = torch.tensor([[0.0, -1.0, -2.0, 0.0]]), torch.tensor([[0.0, -1.5, -1.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    rewards, kl = token_rewards(score, logp, ref, mask, kl_coef=0.1)
    assert kl.tolist() == [[0.0, 0.5, -1.0, 0.0]]
    assert rewards[0].tolist() == pytest.approx([0.0, -0.05, 0.1 + 2.0, 0.0])


def _gae_loop(r, v, gamma, lam):
    adv, running = [0.0] * len(r), 0.0
    for t in reversed(range(len(r))):
        nv = v[t + 1] if t + 1 < len(r) else 0.0
        running = r[t] + gamma * nv - v[t] + gamma * lam * running
        adv[t] = running
    return adv


def test_gae_equals_a_direct_loop_on_each_answer():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.float)
    adv, ret = gae(rewards * mask, values, mask, gamma=0.99, lam=0.9)
    for b in range(3):
        idx = mask[b].nonzero().flatten().tolist()
        ref = _gae_loop(rewards[b, idx].tolist(), values[b, idx].tolist(), 0.99, 0.9)
        assert adv[b, idx].tolist() == pytest.approx(ref, rel=1e-5, abs=1e-6)
        assert (adv[b][mask[b] == 0] == 0).all()
    torch.testing.assert_close(ret, (adv + values) * mask)


def test_ppo_policy_loss_on_a_hand_computed_example():
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding: no gradient, not counted
    loss, clip_frac = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # token 1: ratio 1.5, A=1 -> min(1.5, 1.2) = 1.2 ; token 2: ratio 0.5, A=-1 -> min(-0.5, -0.8) = -0.8
    assert loss.item() == pytest.approx(-(1.2 + -0.8) / 2)
    assert clip_frac.item() == pytest.approx(1.0)


def test_padding_and_prompt_tokens_get_no_policy_gradient():
    logp = torch.zeros(1, 4, requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    loss, _ = ppo_policy_loss(logp, torch.zeros(1, 4), torch.ones(1, 4), mask)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 3] == 0 and logp.grad[0, 1] != 0


def test_value_loss_clips_large_updates():
    v, old, ret, mask = torch.tensor([[3.0]]), torch.tensor([[0.0]]), torch.tensor([[3.0]]), torch.ones(1, 1)
    # unclipped error 0, clipped prediction 0.2 -> error 2.8^2; the larger is used
    assert value_loss(v, old, ret, mask, clip=0.2).item() == pytest.approx(0.5 * 2.8**2)


def test_centering_penalty_is_the_mean_squared_sum_of_a_pairs_scores():
    from llama2.train.rlhf import centering_penalty

    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 1.5])
    assert centering_penalty(chosen, rejected).item() == pytest.approx((0.0 + 4.0) / 2)
    # a shift of both scores leaves the ranking loss unchanged but not the penalty
    assert ranking_loss(chosen + 3, rejected + 3).item() == pytest.approx(ranking_loss(chosen, rejected).item())
    assert centering_penalty(chosen + 3, rejected + 3) > centering_penalty(chosen, rejected)
