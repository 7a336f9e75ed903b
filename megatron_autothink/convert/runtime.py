"""Process-group set-up for the offline conversions.

Conversions build the real model, so they need torch.distributed and megatron's parallel state
even in one process. :func:`conversion_context` creates them (a 1-rank gloo world, or whatever
``torchrun`` launched) unless the caller already has, and tears down only what it created.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_autothink.config import (
    AutothinkConfig,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
)
from megatron_autothink.parallel import ParallelContext, destroy_distributed, init_distributed
from megatron_autothink.weights.mapping import ConversionError

__all__ = ["conversion_context"]


@contextmanager
def conversion_context(
    model_cfg: ModelConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    precision: Literal["fp32", "bf16"] = "fp32",
) -> Iterator[tuple[AutothinkConfig, ParallelContext]]:
    """A run config and parallel context for building ``model_cfg`` at TP=``tp``, PP=``pp``
    (``vpp`` virtual stages per rank).

    World size 1 unless launched by torchrun/srun (``WORLD_SIZE``); extra ranks are data
    parallel. If megatron's groups already exist (a caller inside a training process), they are
    reused and must match ``tp``/``pp``.
    """
    world = (
        dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    )
    if world % (tp * pp):
        raise ConversionError(f"world size {world} is not a multiple of tp*pp={tp * pp}")
    dp = world // (tp * pp)
    backend = "auto" if torch.cuda.is_available() else "gloo"
    cfg = AutothinkConfig(
        model=model_cfg,
        parallel=ParallelConfig(
            tp=tp, pp=pp, vpp=vpp, backend=backend, distributed_optimizer=False
        ),
        data=DataConfig(micro_batch_size=1, global_batch_size=dp),
        train=TrainConfig(precision=precision),
    )
    created_dist = not dist.is_initialized()
    created_groups = created_dist or not parallel_state.model_parallel_is_initialized()
    ctx = init_distributed(cfg)
    try:
        if ctx.pg.tp.size() != tp or ctx.pg.pp.size() != pp:
            raise ConversionError(
                f"megatron is already initialised with tp={ctx.pg.tp.size()}, "
                f"pp={ctx.pg.pp.size()}; this conversion needs tp={tp}, pp={pp}"
            )
        yield cfg, ctx
    finally:
        # Undo exactly what we set up, so conversions can run one after another in one job.
        if created_dist:
            destroy_distributed()
        elif created_groups:
            parallel_state.destroy_model_parallel()
