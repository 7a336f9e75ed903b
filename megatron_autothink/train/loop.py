"""The supervised (bi-mode annealing) training loop.

Read top to bottom: build -> resume -> for each step: take this rank's micro-batches, one
``train_step`` through megatron's schedule, callbacks. Logging, checkpoints and evaluation are
callbacks; pre-emption (SIGUSR1/SIGTERM, see ``launch.preempt``) only raises a flag that every
rank agrees on at the step boundary, so all ranks save the same step and exit together.
"""

from __future__ import annotations

import logging
import time

import torch

from megatron_autothink.data.batch import PackedBatch
from megatron_autothink.train.callbacks import Callback
from megatron_autothink.train.flops import attended_length, mfu, train_flops_per_token
from megatron_autothink.train.preempt import PreemptionWatcher
from megatron_autothink.train.state import BatchSource, LoopState
from megatron_autothink.train.step import train_step

log = logging.getLogger(__name__)


DATA_COUNTS = ("samples_read", "bad_sample", "too_long", "corrupt_shards", "corrupt_shard_samples")
"""Loader counters logged every step as ``data/<name>`` (0 until they occur), next to any other
counter the loader keeps (``no_answer`` for RL prompts)."""


def data_metrics(data: BatchSource) -> dict[str, float]:
    """The loader's running counts (this rank, the whole stage so far: restored at resume) as
    ``data/<name>`` metrics, so a run that drops many samples shows it in metrics.jsonl."""
    stats = getattr(data, "stats", None) or {}
    return {f"data/{k}": float(stats.get(k, 0)) for k in dict.fromkeys([*DATA_COUNTS, *stats])}


def _micro_batches(data: BatchSource, n: int) -> list[PackedBatch]:
    return [next(data) for _ in range(n)]


def run_sft(
    state: LoopState,
    callbacks: list[Callback],
    *,
    num_micro_batches: int,
    watcher: PreemptionWatcher | None = None,
) -> LoopState:
    """Train ``state.total_steps`` steps from ``state.step``; returns the final state."""
    from megatron_autothink.data.loader import fetch_agreed  # energon: imported when used

    cfg, ctx = state.cfg, state.ctx
    for cb in callbacks:
        cb.on_train_start(state)
    while state.step < state.total_steps:
        t0 = time.perf_counter()
        # Agreed across ranks: a loader that gives up on one rank stops every rank together
        batches = fetch_agreed(
            lambda: _micro_batches(state.data, num_micro_batches), device=ctx.device
        )
        local_tokens = sum(b.num_tokens for b in batches)
        result = train_step(state.chunks, state.opt, batches, ctx, seq_length=cfg.data.seq_length)
        state.step += 1
        dt = time.perf_counter() - t0
        tokens = local_tokens * ctx.dp  # every DP rank processes the same amount
        metrics: dict[str, float] = {
            "loss": result.loss,
            "loss_thinking": result.loss_thinking,
            "loss_non_thinking": result.loss_non_thinking,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "loss_tokens": float(result.tokens),
            "tokens_per_s": tokens / dt,
            "step_time_s": dt,
            **data_metrics(state.data),
        }
        if torch.cuda.is_available():
            head_share = min(result.tokens / tokens, 1.0) if tokens else 1.0
            # attention FLOPs at the packed samples' lengths, not the row's (see attended_length)
            context = attended_length(torch.cat([b.segment_ids for b in batches]))
            flops_per_token = train_flops_per_token(cfg.model, context, head_share)
            metrics["mfu"] = mfu(flops_per_token * tokens / dt / ctx.world_size)
            metrics["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        state.stop_requested = watcher.should_stop(device=ctx.device) if watcher else False
        for cb in callbacks:
            cb.on_step_end(state, metrics)
        if state.stop_requested:
            break
    for cb in callbacks:
        cb.on_train_end(state)
    return state
