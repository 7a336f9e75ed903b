"""The supervised (bi-mode annealing) training loop.

Read top to bottom: build -> resume -> for each step: take this rank's micro-batches, one
``train_step`` through megatron's schedule, callbacks. Logging, checkpoints and evaluation are
callbacks; pre-emption (SIGUSR1/SIGTERM, see ``launch.preempt``) only raises a flag that every
rank agrees on at the step boundary, so all ranks save the same step and exit together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from megatron_autothink.config import AutothinkConfig, dump_config
from megatron_autothink.data.batch import PackedBatch
from megatron_autothink.fileio import drop_steps_after
from megatron_autothink.parallel import ParallelContext
from megatron_autothink.train import resume as resume_rules
from megatron_autothink.train.callbacks import METRICS_FILE, Callback
from megatron_autothink.train.checkpoint import CheckpointManager
from megatron_autothink.train.flops import attended_length, mfu, train_flops_per_token
from megatron_autothink.train.preempt import PreemptionWatcher
from megatron_autothink.train.setup import OptimizerBundle
from megatron_autothink.train.step import train_step

log = logging.getLogger(__name__)


class BatchSource(Protocol):
    """What the loop needs from a data loader: the next item (a micro-batch for SFT, a list of
    prompts for RL) plus a savable position."""

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class LoopState:
    """Everything callbacks may read; ``step`` counts finished optimizer steps of this stage."""

    cfg: AutothinkConfig
    ctx: ParallelContext
    chunks: list[torch.nn.Module]
    opt: OptimizerBundle
    data: BatchSource
    ckpt: CheckpointManager | None
    stage: str
    total_steps: int
    step: int = 0
    step_offset: int = 0
    """Steps of earlier stages (for a global step axis in the loggers)."""
    stop_requested: bool = False
    eval_fn: Callable[[], dict[str, float]] | None = None
    extra_rank_state: dict[str, Callable[[], Any]] = field(default_factory=dict)
    step_logs: list[Path] = field(default_factory=list)
    """Per-step JSONL files rank 0 appends to besides metrics.jsonl (RL: the rollouts); rows
    after the step a stage starts from are dropped at :meth:`resume`."""

    @property
    def global_step(self) -> int:
        return self.step_offset + self.step

    def save_checkpoint(self) -> None:
        if self.ckpt is None or getattr(self, "_saved_step", None) == self.step:
            return
        rank_state = {"data": self.data.state_dict(), "stage": self.stage}
        rank_state.update({k: fn() for k, fn in self.extra_rank_state.items()})
        self.ckpt.save(
            self.step,
            self.chunks,
            self.opt,
            rank_state=rank_state,
            meta={
                "stage": self.stage,
                "config": dump_config(self.cfg),
                "total_steps": self.total_steps,
            },
        )
        self._saved_step = self.step

    def resume(self, previous: CheckpointManager | None) -> dict[str, Any] | None:
        """The mirror of :meth:`save_checkpoint` at the start of a stage.

        With ``checkpoint.resume`` and a checkpoint of this stage: load model, optimizer, step
        and data position, and return the checkpoint's rank state (for the stage's own extras).
        Otherwise start from the previous stage's final weights, if there is one, and return
        None.
        """
        schedule = resume_rules.fresh_schedule(self.opt.scheduler)
        resumed = (
            self.ckpt.load_latest(self.chunks, self.opt)
            if self.ckpt is not None and self.cfg.checkpoint.resume
            else None
        )
        if resumed is not None:
            self.step = resumed.step
            decision = resume_rules.decide(
                resumed.meta.get("config"),
                self.cfg,
                total_steps=self.total_steps,
                saved_total_steps=resumed.meta.get("total_steps"),
                where=resumed.path,
            )
            if decision.reapply_schedule:
                resume_rules.reapply_schedule(self.opt.scheduler, schedule, resumed.path)
            if "data" in resumed.rank_state:
                try:
                    self.data.load_state_dict(resumed.rank_state["data"])
                except ValueError as e:  # the loader cannot name the checkpoint file; we can
                    rank_file = resumed.path / f"rank_{self.ctx.rank:05d}.pt"
                    raise resume_rules.ResumeRefused(f"{rank_file}: data-loader state: {e}") from e
            if self.ctx.rank == 0:
                run_dir = Path(self.cfg.logging.run_dir)
                resume_rules.record_resume(run_dir, self.stage, self.step, resumed.path, decision)
            self._drop_replayed_rows()
            return resumed.rank_state
        if previous is not None:
            prev = previous.load_latest(self.chunks, None)
            log.info(
                "stage %s starts from the final weights of %s",
                self.stage,
                prev.path if prev else "?",
            )
        self._drop_replayed_rows()
        return None

    def _drop_replayed_rows(self) -> None:
        """Rows this stage logged after ``self.step`` (by a run that died before its next
        checkpoint, or before its first) are for steps about to run again: drop them."""
        logs = [Path(self.cfg.logging.run_dir) / METRICS_FILE] if self.ctx.is_logging_rank else []
        logs += self.step_logs if self.ctx.rank == 0 else []
        for path in logs:
            n = drop_steps_after(path, self.stage, self.step)
            if n:
                log.warning(
                    "%s: dropped %d rows of %s after step %d (steps replayed from the checkpoint)",
                    path,
                    n,
                    self.stage,
                    self.step,
                )

    def evaluate(self) -> dict[str, float]:
        return self.eval_fn() if self.eval_fn is not None else {}


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
