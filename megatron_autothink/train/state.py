"""What one training stage carries between steps, and what its callbacks may read.

:class:`LoopState` is filled by a stage (SFT in ``train/sft.py``, RL in ``rl/stage.py``), driven
by :func:`~megatron_autothink.train.loop.run_loop` and seen by every
:class:`~megatron_autothink.train.callbacks.Callback`; it knows how to save and resume the stage
(model, optimizer, step, data position, the stage's own extras).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from megatron_autothink.config import AutothinkConfig, StageConfig, dump_config
from megatron_autothink.fileio import drop_steps_after
from megatron_autothink.parallel import ParallelContext
from megatron_autothink.train import resume as resume_rules
from megatron_autothink.train.checkpoint import CheckpointManager, checkpoint_root
from megatron_autothink.train.setup import OptimizerBundle, build_optimizer

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
"""Per-step metrics of every stage, one JSON row per logged step, in the run directory."""


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

    @classmethod
    def begin(
        cls,
        cfg: AutothinkConfig,
        ctx: ParallelContext,
        stage: StageConfig,
        chunks: list[torch.nn.Module],
        data: BatchSource,
        *,
        step_offset: int,
    ) -> LoopState:
        """A stage's state at step 0: its optimizer and LR schedule over ``stage.steps`` and
        its checkpoint folder ``<checkpoint root>/<stage name>``; :meth:`resume` comes next."""
        return cls(
            cfg=cfg,
            ctx=ctx,
            chunks=chunks,
            opt=build_optimizer(cfg, chunks, ctx, total_steps=stage.steps),
            data=data,
            ckpt=CheckpointManager(
                checkpoint_root(cfg) / stage.name, ctx, cfg.checkpoint.keep_last
            ),
            stage=stage.name,
            total_steps=stage.steps,
            step_offset=step_offset,
        )

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
