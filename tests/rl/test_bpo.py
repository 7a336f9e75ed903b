"""Tests for megatron_autothink.rl.bpo."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_autothink.rl.advantages import group_advantages
from megatron_autothink.rl.bpo import (
    bpo_advantages,
    decision_position,
    decision_weights,
    per_mode_metrics,
)


def test_advantages_use_whole_mixed_group() -> None:
    # Thinking: rewards 1, 1; non-thinking: 1, 0. Mixed mean 0.75.
    r = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    m = torch.tensor([[True, True, False, False]])
    adv = bpo_advantages(r, m, std_normalize=False)
    assert adv.tolist() == [[0.25, 0.25, 0.25, -0.75]]
    # A per-mode baseline would give the thinking rollouts zero: the mode signal would vanish.
    per_mode_think = group_advantages(r[:, :2], std_normalize=False)
    assert per_mode_think.abs().sum() == 0
    # Thinking rollouts' total advantage is positive: the policy is pushed toward thinking.
    assert adv[m].sum() > 0


def test_advantages_std_normalize_and_all_equal() -> None:
    m = torch.tensor([[True, True, False, False]] * 2)
    r = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv = bpo_advantages(r, m, std_normalize=True, eps=0.0)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 1, 0, 0]
    torch.testing.assert_close(adv[0], torch.tensor([0.5 / s, 0.5 / s, -0.5 / s, -0.5 / s]))
    assert torch.equal(adv[1], torch.zeros(4))  # all-equal group: zero, not NaN


def test_advantages_one_mode_only_is_grpo() -> None:
    r = torch.tensor([[1.0, 0.0, 0.0]])
    m = torch.ones(1, 3, dtype=torch.bool)
    torch.testing.assert_close(
        bpo_advantages(r, m, std_normalize=True), group_advantages(r, std_normalize=True)
    )


def test_advantages_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        bpo_advantages(torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.bool), std_normalize=False)


def test_per_mode_metrics_hand_computed() -> None:
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    m = torch.tensor([[True, True, False, False], [True, True, False, False]])
    a = bpo_advantages(r, m, std_normalize=False)  # [[.75,-.25,-.25,-.25],[0,0,0,0]]
    n = torch.tensor([[100, 300, 10, 30], [200, 400, 20, 40]])
    out = per_mode_metrics(r, a, m, n)
    assert out["thinking/count"] == 4 and out["non_thinking/count"] == 4
    assert out["thinking/reward_mean"] == 0.75
    assert out["non_thinking/reward_mean"] == 0.5
    assert out["thinking/advantage_mean"] == pytest.approx(0.125)
    assert out["non_thinking/advantage_mean"] == pytest.approx(-0.125)
    assert out["thinking/length_mean"] == 250.0
    assert out["non_thinking/length_mean"] == 25.0
    assert out["thinking_share"] == 0.5
    # Group 0: thinking mean 0.5 > 0; group 1: tie.
    assert out["groups/thinking_better"] == 0.5
    assert out["groups/non_thinking_better"] == 0.0


def test_per_mode_metrics_one_mode_only() -> None:
    r = torch.tensor([[1.0, 0.0]])
    m = torch.tensor([[True, True]])
    out = per_mode_metrics(r, group_advantages(r, std_normalize=False), m, torch.tensor([[5, 7]]))
    assert out["thinking/reward_mean"] == 0.5 and out["thinking/length_mean"] == 6.0
    assert out["non_thinking/count"] == 0
    assert math.isnan(out["non_thinking/reward_mean"])
    assert math.isnan(out["groups/thinking_better"])
    assert out["thinking_share"] == 1.0


def test_per_mode_metrics_shape_check() -> None:
    with pytest.raises(ValueError):
        per_mode_metrics(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 3).bool(), torch.zeros(1, 2)
        )


def test_decision_weights_give_the_auto_policy_gradient() -> None:
    """Summed over a forced 2 + 2 group, the weighted decision terms equal the on-policy
    gradient ``sum_m pi(m) A(m) grad log pi(m)`` on the decision logit, for a settled and an
    unsettled policy; unweighted they are a fixed push whatever the policy prefers."""
    modes = torch.tensor([[True, True, False, False]])
    adv = torch.tensor([0.5, 0.5, -0.5, -0.5])  # thinking wins the group
    for logit in (-2.0, 0.0, 3.0):
        z = torch.tensor(logit, requires_grad=True)  # log-odds of thinking
        p_think = torch.sigmoid(z)
        logp = torch.stack([p_think, p_think, 1 - p_think, 1 - p_think]).log()
        w = decision_weights((1 - p_think).detach().reshape(1), modes)[0]
        (weighted,) = torch.autograd.grad((w * adv * logp).sum() / 4, z, retain_graph=True)
        (plain,) = torch.autograd.grad((adv * logp).sum() / 4, z)
        p = float(p_think)
        on_policy = p * 0.5 * (1 - p) + (1 - p) * -0.5 * -p  # = p (1 - p) dA, dA = 1
        assert float(weighted) == pytest.approx(on_policy, rel=1e-5)
        assert float(plain) == pytest.approx(0.25, rel=1e-5)  # q (1 - q) dA, any p


def test_decision_weights_need_both_modes_per_group() -> None:
    with pytest.raises(ValueError, match="both modes"):
        decision_weights(torch.tensor([0.5]), torch.tensor([[True, True]]))
    with pytest.raises(ValueError, match="p_nothink"):
        decision_weights(torch.tensor([0.5, 0.5]), torch.tensor([[True, False]]))


def test_decision_position_is_where_the_prefills_part() -> None:
    assert decision_position([775, 198], [775, 198, 198, 776, 198, 198]) == 2
    assert decision_position([151667, 198], [151667, 271, 151668, 271]) == 1
    with pytest.raises(ValueError, match="prefix"):
        decision_position([1, 2, 3], [1, 2])
