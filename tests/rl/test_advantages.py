"""Tests for megatron_autothink.rl.advantages."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_autothink.rl.advantages import group_advantages, zero_advantage_group_mask


def _reference(rewards: list[list[float]], std_normalize: bool, eps: float) -> list[list[float]]:
    """Per-group loop written straight from the GRPO formula (arXiv 2402.03300)."""
    out = []
    for row in rewards:
        n = len(row)
        mean = sum(row) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (n - 1))
        out.append([(x - mean) / (std + eps) if std_normalize else x - mean for x in row])
    return out


def test_mean_only_hand_computed() -> None:
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(r, std_normalize=False)
    assert adv.tolist() == [[0.75, -0.25, -0.25, -0.25], [-0.75, 0.25, 0.25, 0.25]]


def test_std_normalized_hand_computed() -> None:
    # [1, 0, 0, 0]: mean 0.25, unbiased std = sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), std_normalize=True, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[1.5, -0.5, -0.5, -0.5]]))


@pytest.mark.parametrize("std_normalize", [True, False])
def test_matches_loop_reference(std_normalize: bool) -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 3, (16, 8), generator=g).double() * 0.5
    expected = torch.tensor(_reference(r.tolist(), std_normalize, 1e-6), dtype=torch.float64)
    torch.testing.assert_close(group_advantages(r, std_normalize=std_normalize), expected)


@pytest.mark.parametrize("std_normalize", [True, False])
def test_all_equal_rewards_give_zero_not_nan(std_normalize: bool) -> None:
    adv = group_advantages(torch.full((3, 5), 0.7), std_normalize=std_normalize)
    assert torch.equal(adv, torch.zeros(3, 5))


def test_single_response_group_is_zero() -> None:
    adv = group_advantages(torch.tensor([[1.0], [0.0]]), std_normalize=True)
    assert torch.equal(adv, torch.zeros(2, 1))


def test_dtypes() -> None:
    assert group_advantages(torch.tensor([[1, 0]]), std_normalize=False).dtype == torch.float32
    r64 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert group_advantages(r64, std_normalize=True).dtype == torch.float64
    assert group_advantages(r64.half(), std_normalize=True).dtype == torch.float32


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), std_normalize=False)
    with pytest.raises(ValueError):
        zero_advantage_group_mask(torch.zeros(2, 2, 2))


def test_zero_advantage_mask() -> None:
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-0.1, -0.1, 0.0]])
    mask = zero_advantage_group_mask(r)
    assert mask.tolist() == [True, True, False, False]
    # Advantages of the flagged groups are exactly zero, so dropping them loses nothing.
    adv = group_advantages(r, std_normalize=True)
    assert torch.all(adv[mask] == 0) and torch.all(adv[~mask].abs().sum(dim=1) > 0)
