"""How many CPU threads this process should use, and OpenMP settings that survive sharing cores.

Why: torch sizes its intra-op (OpenMP) pool from the machine, and libgomp's threads spin while
they wait for each other. Four processes on two shared cores (a training run, an eval and two
small runs) then spend their time spinning on descheduled peers: annealing fell from ~11k to
190-380 tokens/s, 30x, far past the 4x share (issue #22 item 11; docs/benchmarks.md, "Sharing a
machine").

Two settings, both overridable:

* the **thread count** (:func:`thread_count`): ``AUTOTHINK_THREADS`` if set, else
  ``OMP_NUM_THREADS`` if set (the sbatch script sets it to the rank's CPUs; torchrun sets 1),
  else the CPUs this process may use (:func:`usable_cpus`: affinity, cgroup quota,
  ``SLURM_CPUS_PER_TASK``) divided among the torchrun ranks that share them;
* the **OpenMP wait policy** (:func:`prepare_openmp_env`): ``OMP_WAIT_POLICY=PASSIVE`` unless the
  user chose one, so a waiting thread sleeps instead of spinning. libgomp reads it once, when
  torch is imported, so the CLI sets it before that.

Standard library only; torch is imported only by :func:`configure_threads`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_THREADS = "AUTOTHINK_THREADS"
"""Threads per process (trainer and, on CPU, its vLLM engine); overrides everything else."""
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name}={raw!r}: must be a whole number of threads >= 1 (or unset)")
    return value


def cgroup_cpu_limit(path: Path = CGROUP_CPU_MAX) -> int | None:
    """CPUs the cgroup quota allows (``docker --cpus``, Kubernetes limits), rounded up; None
    without a quota (cgroup v2 ``cpu.max`` is ``max PERIOD`` or ``QUOTA PERIOD``)."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, -(-int(quota) // int(period)))


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, SLURM's task binding),
    capped by the cgroup quota and by ``SLURM_CPUS_PER_TASK`` (SLURM without task binding
    still allots only that many)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, limit)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        n = min(n, int(slurm))
    return max(1, n)


def ranks_sharing_cpus() -> int:
    """Processes splitting :func:`usable_cpus`: torchrun's ranks of one node share its task's
    CPUs (``LOCAL_WORLD_SIZE``); a rank started by srun, or a plain process, has its own."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return 1
    raw = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1


def thread_count() -> int:
    """Intra-op threads for this process (see the module docstring for the order)."""
    for name in (ENV_THREADS, "OMP_NUM_THREADS"):
        raw = os.environ.get(name, "").strip()
        if raw:
            return _positive_int(name, raw)
    return max(1, usable_cpus() // ranks_sharing_cpus())


def prepare_openmp_env() -> bool:
    """Default ``OMP_WAIT_POLICY=PASSIVE`` for this process and its children, before torch is
    imported (libgomp reads it at load). A value the user set is kept. Returns whether the
    setting reaches this process's OpenMP runtime (False once torch is imported)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "torch" not in sys.modules


def configure_threads(n: int | None = None) -> int:
    """Size torch's intra-op pool (``n`` or :func:`thread_count`) and export the same
    ``OMP_NUM_THREADS`` to the processes started later (vLLM's engine process, workers), so
    they share this process's budget rather than each taking every core. Returns the count."""
    import torch

    n = thread_count() if n is None else n
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n
