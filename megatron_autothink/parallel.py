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
        with one_gloo_device(enabled=backend == "gloo"):
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
        with one_gloo_device(enabled=dist.get_backend() == "gloo"):
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


_GLOO_DEVICES: list[object] = []
"""The process's shared gloo devices (created at first use; see :func:`one_gloo_device`)."""


@contextmanager
def one_gloo_device(enabled: bool = True) -> Iterator[None]:
    """Every gloo process group created inside shares one gloo transport device.

    Why: torch gives each gloo group its own device, and each device runs a network loop thread
    that wakes every 10 ms even when idle. megatron creates ~20 groups (tp, pp, dp, cp, ep,
    embedding, their combinations, gloo copies), so a CPU run carried ~20 threads waking ~2000
    times a second between the trainer's two compute threads: ~9% of a tiny training step on a
    2-core machine (docs/benchmarks.md). gloo devices are made to be shared by many contexts;
    with one, the process has one loop thread (per interface). Groups are still separate (own
    store prefix, own pairs, own worker threads), so collectives on different groups stay
    independent.

    torch builds gloo groups inside ``init_process_group``/``new_group`` and takes no device
    for them, so for the duration of the block its ``ProcessGroupGloo`` name points at a
    subclass that passes the shared device; instances remain ``ProcessGroupGloo``.
    ``GLOO_SOCKET_IFNAME`` is honoured as torch does (one device per listed interface).
    """
    if not enabled or not dist.is_gloo_available():
        yield
        return
    import torch.distributed.distributed_c10d as c10d

    base = c10d.ProcessGroupGloo
    devices = _GLOO_DEVICES

    class _SharedDeviceGloo(base):  # type: ignore[misc, valid-type]
        def __init__(
            self, store: object, rank: int, size: int, timeout: timedelta | None = None
        ) -> None:
            if not devices:
                names = [i for i in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if i]
                devices.extend(
                    [base.create_device(interface=i) for i in names]
                    or [base.create_default_device()]
                )
            opts = base._Options()  # type: ignore[attr-defined]
            if timeout is not None:
                opts._timeout = timeout
            opts._devices = devices
            super().__init__(store, rank, size, opts)

    c10d.ProcessGroupGloo = _SharedDeviceGloo  # type: ignore[misc]
    try:
        yield
    finally:
        c10d.ProcessGroupGloo = base  # type: ignore[misc]


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
