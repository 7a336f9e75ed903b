"""Process-group set-up: the one place that touches torch.distributed and megatron's parallel state.

Everything downstream (model, optimizer, data, RL) receives a :class:`ParallelContext` and the
``ProcessGroupCollection`` inside it; nothing calls ``parallel_state.get_*`` itself. megatron's
schedules and DDP still consult ``parallel_state`` internally, so we initialise it here once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_autothink.compat import cpu as cpu_compat
from megatron_autothink.config import AutothinkConfig


@dataclass
class ParallelContext:
    """Who this rank is and which groups it talks to."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    cp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    pg: ProcessGroupCollection

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """Last pipeline stage, first TP and DP rank: it holds the loss."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0


def init_distributed(cfg: AutothinkConfig, timeout_s: int = 600) -> ParallelContext:
    """Initialise torch.distributed (env:// rendezvous, or a 1-rank world) and megatron's groups.

    Works under ``torchrun``/``srun`` (RANK, WORLD_SIZE, MASTER_ADDR/PORT set) and as a plain
    single process. Validates the layout against the world size before creating any group.
    """
    cpu_compat.activate()
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        backend = cfg.parallel.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        cfg.world_layout(world)  # fail before any group exists
        init_method = None
        if world == 1 and "MASTER_PORT" not in os.environ:
            # A world of one (a plain process, a notebook, an in-process export): a private
            # port, not written to os.environ, where child processes (another `autothink
            # train`, torchrun) would inherit it and find it taken by this process's store.
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
    world = dist.get_world_size()
    layout = cfg.world_layout(world)
    p = cfg.parallel
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=p.vpp,
            context_parallel_size=p.cp,
        )
    pg = ProcessGroupCollection.use_mpu_process_groups()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=world,
        tp=layout["tp"],
        pp=layout["pp"],
        dp=layout["dp"],
        cp=layout["cp"],
        tp_rank=pg.tp.rank(),
        pp_rank=pg.pp.rank(),
        dp_rank=pg.dp.rank(),
        device=device,
        pg=pg,
    )


@contextmanager
def serial_gloo_workers() -> Iterator[None]:
    """Run a block of gloo collectives (dist-checkpoint save/load) with torch's intra-op thread
    count at 1 on a CPU-only machine; a no-op with CUDA.

    Why: a gloo worker thread that moves more than 32k elements runs torch's parallel copy, which
    gives that thread an OpenMP team of its own. libgomp then counts more threads than cores and
    throttles every team's spin-wait for the rest of the process, so the trainer's threads sleep
    between ops: the first checkpoint save of a one-rank tiny CPU run made every later step
    ~25% slower (dist-checkpointing's plan exchange gathers ~40 kB). torch fixes a thread's
    OpenMP width at its first parallel op, so a gloo thread first used in here stays serial.
    (Collectives on large tensors outside such blocks, e.g. DP > 1 gradient reductions, still
    start teams; see docs/benchmarks.md.)
    """
    if torch.cuda.is_available():
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed_everything(seed: int, ctx: ParallelContext) -> None:
    """Seed Python/NumPy/torch and megatron's model-parallel RNG tracker.

    Data-parallel ranks share a seed (identical init); pipeline stages get distinct offsets
    (as megatron does) so dropout differs per stage.
    """
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    s = seed + 100 * ctx.pp_rank
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    tensor_parallel.model_parallel_cuda_manual_seed(s)
