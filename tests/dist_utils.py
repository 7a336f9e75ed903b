"""Spawn gloo ranks on CPU and collect what each returns (OLMo-core style run_distributed_test)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def python_launcher(nproc: int) -> list[str]:
    """Command prefix that starts ``python -m ...`` on ``nproc`` local ranks (torchrun when > 1)."""
    if nproc == 1:
        return [sys.executable]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--standalone",
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int, world: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        torch.save(
            {"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt")
        )
        raise
    finally:
        # megatron's groups exist only if fn imported megatron_autothink.parallel; importing it
        # here just to tear down a plain gloo group costs ~10-30 s of megatron.core import.
        if "megatron_autothink.parallel" in sys.modules:
            from megatron_autothink.parallel import destroy_distributed

            destroy_distributed()
        elif torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh gloo ranks; return each rank's result."""
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, d, fn, args))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        results = []
        for r in range(world_size):
            path = os.path.join(d, f"{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(
                    f"rank {r} died without a result (exit code {procs[r].exitcode})"
                )
            out = torch.load(path, weights_only=False)
            if not out["ok"]:
                raise RuntimeError(f"rank {r} failed:\n{out['error']}")
            results.append(out["result"])
        return results


def sigkill_job(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a job started with ``start_new_session=True`` and everything it spawned, as
    SLURM does when it kills a job. Killing only the launcher would orphan its children (e.g.
    the multiprocessing manager megatron's checkpoint writer starts), which then live on."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
