"""Tests for megatron_autothink.rl.losses."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from megatron_autothink.rl.losses import policy_loss

CLIP: dict[str, Any] = {"clip_low": 0.2, "clip_high": 0.35}


def _batch(seed: int = 0, bsz: int = 4, seq: int = 6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(bsz, seq, generator=g, dtype=torch.float64) * 3
    logp = (old + 0.4 * torch.randn(bsz, seq, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(bsz, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 1, 4])[:bsz]
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    return logp, old, adv, mask


def test_hand_computed_loss_and_grads() -> None:
    # Row 0 (A = +1): ratios e^0.5 = 1.6487 (clipped to 1.35), e^-0.5 = 0.6065 (not clipped for
    # A > 0). Row 1 (A = -2): ratio e^-0.5 (clipped at 0.8), padding token.
    logp = torch.tensor([[0.5, -0.5], [-0.5, 9.0]], requires_grad=True)
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, True], [True, False]])
    loss, m = policy_loss(logp, old, adv, mask, num_tokens_global=3, **CLIP)
    r = math.exp(-0.5)
    expected = (-(1.35) - r + 2.0 * 0.8) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # d/dlogp of -A * rho / 3 = -A * rho / 3 where unclipped; 0 where clipped or padded.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -r / 3], [0.0, 0.0]]))
    assert m["clip_frac_high"].item() == pytest.approx(1 / 3)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 3)
    assert m["ratio_max"].item() == pytest.approx(math.exp(0.5))
    assert m["ratio_mean"].item() == pytest.approx((math.exp(0.5) + 2 * r) / 3)
    k3 = lambda x: math.exp(x) - 1 - x  # noqa: E731 - (ratio - 1) - log ratio
    assert m["approx_kl"].item() == pytest.approx((k3(0.5) + 2 * k3(-0.5)) / 3, rel=1e-5)
    assert m["loss"].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("log_ratio", "adv", "clipped"),
    [
        (math.log(1.30), 1.0, False),  # inside 1 + 0.35
        (math.log(1.40), 1.0, True),  # above 1 + clip_high, A > 0: clipped
        (math.log(1.40), -1.0, False),  # above, A < 0: never clipped (pessimistic bound)
        (math.log(0.85), -1.0, False),  # inside 1 - 0.2
        (math.log(0.75), -1.0, True),  # below 1 - clip_low, A < 0: clipped
        (math.log(0.75), 1.0, False),  # below, A > 0: not clipped
    ],
)
def test_clip_at_both_epsilons(log_ratio: float, adv: float, clipped: bool) -> None:
    logp = torch.tensor([[log_ratio]], requires_grad=True)
    loss, m = policy_loss(
        logp,
        torch.zeros(1, 1),
        torch.tensor([adv]),
        torch.ones(1, 1, dtype=torch.bool),
        num_tokens_global=1,
        **CLIP,
    )
    loss.backward()
    assert logp.grad is not None
    assert (logp.grad.abs().item() == 0.0) is clipped
    frac = m["clip_frac_high"].item() + m["clip_frac_low"].item()
    assert frac == (1.0 if clipped else 0.0)
    if clipped:
        bound = 1.35 if adv > 0 else 0.8
        assert loss.item() == pytest.approx(-adv * bound)


def test_asymmetric_vs_symmetric_clip() -> None:
    logp = torch.tensor([[math.log(1.3)]])
    args = (logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool))
    asym, _ = policy_loss(*args, clip_low=0.2, clip_high=0.35, num_tokens_global=1)
    sym, _ = policy_loss(*args, clip_low=0.2, clip_high=0.2, num_tokens_global=1)
    assert asym.item() == pytest.approx(-1.3)
    assert sym.item() == pytest.approx(-1.2)


def test_global_token_normalisation_microbatch_split() -> None:
    logp, old, adv, mask = _batch()
    ref = old + 0.1
    nll = torch.tensor([True, False, True, False])
    n = int(mask.sum())
    kw = dict(num_tokens_global=n, ref_logp=ref, kl_coef=0.01, nll_coef=0.05, **CLIP)
    whole, m_whole = policy_loss(logp, old, adv, mask, nll_mask=nll, **kw)
    (g_whole,) = torch.autograd.grad(whole, logp)

    parts: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    metric_sums: dict[str, torch.Tensor] = {}
    for sl in (slice(0, 1), slice(1, 4)):  # uneven split, different padding
        kw_part = dict(kw, ref_logp=ref[sl])
        loss, m = policy_loss(logp[sl], old[sl], adv[sl], mask[sl], nll_mask=nll[sl], **kw_part)
        parts.append(loss)
        grads.append(torch.autograd.grad(loss, logp)[0])
        for k, v in m.items():
            if k != "ratio_max":
                metric_sums[k] = metric_sums.get(k, torch.zeros(())) + v
    torch.testing.assert_close(parts[0] + parts[1], whole)
    torch.testing.assert_close(grads[0] + grads[1], g_whole)
    for k, v in metric_sums.items():  # mean-type metrics are sum-reducible too
        torch.testing.assert_close(v, m_whole[k], msg=k)


def test_padding_garbage_does_not_leak() -> None:
    logp, old, adv, mask = _batch()
    dirty = logp.detach().clone()
    dirty[~mask] = float("inf")
    old_dirty = old.clone()
    old_dirty[~mask] = float("-inf")
    dirty.requires_grad_()
    loss_clean, _ = policy_loss(logp, old, adv, mask, num_tokens_global=mask.sum(), **CLIP)
    loss_dirty, m = policy_loss(dirty, old_dirty, adv, mask, num_tokens_global=mask.sum(), **CLIP)
    torch.testing.assert_close(loss_dirty, loss_clean)
    loss_dirty.backward()
    assert torch.isfinite(dirty.grad).all() and torch.all(dirty.grad[~mask] == 0)
    assert all(torch.isfinite(v) for v in m.values())


def test_k3_kl_term() -> None:
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    zero_adv = torch.zeros(1)
    loss, m = policy_loss(
        logp,
        logp.detach(),
        zero_adv,
        mask,
        num_tokens_global=2,
        ref_logp=ref,
        kl_coef=0.5,
        **CLIP,
    )
    d = -0.5  # ref - logp on token 0; token 1 has d = 0 and k3 = 0
    k3 = math.exp(d) - d - 1
    assert m["kl_loss"].item() == pytest.approx(k3 / 2)
    assert loss.item() == pytest.approx(0.5 * k3 / 2)
    loss.backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.5 * (1 - math.exp(d)) / 2, 0.0]]))


def test_dual_clip_bounds_negative_advantage_tokens() -> None:
    # A = -1 on three tokens with ratios 2, 4 and e^30 (an off-policy replay gone far):
    # * ratio 2 < c = 3: PPO's max keeps -A * 2 = 2 with gradient -A * rho = 2 (per token / 3);
    # * ratio 4 > c: dual-clip caps the loss at -A * c = 3, no gradient;
    # * log-ratio 30 is clamped to 20 first (verl), then capped at 3 as well.
    logp = torch.tensor([[math.log(2.0), math.log(4.0), 30.0]], requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, m = policy_loss(
        logp, torch.zeros(1, 3), torch.tensor([-1.0]), mask, num_tokens_global=3, **CLIP
    )
    assert loss.item() == pytest.approx((2.0 + 3.0 + 3.0) / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[2.0 / 3, 0.0, 0.0]]))
    assert m["clip_frac_dual"].item() == pytest.approx(2 / 3)
    # Positive advantages are untouched by c: ratio 4 > 1.35 is PPO-clipped to -1.35 as before.
    pos, m_pos = policy_loss(
        logp.detach(), torch.zeros(1, 3), torch.tensor([1.0]), mask, num_tokens_global=3, **CLIP
    )
    assert pos.item() == pytest.approx(-1.35)
    assert m_pos["clip_frac_dual"].item() == 0.0
    # A larger c lets the ratio-4 token back in: loss (2 + 4 + 5) / 3, gradient on both.
    wide, _ = policy_loss(
        logp.detach(),
        torch.zeros(1, 3),
        torch.tensor([-1.0]),
        mask,
        num_tokens_global=3,
        clip_ratio_c=5.0,
        **CLIP,
    )
    assert wide.item() == pytest.approx((2.0 + 4.0 + 5.0) / 3)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss(
            logp, torch.zeros(1, 3), torch.tensor([-1.0]), mask, num_tokens_global=3,
            clip_ratio_c=1.0, **CLIP,
        )  # fmt: skip


def test_zero_advantage_overflowing_ratio_is_finite() -> None:
    # log-ratio 100 would give exp = inf and 0 * inf = NaN without the [-20, 20] clamp.
    logp = torch.tensor([[100.0]], requires_grad=True)
    loss, _ = policy_loss(
        logp, torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1, dtype=torch.bool),
        num_tokens_global=1, **CLIP,
    )  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and logp.grad.item() == 0.0


def test_k3_kl_is_bounded_like_verl() -> None:
    # ref - logp = 3 gives e^3 - 3 - 1 = 16.09 > 10: capped at 10 with no gradient; a token with
    # ref - logp = 25 is clamped to 20 first (e^20 would dwarf every other token), then capped.
    # Token 0 (d = 0.5) is unbounded: k3 = e^0.5 - 1.5 = 0.1487, gradient 1 - e^0.5 (/ 3 tokens).
    logp = torch.tensor([[-0.5, -3.0, -25.0]], requires_grad=True)
    ref = torch.zeros(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, m = policy_loss(
        logp, logp.detach(), torch.zeros(1), mask, num_tokens_global=3, ref_logp=ref,
        kl_coef=1.0, **CLIP,
    )  # fmt: skip
    k3_0 = math.exp(0.5) - 1.5
    assert m["kl_loss"].item() == pytest.approx((k3_0 + 10.0 + 10.0) / 3, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[(1 - math.exp(0.5)) / 3, 0.0, 0.0]]))


def test_kl_is_reported_but_inactive_with_zero_coef() -> None:
    logp, old, adv, mask = _batch()
    base, _ = policy_loss(logp, old, adv, mask, num_tokens_global=10, **CLIP)
    with_ref, m = policy_loss(logp, old, adv, mask, num_tokens_global=10, ref_logp=old, **CLIP)
    torch.testing.assert_close(base, with_ref)
    assert m["kl_loss"].item() > 0


def test_nll_term() -> None:
    logp = torch.tensor([[-1.0, -3.0], [-2.0, -4.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    loss, m = policy_loss(
        logp,
        logp.detach(),
        torch.zeros(2),
        mask,
        num_tokens_global=3,
        nll_mask=torch.tensor([True, False]),
        nll_coef=0.05,
        **CLIP,
    )
    assert m["nll_loss"].item() == pytest.approx(4.0 / 3)
    assert loss.item() == pytest.approx(0.05 * 4.0 / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.05 / 3, -0.05 / 3], [0.0, 0.0]]))
    # VL-Rethinker's per-NLL-token mean: pass the NLL token count.
    _, m2 = policy_loss(
        logp,
        logp.detach(),
        torch.zeros(2),
        mask,
        num_tokens_global=3,
        nll_mask=torch.tensor([True, False]),
        nll_coef=0.05,
        num_nll_tokens_global=2,
        **CLIP,
    )
    assert m2["nll_loss"].item() == pytest.approx(2.0)


def test_argument_checks() -> None:
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError):
        policy_loss(logp, old[:, :-1], adv, mask, num_tokens_global=1, **CLIP)
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv[:-1], mask, num_tokens_global=1, **CLIP)
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, num_tokens_global=0, **CLIP)
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, num_tokens_global=1, nll_mask=mask[:, :-1], **CLIP)


def test_per_token_advantages_equal_broadcast_sequence_advantages() -> None:
    """Packed rows carry one advantage per token; a [B] advantage broadcast is the same loss."""
    logp, old, adv, mask = _batch()
    per_token = adv[:, None].expand_as(logp).clone()
    nll_seq = adv > 0
    a, ma = policy_loss(
        logp, old, adv, mask, num_tokens_global=9, nll_mask=nll_seq, nll_coef=0.1, **CLIP
    )
    b, mb = policy_loss(
        logp,
        old,
        per_token,
        mask,
        num_tokens_global=9,
        nll_mask=nll_seq[:, None].expand_as(mask),
        nll_coef=0.1,
        **CLIP,
    )
    torch.testing.assert_close(a, b)
    assert ma.keys() == mb.keys()


def test_empty_microbatch_contributes_zero() -> None:
    logp, old, adv, mask = _batch()
    loss, m = policy_loss(logp, old, adv, torch.zeros_like(mask), num_tokens_global=7, **CLIP)
    assert loss.item() == 0.0 and m["ratio_max"].item() == 0.0
    loss.backward()
    assert torch.all(logp.grad == 0)
