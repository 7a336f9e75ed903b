r"""Clipped policy-gradient loss (PPO/GRPO with clip-higher, dual-clip and a bounded k3 KL).

Loss (per response token ``t`` of sequence ``b``, ratio ``rho = exp(logp - old_logp)``)::

    pg[b, t] = max(-A_b * rho, -A_b * clip(rho, 1 - clip_low, 1 + clip_high))

* PPO clipping with *separate* low/high epsilons ("clip-higher", DAPO arXiv 2503.14476);
  VL-Rethinker (arXiv 2504.08837) uses low 0.2 / high 0.35. ``clip_low == clip_high`` is GRPO's
  symmetric clip (arXiv 2402.03300).
* Dual-clip for negative advantages (Ye et al., arXiv 1912.09729; verl's ``clip_ratio_c``,
  default 3): for ``A < 0`` the loss is capped at ``-A * clip_ratio_c``. PPO's pessimistic max
  never clips a negative-advantage token whose ratio is *above* ``1 + clip_high``, so an
  off-policy sample (an SSR replay) with a huge ratio would otherwise push with an unbounded
  ``-A * rho`` gradient. Beyond ``c`` the token's loss is constant (no gradient).
* The log-ratio is clamped to ``[-20, 20]`` before ``exp`` (as verl does): a token with
  ``A == 0`` and an overflowing ratio would otherwise give ``0 * inf = NaN``.
* Token-level aggregation (DAPO): the *sum* over all response tokens divided by
  ``num_tokens_global``, the number of response tokens in the whole optimizer step (all
  micro-batches on all data-parallel ranks). Each micro-batch's loss is then an additive share,
  so summing gradients across micro-batches and ranks gives exactly the full-batch gradient,
  whatever the padding or split. (A per-micro-batch mean would overweight short micro-batches.)
* Optional k3 KL to a reference policy (GRPO): ``exp(ref - logp) - (ref - logp) - 1`` per token,
  unbiased and non-negative; LMM-R1 (arXiv 2503.07536) uses an initial coefficient of 0.001,
  VL-Rethinker uses 0. Bounded as verl's ``low_var_kl``: ``ref - logp`` clamped to
  ``[-20, 20]`` and k3 to at most 10 (:func:`k3_kl`), so a token the policy has moved far from
  the reference contributes a bounded, gradient-free penalty instead of ``exp(20)``.
* Optional auxiliary NLL (VL-Rethinker): ``-logp`` on the tokens of chosen sequences (correct
  responses with positive advantage), coefficient 0.05. Its normaliser defaults to
  ``num_tokens_global``; pass the global count of NLL tokens as ``num_nll_tokens_global`` to
  get VL-Rethinker's per-NLL-token mean instead (their released loss averages over those
  tokens only).

All mean-type metrics are divided by ``num_tokens_global`` as well, so they are *sum-reducible*
like the loss: summing them over micro-batches and ranks gives the global mean. ``ratio_max``
is max-reducible.
"""

from __future__ import annotations

import torch


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where instead of multiplication: padded positions may hold inf/NaN (e.g. exp of a
    # garbage log-ratio) and inf * 0 would poison the sum with NaN.
    return torch.where(mask, values, torch.zeros_like(values)).sum()


LOG_RATIO_BOUND = 20.0
"""Log-ratios (policy vs old, reference vs policy) are clamped to +-this before ``exp`` (verl)."""
K3_MAX = 10.0
"""Upper bound of the per-token k3 KL (verl's ``low_var_kl``)."""


def k3_kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || ref), bounded as verl's ``low_var_kl``.

    ``d = clamp(ref - logp, -20, 20)``, ``k3 = min(exp(d) - d - 1, 10)`` (Schulman's k3,
    http://joschu.net/blog/kl-approx.html; GRPO arXiv 2402.03300 eq. 4). Where a clamp is
    active the token has no gradient.

    Example:
        ``d = 0.5``: e^0.5 - 0.5 - 1 = 0.1487. ``d = 3``: e^3 - 4 = 16.09, capped at 10.
        ``d = 30``: clamped to 20 first, then capped at 10.

        >>> logp = torch.tensor([-0.5, -3.0, -30.0], requires_grad=True)
        >>> kl = k3_kl(torch.zeros(3), logp)
        >>> [round(x, 4) for x in kl.tolist()]
        [0.1487, 10.0, 10.0]
        >>> kl.sum().backward(); [round(x, 4) + 0.0 for x in logp.grad.tolist()]  # 1 - e^d, 0
        [-0.6487, 0.0, 0.0]
    """
    d = (ref_logp.detach() - logp).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return (torch.exp(d) - d - 1.0).clamp(max=K3_MAX)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    num_tokens_global: float | int,
    clip_ratio_c: float = 3.0,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    nll_mask: torch.Tensor | None = None,
    nll_coef: float = 0.0,
    num_nll_tokens_global: float | int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Asymmetric-clip PPO/GRPO loss with token-sum / global-token normalisation.

    See the module docstring for the formula and sources (DAPO arXiv 2503.14476, VL-Rethinker
    arXiv 2504.08837, GRPO arXiv 2402.03300).

    Args:
        logp: [B, T] log-probs of the taken tokens under the current policy (with grad).
        old_logp: [B, T] log-probs under the policy that sampled them (no grad).
        advantages: [B] sequence advantages, broadcast over tokens, or [B, T] per token (packed
            rows hold several sequences, each with its own advantage).
        mask: [B, T] bool, True on response tokens that enter the loss.
        clip_low: Lower epsilon: ratios below ``1 - clip_low`` are clipped (for A < 0).
        clip_high: Upper epsilon: ratios above ``1 + clip_high`` are clipped (for A > 0).
        num_tokens_global: Response tokens in the whole step (all micro-batches, all ranks).
        clip_ratio_c: Dual-clip bound for A < 0 (> 1; verl's default 3): the token loss is at
            most ``-A * clip_ratio_c``.
        ref_logp: [B, T] reference-policy log-probs for the k3 KL term, or None.
        kl_coef: Weight of the KL term.
        nll_mask: [B] (or per-token [B, T]) bool, sequences that receive the auxiliary NLL, or
            None.
        nll_coef: Weight of the NLL term (VL-Rethinker: 0.05).
        num_nll_tokens_global: Normaliser of the NLL term (default ``num_tokens_global``).

    Returns:
        ``(loss, metrics)``; ``loss`` is a scalar to call ``backward`` on, metrics are detached
        0-dim float32 tensors: ``pg_loss``, ``kl_loss``, ``nll_loss`` (present when the term is
        active), ``clip_frac_low``, ``clip_frac_high``, ``clip_frac_dual`` (A < 0 and ratio
        above ``clip_ratio_c``), ``approx_kl`` (k3 of old vs current),
        ``ratio_mean`` (all sum-reducible), ``ratio_max`` (max-reducible).

    Example:
        One sequence, two tokens, A = 1. Token 0 has ratio e^0.5 = 1.65 > 1.35 and is clipped
        to 1.35; token 1 has ratio 1. Loss = -(1.35 + 1.0) / 2 tokens = -1.175.

        >>> logp = torch.tensor([[0.5, 0.0]], requires_grad=True)
        >>> loss, m = policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]),
        ...                       torch.tensor([[True, True]]), clip_low=0.2, clip_high=0.35,
        ...                       num_tokens_global=2)
        >>> round(loss.item(), 4), m["clip_frac_high"].item(), m["clip_frac_low"].item()
        (-1.175, 0.5, 0.0)
        >>> loss.backward(); logp.grad.tolist()  # clipped token gets no gradient
        [[0.0, -0.5]]
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape or logp.dim() != 2:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
            f"{tuple(mask.shape)} must share one [B, T] shape"
        )
    if advantages.shape not in ((logp.shape[0],), logp.shape):
        raise ValueError(
            f"advantages must be [{logp.shape[0]}] or {list(logp.shape)}, "
            f"got {tuple(advantages.shape)}"
        )
    if num_tokens_global <= 0:
        raise ValueError("num_tokens_global must be positive")
    if clip_low < 0 or clip_high < 0 or clip_low >= 1:
        raise ValueError("need 0 <= clip_low < 1 and clip_high >= 0")
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
    mask = mask.bool()
    denom = float(num_tokens_global)

    # Zero the log-ratio on padding before exp() so padding can never overflow; clamp it like
    # verl so an A == 0 token cannot turn 0 * inf into NaN.
    log_ratio = torch.where(mask, logp - old_logp.detach(), torch.zeros_like(logp))
    log_ratio = log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(logp.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    adv = adv.expand_as(logp)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    # max of the two negated surrogates = PPO's pessimistic (min) objective.
    ppo = torch.maximum(unclipped, clipped)
    # Dual-clip: for A < 0 the pessimistic max grows without bound in rho; cap it at -A * c.
    pg = torch.where(adv < 0, torch.minimum(ppo, -adv * clip_ratio_c), ppo)
    pg_loss = _masked_sum(pg, mask) / denom
    loss = pg_loss

    metrics: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        metrics["pg_loss"] = pg_loss.detach().float()
        # The clipped branch is active (and the token has zero gradient) exactly here.
        low = mask & (adv < 0) & (ratio < 1.0 - clip_low)
        high = mask & (adv > 0) & (ratio > 1.0 + clip_high)
        metrics["clip_frac_low"] = (low.sum() / denom).float()
        metrics["clip_frac_high"] = (high.sum() / denom).float()
        dual = mask & (adv < 0) & (ratio > clip_ratio_c)
        metrics["clip_frac_dual"] = (dual.sum() / denom).float()
        # k3 estimate of KL(old || current) from samples of the old policy.
        metrics["approx_kl"] = (_masked_sum((ratio - 1.0) - log_ratio, mask) / denom).float()
        metrics["ratio_mean"] = (_masked_sum(ratio, mask) / denom).float()
        metrics["ratio_max"] = (
            ratio[mask].max().float() if bool(mask.any()) else torch.zeros((), device=logp.device)
        )

    if ref_logp is not None:
        if ref_logp.shape != logp.shape:
            raise ValueError("ref_logp must match logp")
        # Padding gets d = 0 (and no gradient), whatever garbage either tensor holds there.
        zero = torch.zeros_like(logp)
        k3 = k3_kl(torch.where(mask, ref_logp.detach(), zero), torch.where(mask, logp, zero))
        kl_loss = _masked_sum(k3, mask) / denom
        metrics["kl_loss"] = kl_loss.detach().float()
        if kl_coef != 0.0:
            loss = loss + kl_coef * kl_loss

    if nll_mask is not None:
        if nll_mask.shape not in ((logp.shape[0],), logp.shape):
            raise ValueError(f"nll_mask must be [{logp.shape[0]}] or {list(logp.shape)}")
        per_token = nll_mask.bool() if nll_mask.dim() == 2 else nll_mask.bool().unsqueeze(-1)
        nll_tokens = mask & per_token
        nll_denom = denom if num_nll_tokens_global is None else float(num_nll_tokens_global)
        if nll_denom <= 0:
            raise ValueError("num_nll_tokens_global must be positive")
        nll_loss = -_masked_sum(logp, nll_tokens) / nll_denom
        metrics["nll_loss"] = nll_loss.detach().float()
        if nll_coef != 0.0:
            loss = loss + nll_coef * nll_loss

    metrics["loss"] = loss.detach().float()
    return loss, metrics


def ratio_sums(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float = 3.0,
) -> dict[str, torch.Tensor]:
    """Sum-reducible importance-ratio statistics over the ``mask`` tokens (e.g. SSR replays).

    Divide each sum by ``tokens`` (summed the same way over micro-batches and ranks) for the
    mean ratio, mean ``|log ratio|``, the share outside the clip band ``[1 - clip_low,
    1 + clip_high]`` and the share above the dual-clip bound.

    Example:
        Ratios 1, 2 and 0.5 (log-ratios 0, ln 2, -ln 2) on three masked tokens, one padding:

        >>> lr = torch.tensor([[0.0, 0.6931472, -0.6931472, 5.0]])
        >>> s = ratio_sums(lr, torch.zeros(1, 4), torch.tensor([[True, True, True, False]]),
        ...                clip_low=0.2, clip_high=0.35)
        >>> {k: round(v.item(), 4) for k, v in s.items()}
        {'tokens': 3.0, 'ratio': 3.5, 'abs_log_ratio': 1.3863, 'outside_clip': 2.0, 'above_c': 0.0}
    """
    mask = mask.bool()
    lr = torch.where(mask, logp.detach() - old_logp.detach(), torch.zeros_like(logp))
    lr = lr.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = torch.exp(lr)
    outside = mask & ((ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high))
    return {
        "tokens": mask.sum().to(ratio.dtype),
        "ratio": _masked_sum(ratio, mask),
        "abs_log_ratio": _masked_sum(lr.abs(), mask),
        "outside_clip": outside.sum().to(ratio.dtype),
        "above_c": (mask & (ratio > clip_ratio_c)).sum().to(ratio.dtype),
    }
