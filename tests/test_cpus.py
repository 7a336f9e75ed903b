"""Thread counts come from the CPUs a process may use, and one knob overrides them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_autothink import cpus

ROOT = Path(__file__).resolve().parents[1]
KNOBS = ("AUTOTHINK_THREADS", "OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for k in (*KNOBS, "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: None)
    return monkeypatch


def test_threads_follow_the_cpus_this_process_may_use(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert cpus.thread_count() == 8
    clean_env.setenv("SLURM_CPUS_PER_TASK", "3")  # SLURM allots 3, even without binding
    assert cpus.thread_count() == 3
    clean_env.delenv("SLURM_CPUS_PER_TASK")
    clean_env.setattr(cpus, "cgroup_cpu_limit", lambda: 2)  # docker --cpus 1.5 -> 2
    assert cpus.thread_count() == 2


def test_torchrun_ranks_split_their_task(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    clean_env.setenv("TORCHELASTIC_RUN_ID", "x")
    clean_env.setenv("LOCAL_WORLD_SIZE", "4")
    assert cpus.thread_count() == 4
    clean_env.setenv("LOCAL_WORLD_SIZE", "32")  # more ranks than CPUs: one thread each
    assert cpus.thread_count() == 1


def test_the_knob_wins_and_is_checked(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OMP_NUM_THREADS", "2")  # set by the sbatch script / the user
    assert cpus.thread_count() == 2
    clean_env.setenv("AUTOTHINK_THREADS", "1")
    assert cpus.thread_count() == 1
    clean_env.setenv("AUTOTHINK_THREADS", "two")
    with pytest.raises(ValueError, match="AUTOTHINK_THREADS='two': must be a whole number"):
        cpus.thread_count()


def test_cgroup_quota(tmp_path: Path) -> None:
    f = tmp_path / "cpu.max"
    f.write_text("max 100000\n")
    assert cpus.cgroup_cpu_limit(f) is None
    f.write_text("150000 100000\n")
    assert cpus.cgroup_cpu_limit(f) == 2
    assert cpus.cgroup_cpu_limit(tmp_path / "missing") is None


def test_a_process_pinned_to_one_cpu_trains_with_one_thread() -> None:
    """A real process under an affinity mask (taskset, SLURM binding), through the CLI's path:
    the wait policy is set before torch loads, the pool is sized from the mask, and children
    inherit the budget."""
    code = (
        "import os, sys\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from megatron_autothink.cpus import configure_threads, prepare_openmp_env\n"
        "reached = prepare_openmp_env()\n"
        "import torch\n"
        "n = configure_threads()\n"
        "print(reached, os.environ['OMP_WAIT_POLICY'], n, torch.get_num_threads(),"
        " os.environ['OMP_NUM_THREADS'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (*KNOBS, "OMP_WAIT_POLICY")}
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert r.stdout.split() == ["True", "PASSIVE", "1", "1", "1"], r.stderr
