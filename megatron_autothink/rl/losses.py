r"""Clipped policy-gradient loss and memory-conscious token log-probabilities.

Loss (per response token ``t`` of sequence ``b``, ratio ``rho = exp(logp - old_logp)``)::

    pg[b, t] = max(-A_b * rho, -A_b * clip(rho, 1 - clip_low, 1 + clip_high))

* PPO clipping with *separate* low/high epsilons ("clip-higher", DAPO arXiv 2503.14476);
  VL-Rethinker (arXiv 2504.08837) uses low 0.2 / high 0.35. ``clip_low == clip_high`` is GRPO's
  symmetric clip (arXiv 2402.03300).
* Token-level aggregation (DAPO): the *sum* over all response tokens divided by
  ``num_tokens_global``, the number of response tokens in the whole optimizer step (all
  micro-batches on all data-parallel ranks). Each micro-batch's loss is then an additive share,
  so summing gradients across micro-batches and ranks gives exactly the full-batch gradient,
  whatever the padding or split. (A per-micro-batch mean would overweight short micro-batches.)
* Optional k3 KL to a reference policy (GRPO): ``exp(ref - logp) - (ref - logp) - 1`` per token,
  unbiased and non-negative; LMM-R1 (arXiv 2503.07536) uses an initial coefficient of 0.001,
  VL-Rethinker uses 0.
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

from typing import Any

import torch


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where instead of multiplication: padded positions may hold inf/NaN (e.g. exp of a
    # garbage log-ratio) and inf * 0 would poison the sum with NaN.
    return torch.where(mask, values, torch.zeros_like(values)).sum()


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    num_tokens_global: float | int,
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
        ref_logp: [B, T] reference-policy log-probs for the k3 KL term, or None.
        kl_coef: Weight of the KL term.
        nll_mask: [B] (or per-token [B, T]) bool, sequences that receive the auxiliary NLL, or
            None.
        nll_coef: Weight of the NLL term (VL-Rethinker: 0.05).
        num_nll_tokens_global: Normaliser of the NLL term (default ``num_tokens_global``).

    Returns:
        ``(loss, metrics)``; ``loss`` is a scalar to call ``backward`` on, metrics are detached
        0-dim float32 tensors: ``pg_loss``, ``kl_loss``, ``nll_loss`` (present when the term is
        active), ``clip_frac_low``, ``clip_frac_high``, ``approx_kl`` (k3 of old vs current),
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
    mask = mask.bool()
    denom = float(num_tokens_global)

    # Zero the log-ratio on padding before exp() so padding can never overflow.
    log_ratio = torch.where(mask, logp - old_logp.detach(), torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(logp.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    # max of the two negated surrogates = PPO's pessimistic (min) objective.
    pg = torch.maximum(unclipped, clipped)
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
        # k3 estimate of KL(old || current) from samples of the old policy.
        metrics["approx_kl"] = (_masked_sum((ratio - 1.0) - log_ratio, mask) / denom).float()
        metrics["ratio_mean"] = (_masked_sum(ratio, mask) / denom).float()
        metrics["ratio_max"] = (
            ratio[mask].max().float() if bool(mask.any()) else torch.zeros((), device=logp.device)
        )

    if ref_logp is not None:
        if ref_logp.shape != logp.shape:
            raise ValueError("ref_logp must match logp")
        d = torch.where(mask, ref_logp.detach() - logp, torch.zeros_like(logp))
        kl_loss = _masked_sum(torch.exp(d) - d - 1.0, mask) / denom
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


class _ChunkedTokenLogProb(torch.autograd.Function):
    """log p(token) = logit[token] - logsumexp(logits), computed and differentiated in chunks.

    Saves only the (already existing) logits and the [N] logsumexp, so neither the forward nor
    the backward holds a full [N, V] float32 log-softmax: peak extra memory is one chunk.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk: int
    ) -> torch.Tensor:
        n = logits.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for s in range(0, n, chunk):
            x = logits[s : s + chunk].float() / temperature
            lse[s : s + chunk] = torch.logsumexp(x, dim=-1)
            picked = x.gather(-1, tokens[s : s + chunk].unsqueeze(-1)).squeeze(-1)
            out[s : s + chunk] = picked - lse[s : s + chunk]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[Any, ...]:
        (grad_out,) = grad_outputs
        logits, tokens, lse = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], chunk):
            g = grad_out[s : s + chunk].float().unsqueeze(-1)
            # d/dx (x_tok - lse(x)) = onehot(tok) - softmax(x); x = logits / temperature.
            probs = torch.exp(
                logits[s : s + chunk].float() / temperature - lse[s : s + chunk, None]
            )
            gchunk = -probs * g
            gchunk.scatter_add_(-1, tokens[s : s + chunk].unsqueeze(-1), g)
            grad[s : s + chunk] = (gchunk / temperature).to(grad.dtype)
        return grad, None, None, None


def sequence_logprobs_from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 512,
) -> torch.Tensor:
    """Per-token log-probabilities ``log softmax(logits / temperature)[tokens]``, chunked.

    Memory: a naive ``log_softmax(...).gather(...)`` materialises a float32 [B, T, V] tensor
    and keeps it for backward (for a 151k Qwen3 vocabulary and 16k tokens that is ~10 GB).
    Here the forward and backward run ``chunk_tokens`` rows at a time and save only the
    logits (which the model keeps anyway) plus a [B*T] logsumexp. Maths in float32 whatever the
    logits dtype. For vocab-sharded (tensor-parallel) logits use megatron-core's vocab-parallel
    cross entropy instead; this function needs the full vocabulary on one device.

    Alignment: ``logits[:, t]`` must be the distribution that produced ``tokens[:, t]``; shift
    the model output (``logits[:, :-1]`` vs ``input_ids[:, 1:]``) before calling. Pass the
    sampler's ``temperature`` so the log-probs match what vLLM reported.

    Args:
        logits: [B, T, V] unnormalised scores.
        tokens: [B, T] long token ids.
        temperature: Sampling temperature the logits are divided by.
        chunk_tokens: Rows per chunk.

    Returns:
        [B, T] float32 log-probabilities, differentiable w.r.t. ``logits``.

    Example:
        Uniform logits over 4 tokens give log(1/4) = -1.3863 everywhere.

        >>> lp = sequence_logprobs_from_logits(torch.zeros(1, 2, 4), torch.tensor([[0, 3]]))
        >>> [round(x, 4) for x in lp[0].tolist()]
        [-1.3863, -1.3863]
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, T, V] and tokens [B, T]; got {tuple(logits.shape)} and "
            f"{tuple(tokens.shape)}"
        )
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    bsz, seq, vocab = logits.shape
    flat = logits.reshape(bsz * seq, vocab)
    out = _ChunkedTokenLogProb.apply(
        flat, tokens.reshape(-1).long(), float(temperature), max(1, int(chunk_tokens))
    )
    return out.view(bsz, seq)
