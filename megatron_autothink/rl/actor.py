"""The policy (actor) on megatron: recompute log-probs and apply PPO-style updates.

Both run through megatron's ``get_forward_backward_func()`` schedule, so RL uses the same
tensor/pipeline/data parallel path as SFT. Log-probs come from the model's own vocab-parallel
cross entropy (``-loss`` with ``labels``), which is exact under tensor parallelism without
gathering the vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from megatron_autothink.config import RLConfig
from megatron_autothink.models.varlen import packed_row_segments
from megatron_autothink.parallel import ParallelContext
from megatron_autothink.rl.batching import RLMicroBatch
from megatron_autothink.rl.losses import policy_loss, ratio_sums
from megatron_autothink.train.setup import OptimizerBundle

REPLAY_STATS = ("ratio", "abs_log_ratio", "outside_clip", "above_c")
"""Per-token means over SSR replays, logged as ``actor/replay/<name>`` (see ``ratio_sums``)."""


def _forward(
    device: torch.device, it: Iterator[RLMicroBatch], model: torch.nn.Module
) -> tuple[Tensor, Any]:
    mb = next(it).to(device)
    b = mb.packed
    neg_logp = model(
        b.tokens,
        b.position_ids,
        None,  # packed samples attend within themselves through the segments instead
        packed_seq_params=packed_row_segments(b.segment_ids),
        labels=b.labels,
        pixel_values=b.pixel_values,
        image_grid_thw=b.image_grid_thw,
        loss_mask=b.loss_mask,  # the LM head runs at response tokens only
    )
    return neg_logp, mb


def _run(
    chunks: list[torch.nn.Module],
    batches: list[RLMicroBatch],
    ctx: ParallelContext,
    loss_fn: Any,
    *,
    forward_only: bool,
    seq_length: int,
) -> list[Any]:
    def forward_step(it: Iterator[RLMicroBatch], model: torch.nn.Module) -> tuple[Tensor, Any]:
        out, mb = _forward(ctx.device, it, model)
        return out, partial(loss_fn, mb)

    data: Any = [iter(list(batches)) for _ in chunks] if len(chunks) > 1 else iter(list(batches))
    return list(
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data,
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=batches[0].packed.tokens.shape[0],
            forward_only=forward_only,
        )
    )


def _broadcast_from_last_stage(t: Tensor, ctx: ParallelContext) -> Tensor:
    if ctx.pp > 1:
        if not ctx.is_last_stage:
            t = torch.zeros_like(t)
        dist.all_reduce(t, group=ctx.pg.pp)
    return t


def compute_logprobs(
    chunks: list[torch.nn.Module],
    batches: list[RLMicroBatch],
    ctx: ParallelContext,
    *,
    seq_length: int,
) -> list[Tensor]:
    """``[B, S]`` log-probs of each label token per micro-batch (0 off-target), on every rank."""
    for c in chunks:
        c.eval()

    def collect(mb: RLMicroBatch, neg_logp: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logp = (-neg_logp.float().detach()) * mb.packed.loss_mask
        return torch.zeros((), device=logp.device), {"logp": logp}

    with torch.no_grad():
        outs = _run(chunks, batches, ctx, collect, forward_only=True, seq_length=seq_length)
    shape = batches[0].packed.tokens.shape
    result = []
    for i in range(len(batches)):
        t = outs[i]["logp"].cpu() if ctx.is_last_stage else torch.zeros(shape)
        result.append(_broadcast_from_last_stage(t.to(ctx.device), ctx).cpu())
    return result


def policy_update(
    chunks: list[torch.nn.Module],
    opt: OptimizerBundle,
    batches: list[RLMicroBatch],
    ctx: ParallelContext,
    rl: RLConfig,
    *,
    seq_length: int,
) -> dict[str, float]:
    """One optimizer step on all micro-batches. The loss is the token SUM of the clipped
    surrogate (+KL, +NLL); megatron divides gradients by the global target-token count
    (all micro-batches, all DP ranks), giving the token-level mean of DAPO/VL-Rethinker."""
    for c in chunks:
        c.train()
        zero = getattr(c, "zero_grad_buffer", None)
        if zero is not None:
            zero()
    opt.optimizer.zero_grad()

    def loss_fn(mb: RLMicroBatch, neg_logp: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        assert mb.old_logp is not None
        mask = mb.packed.loss_mask > 0
        loss, metrics = policy_loss(
            -neg_logp.float(),
            mb.old_logp,
            mb.advantages,
            mask,
            clip_low=rl.clip_low,
            clip_high=rl.clip_high,
            clip_ratio_c=rl.clip_ratio_c,
            num_tokens_global=1,  # token SUM: megatron normalises by the global count
            ref_logp=mb.ref_logp,
            kl_coef=rl.kl_coef,
            nll_mask=mb.nll_mask if rl.nll_coef > 0 else None,
            nll_coef=rl.nll_coef,
        )
        n = mask.sum()
        reduced = {
            k: torch.stack([v.detach().float(), n.float()])
            for k, v in metrics.items()
            if k != "ratio_max"
        }
        # SSR replays' ratios (pi_now / pi_behaviour), averaged over replay tokens only.
        rep = ratio_sums(
            -neg_logp.float(),
            mb.old_logp,
            mask & mb.replay_mask,
            clip_low=rl.clip_low,
            clip_high=rl.clip_high,
            clip_ratio_c=rl.clip_ratio_c,
        )
        for k in REPLAY_STATS:
            reduced[f"replay/{k}"] = torch.stack([rep[k].float(), rep["tokens"].float()])
        return loss, n.to(torch.int), reduced

    outs = _run(chunks, batches, ctx, loss_fn, forward_only=False, seq_length=seq_length)
    ok, grad_norm, _ = opt.optimizer.step()
    if ok:
        opt.scheduler.step(increment=1)
    sums: dict[str, Tensor] = {}
    for o in outs if ctx.is_last_stage else []:
        for k, v in o.items():
            sums[k] = sums.get(k, torch.zeros(2, dtype=torch.float64)) + v.double().cpu()
    keys = [
        "pg_loss",
        "loss",
        "clip_frac_low",
        "clip_frac_high",
        "approx_kl",
        "ratio_mean",
        "kl_loss",
        "nll_loss",
        "clip_frac_dual",
        *(f"replay/{k}" for k in REPLAY_STATS),
    ]
    vec = torch.stack([sums.get(k, torch.zeros(2, dtype=torch.float64)) for k in keys]).to(
        ctx.device
    )
    if ctx.dp > 1:
        dist.all_reduce(vec, group=ctx.pg.dp)
    vec = _broadcast_from_last_stage(vec, ctx).cpu()
    total = float(vec[0, 1]) or 1.0
    # Each statistic over its own token count (all response tokens; replay tokens for replay/*).
    metrics = {
        f"actor/{k}": float(vec[i, 0]) / float(vec[i, 1])
        for i, k in enumerate(keys)
        if (k in sums or ctx.pp > 1) and float(vec[i, 1]) > 0
    }
    metrics["actor/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["actor/lr"] = float(opt.optimizer.param_groups[0]["lr"])
    metrics["actor/tokens"] = total
    # Target tokens of SSR replays in the update (0: none was trained), summed over data ranks.
    metrics["actor/replay/tokens"] = float(vec[keys.index("replay/ratio"), 1])
    return metrics
