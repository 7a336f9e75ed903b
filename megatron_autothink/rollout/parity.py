"""Trainer-vs-rollout log-prob parity measurement.

PPO/GRPO importance ratios are ``exp(logp_trainer - logp_rollout)`` when the rollout log-probs
are used as "old" log-probs; any systematic engine/trainer mismatch (kernels, dtype, image
preprocessing, stale caches) shows up as ratios away from 1 even for an on-policy batch, and
silently biases the update (NeMo-RL #793). This helper summarises that mismatch; it is
backend-agnostic (plain lists in, plain floats out) so the Megatron trainer can use it too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def logprob_parity(
    engine_logprobs: Sequence[Sequence[float]], trainer_logprobs: Sequence[Sequence[float]]
) -> dict[str, float]:
    """Compare per-token log-probs of the same sampled tokens from engine and trainer.

    ``diff = trainer - engine`` per token; the ratio is ``exp(diff)``, i.e. the importance ratio
    an on-policy PPO step would see. Quantiles are taken over the ratio itself; the
    ``*_abs_*`` figures over ``|diff|``.

    Example:
        >>> r = logprob_parity([[-1.0, -2.0]], [[-1.0, -2.0]])
        >>> r["max_abs_diff"], r["ratio_median"], r["num_tokens"]
        (0.0, 1.0, 2.0)

    Args:
        engine_logprobs: Per sequence, the rollout engine's log-prob of each sampled token.
        trainer_logprobs: Same shape, the trainer's log-probs of the same tokens.

    Returns:
        ``num_tokens``, ``max_abs_diff``, ``mean_abs_diff``, ``mean_diff`` (signed, trainer minus
        engine), ``ratio_median``, ``ratio_p1``, ``ratio_p10``, ``ratio_p90``, ``ratio_p99``,
        ``ratio_max``, ``ratio_min``.
        Note ``ratio_median`` can be 1 while ``ratio_min`` is far below it: look at both tails.

    Raises:
        ValueError: Different numbers of sequences or tokens, or no tokens at all.
    """
    if len(engine_logprobs) != len(trainer_logprobs):
        raise ValueError(
            f"{len(engine_logprobs)} engine sequences vs {len(trainer_logprobs)} trainer sequences"
        )
    for i, (e, t) in enumerate(zip(engine_logprobs, trainer_logprobs, strict=True)):
        if len(e) != len(t):
            raise ValueError(f"sequence {i}: {len(e)} engine log-probs vs {len(t)} trainer ones")
    engine = torch.tensor([x for seq in engine_logprobs for x in seq], dtype=torch.float64)
    trainer = torch.tensor([x for seq in trainer_logprobs for x in seq], dtype=torch.float64)
    if engine.numel() == 0:
        raise ValueError("no tokens to compare")
    diff = trainer - engine
    ratio = diff.exp()
    abs_diff = diff.abs()
    q = torch.tensor([0.01, 0.1, 0.5, 0.9, 0.99], dtype=torch.float64)
    p1, p10, median, p90, p99 = torch.quantile(ratio, q).tolist()
    return {
        "num_tokens": float(engine.numel()),
        "max_abs_diff": float(abs_diff.max()),
        "mean_abs_diff": float(abs_diff.mean()),
        "mean_diff": float(diff.mean()),
        "ratio_median": median,
        "ratio_p1": p1,
        "ratio_p10": p10,
        "ratio_p90": p90,
        "ratio_p99": p99,
        "ratio_max": float(ratio.max()),
        "ratio_min": float(ratio.min()),
    }


def format_parity(report: dict[str, float]) -> str:
    """One-line human-readable summary of a :func:`logprob_parity` report."""
    return (
        f"tokens={int(report['num_tokens'])} max|d|={report['max_abs_diff']:.3g} "
        f"mean|d|={report['mean_abs_diff']:.3g} ratio median={report['ratio_median']:.6f} "
        f"p1={report['ratio_p1']:.6f} p90={report['ratio_p90']:.6f} "
        f"p99={report['ratio_p99']:.6f} min={report['ratio_min']:.6f} "
        f"max={report['ratio_max']:.6f}"
    )
