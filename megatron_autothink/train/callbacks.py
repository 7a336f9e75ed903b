"""Callbacks: logging, checkpointing and evaluation hook into the loop instead of branching in it.

Every callback sees the :class:`~megatron_autothink.train.state.LoopState` (step, metrics, the
trainer's objects) at the same points; the loop itself only trains.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Any, Literal

from megatron_autothink.config import AutothinkConfig
from megatron_autothink.fileio import atomic_write_text
from megatron_autothink.train.state import METRICS_FILE, LoopState

log = logging.getLogger(__name__)


class Callback:
    """No-op base: override what you need."""

    def on_train_start(self, state: LoopState) -> None: ...

    def on_step_end(self, state: LoopState, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, state: LoopState) -> None: ...


class MetricsFile(Callback):
    """One JSON line per step in ``<run_dir>/metrics.jsonl``. It appends across resumes; the
    rows of steps a resume replays are dropped first (``LoopState.resume``), so every step of a
    stage has one row."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_step_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        if not state.ctx.is_logging_rank:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": state.step, "stage": state.stage, **metrics}) + "\n")


class ConsoleLogger(Callback):
    """A progress line every ``every`` steps, after the first step of a start and after the
    last: step/total and percentage, loss per mode, lr, grad norm, tokens/s (+ MFU and memory
    on GPU), elapsed time and ETA (from the mean step time of this start)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.t0 = time.perf_counter()
        self.start_step = 0

    def on_train_start(self, state: LoopState) -> None:
        self.t0 = time.perf_counter()
        self.start_step = state.step

    def on_step_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        if not state.ctx.is_logging_rank:
            return
        first = state.step == self.start_step + 1
        if state.step % self.every and state.step != state.total_steps and not first:
            return
        from megatron_autothink.train.progress import format_duration

        total = max(state.total_steps, 1)
        elapsed = time.perf_counter() - self.t0
        done = max(state.step - self.start_step, 1)
        eta = elapsed / done * max(state.total_steps - state.step, 0)
        parts = [
            f"[{state.stage}] step {state.step}/{state.total_steps} ({state.step / total:.0%})"
        ]
        for key, fmt in [
            ("loss", ".4f"),
            ("loss_thinking", ".4f"),
            ("loss_non_thinking", ".4f"),
            ("eval_loss", ".4f"),
            ("lr", ".2e"),
            ("grad_norm", ".3f"),
            ("tokens_per_s", ".0f"),
            ("mfu", ".1%"),
            ("mem_gib", ".1f"),
        ]:
            v = metrics.get(key)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                parts.append(f"{key} {v:{fmt}}")
        parts.append(f"elapsed {format_duration(elapsed)} | eta {format_duration(eta)}")
        print(" | ".join(parts), flush=True)


class TensorBoardLogger(Callback):
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer: Any = None

    def on_train_start(self, state: LoopState) -> None:
        if state.ctx.is_logging_rank:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir))

    def on_step_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not math.isnan(v):
                self.writer.add_scalar(f"{state.stage}/{k}", v, state.global_step)

    def on_train_end(self, state: LoopState) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbLogger(Callback):
    """Weights & Biases (``logging.wandb``), from the logging rank only.

    One W&B run per run directory: its id is kept in ``<run_dir>/wandb_run_id``, so later stages
    and resumed jobs continue the same run (``resume="allow"``). ``logging.wandb.mode`` decides
    (it overrides ``WANDB_MODE``): ``offline``, the default, never touches the network and writes
    ``<run_dir>/wandb/offline-run-*/run-<id>.wandb`` for a later ``wandb sync``. An ``online`` run
    that cannot start (no API key, no network) falls back to offline with a warning: logging never
    stops a training job.
    """

    ID_FILE = "wandb_run_id"

    def __init__(
        self,
        project: str,
        mode: Literal["online", "offline"],
        run_dir: Path,
        config: dict[str, Any],
    ) -> None:
        self.project, self.mode, self.run_dir, self.config = project, mode, run_dir, config
        self.run: Any = None

    def _run_id(self) -> str:
        path = self.run_dir / self.ID_FILE
        if path.is_file():
            return path.read_text().strip()
        alphabet = string.ascii_lowercase + string.digits
        run_id = "".join(secrets.choice(alphabet) for _ in range(8))
        atomic_write_text(path, run_id + "\n")
        return run_id

    def on_train_start(self, state: LoopState) -> None:
        if not state.ctx.is_logging_rank or self.run is not None:
            return
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                "logging.wandb.enabled=true but wandb is not installed: pip install wandb"
            ) from None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        args: dict[str, Any] = {
            "project": self.project,
            "dir": str(self.run_dir),
            "id": self._run_id(),
            "name": self.run_dir.name,
            "resume": "allow",
            "config": self.config,
        }
        try:
            self.run = wandb.init(mode=self.mode, **args)
        except Exception as e:
            if self.mode == "offline":
                raise
            log.warning(
                "W&B: the online run could not start (%s: %s); logging offline under %s/wandb "
                "instead (upload it later with `wandb sync`)",
                type(e).__name__,
                e,
                self.run_dir,
            )
            wandb.teardown()  # the failed attempt keeps the run id reserved otherwise
            self.run = wandb.init(mode="offline", **args)

    def on_step_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log(
                {f"{state.stage}/{k}": v for k, v in metrics.items()}, step=state.global_step
            )

    def on_train_end(self, state: LoopState) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        # The RL stage calls this from a ``finally``: an exception on its way out marks the run
        # failed. A finish that fails (its service process gone, say) only warns, so a job that
        # saved its checkpoint still exits as it should (0 after pre-emption, then requeued).
        failed = sys.exc_info()[0] is not None
        try:
            run.finish(exit_code=1 if failed else 0)
        except Exception as e:
            log.warning("W&B: finishing the run failed (%s: %s)", type(e).__name__, e)


class CheckpointCallback(Callback):
    """Save every ``every`` steps, at the end, and when a pre-emption signal arrived."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        due = self.every and state.step % self.every == 0
        if due or state.stop_requested or state.step == state.total_steps:
            state.save_checkpoint()


class EvalCallback(Callback):
    """Held-out loss per mode every ``every`` steps (forward only, no update)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        if self.every and state.step % self.every == 0:
            metrics.update(state.evaluate())


def standard_callbacks(cfg: AutothinkConfig, *, evaluate: bool) -> list[Callback]:
    """The callbacks every stage uses, in order: evaluation (adds metrics), the metrics file and
    console, checkpointing, then TensorBoard / W&B as configured."""
    run_dir = Path(cfg.logging.run_dir)
    out: list[Callback] = [EvalCallback(cfg.train.eval_every)] if evaluate else []
    # Log before saving: a run killed between the two re-runs (and re-logs) that step after the
    # resume; saving first could leave a resumed step that was never logged.
    out += [
        MetricsFile(run_dir / METRICS_FILE),
        ConsoleLogger(cfg.train.log_every),
        CheckpointCallback(cfg.checkpoint.save_every),
    ]
    if cfg.logging.tensorboard:
        out.append(TensorBoardLogger(run_dir / "tensorboard"))
    if cfg.logging.wandb.enabled:
        w = cfg.logging.wandb
        out.append(WandbLogger(w.project, w.mode, run_dir, cfg.model_dump(mode="json")))
    return out
