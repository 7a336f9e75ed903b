"""The rendered batch script's control flow, run by bash with fake ``srun`` and ``scontrol``.

Fast and SLURM-free: the fakes run the rank command locally and record ``scontrol requeue``, so
each branch of the pre-emption logic (checkpoint confirmed, crash, finished first, hang past the
grace period, TERM, failed requeue) is exercised in seconds. The real-SLURM tests are in
test_slurm_e2e.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_autothink.config import load_config
from megatron_autothink.launch.options import SlurmOptions
from megatron_autothink.launch.render import render_sbatch
from tests.launch.cases import REPO

FAKE_SRUN = r"""#!/bin/bash
# fake srun: drop the (--opt=value) options and run the command as node 0 / task 0, relaying
# USR1 and TERM to it the way srun relays signals to its tasks.
while [[ $# -gt 0 && "$1" == --* ]]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0
"$@" &
child=$!
trap 'kill -s USR1 "$child"' USR1
trap 'kill -s TERM "$child"' TERM
rc=0
while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
exit "$rc"
"""

FAKE_SCONTROL = r"""#!/bin/bash
# fake scontrol: `show hostnames LIST` and `requeue JOBID` (recorded in $FAKE_LOG)
if [[ "$1" == show && "$2" == hostnames ]]; then tr ',' '\n' <<< "$3"; exit 0; fi
if [[ "$1" == requeue ]]; then echo "requeue $2" >> "$FAKE_LOG"; exit "${FAKE_REQUEUE_RC:-0}"; fi
exit 2
"""


def _script(
    tmp_path: Path,
    mode: str,
    steps: int = 100,
    lead: int = 60,
    extra: tuple[str, ...] | list[str] = (),
) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    cfg = load_config("tiny_cpu", [f"logging.run_dir={run_dir}"])
    opts = SlurmOptions(
        gpus_per_node=0,
        launcher="srun",
        signal_lead_s=lead,
        python=sys.executable,
        entry=["tests/launch/fake_rank.py", "--mode", mode, "--steps", str(steps), *extra],
        workdir=str(REPO),
    )
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(cfg, opts, config_path=str(tmp_path / "c.yaml")))
    return script, run_dir


def _start(tmp_path: Path, script: Path, **env: str) -> subprocess.Popen[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    full_env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "123",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_CPUS_ON_NODE": "2",
        "SLURM_SUBMIT_DIR": str(REPO),
        "FAKE_LOG": str(tmp_path / "fake.log"),
        **env,
    }
    # Output goes to a file, not a pipe: a hung rank would keep a pipe open after bash exits.
    out = (tmp_path / "job.out").open("w")
    return subprocess.Popen(
        ["bash", str(script)], env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True
    )


def _wait_ready(run_dir: Path, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not (run_dir / "ready").exists():
        assert proc.poll() is None, (run_dir.parent / "job.out").read_text()
        assert time.monotonic() < deadline, "the fake rank never started"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    rc = proc.wait(timeout=timeout)
    out_file = Path(str(proc.args[1])).with_name("job.out")  # type: ignore[index]
    return rc, out_file.read_text()


def _requeues(tmp_path: Path) -> list[str]:
    log = tmp_path / "fake.log"
    return log.read_text().splitlines() if log.exists() else []


def test_completes_without_requeue(tmp_path: Path) -> None:
    script, _ = _script(tmp_path, "obey", steps=3)
    rc, out = _finish(_start(tmp_path, script))
    assert rc == 0, out
    assert "ranks exited with status 0" in out and "fake rank: finished" in out
    assert _requeues(tmp_path) == []


def test_usr1_checkpoint_then_requeue(tmp_path: Path) -> None:
    script, run_dir = _script(tmp_path, "obey")
    proc = _start(tmp_path, script)
    _wait_ready(run_dir, proc)
    proc.send_signal(signal.SIGUSR1)
    rc, out = _finish(proc)
    assert rc == 0, out
    assert "fake rank: SIGUSR1" in out
    assert 'checkpoint confirmed: {"step"' in out
    assert _requeues(tmp_path) == ["requeue 123"]


def test_usr1_then_crash_still_requeues(tmp_path: Path) -> None:
    script, run_dir = _script(tmp_path, "crash")
    proc = _start(tmp_path, script)
    _wait_ready(run_dir, proc)
    proc.send_signal(signal.SIGUSR1)
    rc, out = _finish(proc)
    assert rc == 0, out
    assert "ranks exited with status 3" in out and "no PREEMPTED marker" in out
    assert _requeues(tmp_path) == ["requeue 123"]


def test_training_that_finishes_first_is_not_requeued(tmp_path: Path) -> None:
    script, run_dir = _script(tmp_path, "ignore", steps=15)
    proc = _start(tmp_path, script)
    _wait_ready(run_dir, proc)
    proc.send_signal(signal.SIGUSR1)
    rc, out = _finish(proc)
    assert rc == 0, out
    assert "training finished before the signal took effect" in out
    assert _requeues(tmp_path) == []


def test_hung_ranks_are_requeued_after_the_grace_period(tmp_path: Path) -> None:
    script, run_dir = _script(tmp_path, "hang", lead=20)  # grace = 10 s
    proc = _start(tmp_path, script)
    _wait_ready(run_dir, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    rc, out = _finish(proc)
    took = time.monotonic() - t0
    assert rc == 0, out
    assert "did not finish the checkpoint within 10s" in out
    assert _requeues(tmp_path) == ["requeue 123"]
    assert 9 <= took <= 20, took
    # the real scontrol requeue stops the step; here the fake rank is still running: stop it
    pid = int((run_dir / "ready").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)


def test_term_is_forwarded_and_never_requeues(tmp_path: Path) -> None:
    script, run_dir = _script(tmp_path, "obey")
    proc = _start(tmp_path, script)
    _wait_ready(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert "TERM: forwarding to the ranks" in out and "fake rank: SIGTERM" in out
    assert rc == 0, out
    assert _requeues(tmp_path) == []


def test_failed_requeue_is_an_error(tmp_path: Path) -> None:
    script, run_dir = _script(tmp_path, "obey")
    proc = _start(tmp_path, script, FAKE_REQUEUE_RC="1")
    _wait_ready(run_dir, proc)
    proc.send_signal(signal.SIGUSR1)
    rc, out = _finish(proc)
    assert rc == 1, out
    assert "ERROR: scontrol requeue failed" in out


def test_stale_marker_is_removed_before_the_ranks_start(tmp_path: Path) -> None:
    script, run_dir = _script(tmp_path, "obey", steps=2)
    run_dir.mkdir(parents=True)
    (run_dir / "PREEMPTED").write_text("old\n")
    rc, out = _finish(_start(tmp_path, script))
    assert rc == 0, out
    assert not (run_dir / "PREEMPTED").exists()


@pytest.mark.slow
def test_usr1_is_resent_to_ranks_that_were_not_listening_yet(tmp_path: Path) -> None:
    """A rank that ignores the first USR1 (still importing) gets it again 10 s later."""
    script, run_dir = _script(tmp_path, "obey", steps=1000, extra=["--listen-after", "3"])
    proc = _start(tmp_path, script)
    deadline = time.monotonic() + 20
    while not (run_dir / "started").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # lost: the rank still ignores USR1
    t0 = time.monotonic()
    rc, out = _finish(proc, timeout=90)
    assert rc == 0, out
    assert 'checkpoint confirmed: {"step"' in out
    assert _requeues(tmp_path) == ["requeue 123"]
    assert time.monotonic() - t0 >= 8
