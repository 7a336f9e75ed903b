"""The trainer's side of the SLURM pre-emption protocol (docs/launch.md, "Pre-emption").

The batch script rendered by :mod:`megatron_autothink.launch.render` receives USR1 from SLURM
before the time limit and forwards it to the training step. SLURM delivers a step signal to
*every* process of the step: the ranks, but also torchrun, data-loader workers and anything the
ranks spawned (the dist-checkpoint writer, vLLM engine processes). USR1's default action kills a
process, so the protocol is:

1. the per-rank wrapper starts each rank with USR1 ignored (torchrun then ignores it too);
2. the trainer calls :meth:`PreemptionWatcher.install` first thing: it blocks USR1 in the main
   thread *before* any child or thread exists, so every child inherits the block and survives
   the signal, and it records USR1 or TERM in a flag (Python handlers, plus a ``sigwait`` thread
   for a USR1 that stays pending because every thread blocks it). TERM is handled but not
   blocked: it is SLURM's cancel/pre-empt signal, sent to every process anyway, and libraries
   stop their children with it (``Process.terminate``);
3. at each step boundary all ranks agree with :meth:`PreemptionWatcher.should_stop` (an
   all-reduce MAX, since the signal reaches ranks at slightly different times), save a
   checkpoint, rank 0 calls :func:`write_marker`, and every rank exits with status 0;
4. the batch script sees the marker and runs ``scontrol requeue``; the rerun
   (``SLURM_RESTART_COUNT`` >= 1) resumes from the latest valid checkpoint.

A step boundary may never come (a rank stuck in data loading or in a collective). A SIGTERM
arriving at least :attr:`PreemptionWatcher.repeat_after_s` after the first request therefore
ends the process at once with status ``128 + SIGTERM`` (143) and "second signal: exiting
without checkpoint" on stderr. Copies that arrive together (SLURM signals every process, and
the batch script and torchrun forward TERM as well) count once. USR1 never does this: the
batch script re-sends it every few seconds while the ranks save (``render.REFORWARD_S``).

Nobody may send that second signal (``timeout`` without ``-k``, a local run left alone), so
with ``boundary_timeout_s`` (``checkpoint.preempt_timeout_s``) a timer thread started at the
first request ends the process the same way, status ``128 + signal``, with "no step boundary
within N s" on stderr, when the ranks have not agreed on a step boundary by then. A thread, so
it fires even while the main thread waits in a collective or in C code; the boundary, once
reached (:meth:`should_stop` returned True), disarms it: the save itself is not timed.

Nothing here imports torch unless :meth:`should_stop` is asked to agree across ranks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from megatron_autothink.fileio import atomic_write_text

MARKER_NAME = "PREEMPTED"
"""File written in the run directory once the pre-emption checkpoint is complete."""
ENV_MARKER = "AUTOTHINK_PREEMPT_MARKER"
"""Absolute marker path, exported by the batch script (the trainer should prefer it)."""
ENV_RUN_DIR = "AUTOTHINK_RUN_DIR"
ENV_RESTART = "AUTOTHINK_RESTART_COUNT"
DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""Signals that request a checkpoint-and-exit."""
BLOCKED_SIGNALS = (signal.SIGUSR1,)
"""Signals blocked in the trainer and, by inheritance, in every process it starts."""
REPEAT_AFTER_S = 5.0
"""A SIGTERM this long after the first request exits at once (see the module docstring)."""
EXIT_ON_REPEAT = (signal.SIGTERM,)
"""Signals whose repeat exits without a checkpoint."""


def marker_path(run_dir: str | os.PathLike[str]) -> Path:
    """Where to write the marker: ``$AUTOTHINK_PREEMPT_MARKER`` or ``<run_dir>/PREEMPTED``."""
    env = os.environ.get(ENV_MARKER)
    return Path(env) if env else Path(run_dir) / MARKER_NAME


def restart_count() -> int:
    """How many times SLURM has requeued this job (0 on the first run)."""
    raw = os.environ.get(ENV_RESTART) or os.environ.get("SLURM_RESTART_COUNT") or "0"
    return int(raw)


def write_marker(
    path: str | os.PathLike[str], *, step: int, checkpoint: str, signal_name: str
) -> None:
    """Write the marker atomically (rank 0 only, after the checkpoint is durable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {
        "step": step,
        "checkpoint": checkpoint,
        "signal": signal_name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "restart_count": restart_count(),
    }
    atomic_write_text(path, json.dumps(info) + "\n")


class PreemptionWatcher:
    """Turns USR1/TERM into a flag the training loop polls at step boundaries.

    Call :meth:`install` from the main thread before creating threads, process groups, data
    loaders or inference engines, so their processes inherit the blocked signal mask.
    """

    def __init__(
        self,
        signals: Iterable[signal.Signals] = DEFAULT_SIGNALS,
        blocked: Iterable[signal.Signals] = BLOCKED_SIGNALS,
        *,
        repeat_after_s: float = REPEAT_AFTER_S,
        boundary_timeout_s: float | None = None,
    ) -> None:
        self.signals = tuple(signals)
        self.blocked = tuple(s for s in blocked if s in self.signals)
        self.repeat_after_s = repeat_after_s
        self.boundary_timeout_s = boundary_timeout_s or None
        self._timer: threading.Timer | None = None
        self._boundary_reached = False
        self._event = threading.Event()
        self._received: signal.Signals | None = None
        self._first_at = 0.0
        self._installed = False

    @property
    def requested(self) -> bool:
        """True once any watched signal has arrived on this rank."""
        return self._event.is_set()

    @property
    def signal_name(self) -> str:
        return self._received.name if self._received is not None else ""

    def _note(self, signum: int) -> None:
        now = time.monotonic()
        if self._received is None:
            self._received = signal.Signals(signum)
            self._first_at = now
            if self.boundary_timeout_s is not None:
                self._timer = threading.Timer(self.boundary_timeout_s, self._boundary_timeout)
                self._timer.daemon = True
                self._timer.name = "preempt-boundary-timeout"
                self._timer.start()
        elif signum in EXIT_ON_REPEAT and now - self._first_at >= self.repeat_after_s:
            # The first request is still waiting for a step boundary: the user (or SLURM's
            # kill timeout) insists. os._exit: no handler, finally or atexit may block again.
            name = signal.Signals(signum).name
            os.write(2, f"{name}: second signal: exiting without checkpoint\n".encode())
            os._exit(128 + signum)
        self._event.set()

    def _boundary_timeout(self) -> None:
        if self._boundary_reached or self._received is None:
            return
        name = self._received.name
        os.write(
            2,
            f"{name}: no step boundary within {self.boundary_timeout_s:g} s of the signal "
            "(checkpoint.preempt_timeout_s): exiting without checkpoint\n".encode(),
        )
        os._exit(128 + self._received)

    def install(self) -> PreemptionWatcher:
        if self._installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionWatcher.install() must run in the main thread")
        # Block first: between setting a handler and blocking, a signal could otherwise reach a
        # child-to-be with its default action.
        if self.blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, set(self.blocked))
        for sig in self.signals:
            # Replaces SIG_IGN inherited from the launcher: an ignored signal is discarded even
            # while blocked, a handled one stays pending for sigwait.
            signal.signal(sig, lambda signum, _frame: self._note(signum))
        if self.blocked:
            threading.Thread(target=self._wait_loop, name="preempt-sigwait", daemon=True).start()
        self._installed = True
        return self

    def _wait_loop(self) -> None:
        while True:
            self._note(signal.sigwait(set(self.blocked)))

    def should_stop(self, group: Any = None, device: Any = None) -> bool:
        """Whether every rank should checkpoint and exit now (collective when distributed).

        All ranks must call this at the same point of the loop. ``device`` is where the flag
        tensor lives (a CUDA device for NCCL groups); CPU by default.
        """
        # No process group can exist before torch.distributed is imported: then no import
        # (seconds) between a signal and its boundary.
        dist: Any = sys.modules.get("torch.distributed")
        if dist is None or not (dist.is_available() and dist.is_initialized()):
            stop = self.requested
        else:
            import torch

            flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            stop = bool(flag.item())
        if stop:
            self.boundary_reached()
        return stop

    def boundary_reached(self) -> None:
        """Every rank is at the step boundary and will save: disarm the boundary timeout."""
        self._boundary_reached = True
        if self._timer is not None:
            self._timer.cancel()
