"""One supervised train step on megatron's pipeline schedules.

``forward_step`` feeds one micro-batch to a model chunk and returns the per-token loss plus a loss
function; the schedule (no pipelining, 1F1B or interleaved 1F1B, picked by megatron from the
parallel state) runs forward/backward over all micro-batches; the optimizer steps once.
Loss is summed over assistant tokens and divided by the global assistant-token count (megatron's
``calculate_per_token_loss``), and is reported separately for thinking and non-thinking tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from megatron_autothink.data.batch import PackedBatch
from megatron_autothink.models.varlen import packed_row_segments
from megatron_autothink.modes import MODE_IDS
from megatron_autothink.parallel import ParallelContext
from megatron_autothink.train.setup import OptimizerBundle

THINKING, NON_THINKING = MODE_IDS["thinking"], MODE_IDS["non_thinking"]


def loss_func(
    loss_mask: Tensor, mode_ids: Tensor, output_tensor: Tensor
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Masked token-sum loss, token count, and per-mode sums for logging.

    Returns the 3-tuple megatron's schedules expect with ``calculate_per_token_loss``:
    ``(loss_sum, num_tokens, reduced)`` where ``reduced`` values are ``[sum, count]`` pairs.
    """
    losses = output_tensor.float()
    mask = loss_mask.float()
    loss_sum = (losses * mask).sum()
    n = mask.sum().to(torch.int)
    think = mask * (mode_ids == THINKING).float()
    direct = mask * (mode_ids == NON_THINKING).float()
    reduced = {
        "lm loss": torch.stack([loss_sum.detach(), mask.sum()]),
        "loss thinking": torch.stack([(losses * think).sum().detach(), think.sum()]),
        "loss non-thinking": torch.stack([(losses * direct).sum().detach(), direct.sum()]),
    }
    return loss_sum, n, reduced


def forward_step(
    device: torch.device, data_iterator: Iterator[PackedBatch], model: torch.nn.Module
) -> tuple[Tensor, Any]:
    """Megatron ``forward_step_func``: every pipeline stage gets the same micro-batch (tokens,
    positions and masks are needed on every stage; pixels only on the first)."""
    batch = next(data_iterator).to(device)
    output = model(
        batch.tokens,
        batch.position_ids,
        None,  # packed samples attend within themselves through the segments instead
        packed_seq_params=packed_row_segments(batch.segment_ids),
        labels=batch.labels,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        loss_mask=batch.loss_mask,  # the LM head runs at assistant tokens only
    )
    return output, partial(loss_func, batch.loss_mask, batch.mode_ids)


@dataclass
class StepResult:
    loss: float
    """Assistant-token mean loss over the global batch (all DP ranks and micro-batches)."""
    loss_thinking: float
    loss_non_thinking: float
    tokens: int
    """Loss tokens in the global batch."""
    grad_norm: float
    lr: float
    skipped: bool


def reduce_metrics(
    outputs: list[dict[str, Tensor]], ctx: ParallelContext
) -> dict[str, tuple[float, float]]:
    """Sum ``[value, count]`` pairs over micro-batches, then over DP ranks, then broadcast them
    from the last pipeline stage so every rank can log the same numbers."""
    keys = ["lm loss", "loss thinking", "loss non-thinking"]
    totals = torch.zeros(len(keys), 2, dtype=torch.float64)
    for out in outputs:
        for i, k in enumerate(keys):
            totals[i] += out[k].double().cpu()
    dev_totals = totals.to(ctx.device)
    if ctx.dp > 1:
        torch.distributed.all_reduce(dev_totals, group=ctx.pg.dp)
    if ctx.pp > 1:
        # Only the last stage has losses; a sum over the pipeline group broadcasts them.
        if not ctx.is_last_stage:
            dev_totals.zero_()
        torch.distributed.all_reduce(dev_totals, group=ctx.pg.pp)
    totals = dev_totals.cpu()
    return {k: (float(totals[i, 0]), float(totals[i, 1])) for i, k in enumerate(keys)}


def _ratio(pair: tuple[float, float]) -> float:
    return pair[0] / pair[1] if pair[1] > 0 else float("nan")


def train_step(
    chunks: list[torch.nn.Module],
    opt: OptimizerBundle,
    micro_batches: list[PackedBatch],
    ctx: ParallelContext,
    *,
    seq_length: int,
    forward_only: bool = False,
) -> StepResult:
    """Forward/backward over this rank's micro-batches and (unless ``forward_only``) one update."""
    for c in chunks:
        if c.training == forward_only:  # train()/eval() walk every submodule: only on a change
            c.train(not forward_only)
        zero = getattr(c, "zero_grad_buffer", None)
        if not forward_only and zero is not None:
            zero()
    if not forward_only:
        opt.optimizer.zero_grad()
    fb = get_forward_backward_func()
    n_chunks = len(chunks)
    if n_chunks > 1:
        # Interleaved schedules pull micro-batches per chunk: give each chunk its own iterator.
        data: Any = [iter(list(micro_batches)) for _ in range(n_chunks)]
    else:
        data = iter(list(micro_batches))
    mb = micro_batches[0]
    outputs = fb(
        forward_step_func=partial(forward_step, ctx.device),
        data_iterator=data,
        model=chunks if n_chunks > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=mb.tokens.shape[0],
        forward_only=forward_only,
    )
    grad_norm, skipped, lr = float("nan"), False, opt.optimizer.param_groups[0]["lr"]
    if not forward_only:
        ok, gn, _ = opt.optimizer.step()
        skipped = not ok
        grad_norm = float(gn) if gn is not None else float("nan")
        if ok:
            opt.scheduler.step(increment=1)
    m = reduce_metrics(outputs if ctx.is_last_stage else [], ctx)
    return StepResult(
        loss=_ratio(m["lm loss"]),
        loss_thinking=_ratio(m["loss thinking"]),
        loss_non_thinking=_ratio(m["loss non-thinking"]),
        tokens=int(m["lm loss"][1]),
        grad_norm=grad_norm,
        lr=lr,
        skipped=skipped,
    )
