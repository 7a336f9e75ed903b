"""The one training loop: SFT and RL stages plug into it.

Read top to bottom: the stage's builder has done set-up and resume -> for each step: this rank's
input (agreed across ranks), the stage module's step, callbacks. Logging, checkpoints and
evaluation are callbacks; pre-emption (SIGUSR1/SIGTERM, see ``train.preempt``) only raises a
flag that every rank agrees on at the step boundary, so all ranks save the same step and exit
together.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from megatron_autothink.train.callbacks import Callback
from megatron_autothink.train.preempt import PreemptionWatcher
from megatron_autothink.train.state import BatchSource, LoopState

log = logging.getLogger(__name__)


DATA_COUNTS = ("samples_read", "bad_sample", "too_long", "corrupt_shards", "corrupt_shard_samples")
"""Loader counters logged every step as ``data/<name>`` (0 until they occur), next to any other
counter the loader keeps (``no_answer`` for RL prompts)."""


def data_metrics(data: BatchSource) -> dict[str, float]:
    """The loader's running counts (this rank, the whole stage so far: restored at resume) as
    ``data/<name>`` metrics, so a run that drops many samples shows it in metrics.jsonl."""
    stats = getattr(data, "stats", None) or {}
    return {f"data/{k}": float(stats.get(k, 0)) for k in dict.fromkeys([*DATA_COUNTS, *stats])}


class StageModule(Protocol):
    """What a stage plugs into :func:`run_loop` (a TrainModule in OLMo-core's sense).

    The stage's builder does the set-up (model, optimizer, loader, resume) and fills the
    :class:`~megatron_autothink.train.state.LoopState`; the module says how to take this rank's
    input for one step and how to take the step. Everything between steps (metrics file,
    console, checkpoints, TensorBoard / W&B, evaluation) is a callback, so SFT and RL stages
    share them. Implemented by ``train.sft.SFTModule`` and ``rl.stage.RLModule``.
    """

    def next_item(self) -> Any:
        """This rank's input for one step (micro-batches for SFT, prompts for RL)."""
        ...

    def train_step(self, item: Any, step: int) -> dict[str, float]:
        """One optimizer step on ``item``; ``step`` is the 1-based step it completes."""
        ...


def run_loop(
    state: LoopState,
    module: StageModule,
    callbacks: list[Callback],
    *,
    watcher: PreemptionWatcher | None = None,
) -> LoopState:
    """Train ``state.total_steps`` steps from ``state.step``; returns the final state.

    ``on_train_end`` runs also when a step raises (TensorBoard is flushed, a W&B run is marked
    failed); checkpoints are saved only by ``on_step_end``, so a failed step never saves.
    """
    from megatron_autothink.data.loader import fetch_agreed  # energon: imported when used

    device = state.ctx.device
    for cb in callbacks:
        cb.on_train_start(state)
    try:
        while state.step < state.total_steps:
            # Agreed across ranks: a loader that gives up on one rank stops every rank together
            item = fetch_agreed(module.next_item, device=device)
            metrics = module.train_step(item, state.step + 1) | data_metrics(state.data)
            state.step += 1
            state.stop_requested = watcher.should_stop(device=device) if watcher else False
            for cb in callbacks:
                cb.on_step_end(state, metrics)
            if state.stop_requested:
                break
    finally:
        for cb in callbacks:
            cb.on_train_end(state)
    return state
