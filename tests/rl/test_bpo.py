"""Tests for megatron_autothink.rl.bpo."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_autothink.rl.advantages import group_advantages
from megatron_autothink.rl.bpo import bpo_advantages, per_mode_metrics


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
