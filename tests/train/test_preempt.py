"""PreemptionWatcher: the trainer's side of the protocol, in a real child process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_autothink.train.preempt import (
    ENV_MARKER,
    MARKER_NAME,
    marker_path,
    restart_count,
    write_marker,
)
from tests.launch.cases import REPO

CHILD = textwrap.dedent(
    """
    import multiprocessing as mp, os, signal, sys, time
    from megatron_autothink.train.preempt import PreemptionWatcher

    def helper(q):
        q.put(os.getpid())
        time.sleep(30)

    if __name__ == "__main__":
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # as the launcher's wrapper leaves it
        watcher = PreemptionWatcher().install()
        ctx = mp.get_context(sys.argv[1])
        q = ctx.Queue()
        p = ctx.Process(target=helper, args=(q,), daemon=True)
        p.start()
        child = q.get()
        import threading
        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
        # what srun does: signal every process of the step
        os.kill(child, signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(100):
            if watcher.requested:
                break
            time.sleep(0.01)
        time.sleep(0.2)
        print(watcher.requested, watcher.signal_name, p.is_alive(), watcher.should_stop())
        p.kill()
    """
)


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_usr1_sets_the_flag_and_spares_children(start_method: str, tmp_path: Path) -> None:
    script = tmp_path / "child.py"  # a file: spawn re-imports __main__ by path
    script.write_text(CHILD)
    r = subprocess.run(
        [sys.executable, str(script), start_method],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "SIGUSR1", "True", "True"]


def test_term_is_noted_but_not_blocked() -> None:
    code = textwrap.dedent(
        """
        import os, signal, time
        from megatron_autothink.train.preempt import PreemptionWatcher
        w = PreemptionWatcher().install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())
        print(w.requested, w.signal_name, signal.SIGTERM in blocked, signal.SIGUSR1 in blocked)
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.stdout.split() == ["True", "SIGTERM", "False", "True"], r.stderr


def test_marker_path_and_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_MARKER, raising=False)
    assert marker_path(tmp_path) == tmp_path / MARKER_NAME
    monkeypatch.setenv(ENV_MARKER, str(tmp_path / "elsewhere" / "M"))
    assert marker_path(tmp_path) == tmp_path / "elsewhere" / "M"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.delenv("AUTOTHINK_RESTART_COUNT", raising=False)
    assert restart_count() == 2
    write_marker(marker_path(tmp_path), step=5, checkpoint="/c/step_5", signal_name="SIGUSR1")
    info = json.loads((tmp_path / "elsewhere" / "M").read_text())
    assert info["step"] == 5 and info["restart_count"] == 2 and info["signal"] == "SIGUSR1"
    assert not list((tmp_path / "elsewhere").glob("*.tmp*"))


def test_install_refuses_other_threads() -> None:
    import threading

    from megatron_autothink.train.preempt import PreemptionWatcher

    errors: list[BaseException] = []

    def run() -> None:
        try:
            PreemptionWatcher(signals=(signal.SIGUSR2,), blocked=()).install()
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors and "main thread" in str(errors[0])


SAVER = textwrap.dedent(
    """
    import os, sys, time
    import torch
    import torch.distributed as dist
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron_autothink.checkpoint_io import save_dist
    from megatron_autothink.compat import cpu
    from megatron_autothink.train.preempt import PreemptionWatcher

    def state():
        return {"w": ShardedTensor.from_rank_offsets("w", torch.ones(256, 256), replica_id=0)}

    if __name__ == "__main__":
        out = sys.argv[1]
        watcher = PreemptionWatcher().install()
        cpu.activate()
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0,
                                world_size=1)
        os.makedirs(out + "/periodic")
        save_dist(state(), out + "/periodic")  # megatron started its helpers at the first save
        print("saved periodic", flush=True)
        while not watcher.requested:
            time.sleep(0.05)
        os.makedirs(out + "/preempt")
        save_dist(state(), out + "/preempt")
        print("saved on", watcher.signal_name, flush=True)
    """
)


def _group_members(pgid: int) -> list[str]:
    """Command lines of the live (not zombie) processes in process group ``pgid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            found.append(f"{stat.parent.name}: {cmd}")
    return found


def _python(*argv: str, new_session: bool = False, **env: str) -> subprocess.Popen[str]:
    """A fresh interpreter (``python *argv``) on the repo's package, with piped text output;
    ``new_session``: its own process group, as srun / a batch step gives it."""
    return subprocess.Popen(
        [sys.executable, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        start_new_session=new_session,
    )


def _start_saver(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    import socket

    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ckpt"
    proc = _python(str(script), str(out), str(port), new_session=True, OMP_NUM_THREADS="1")
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "saved periodic", proc.communicate(timeout=30)[1]
    return proc, out


def test_preemption_save_survives_a_group_wide_term(tmp_path: Path) -> None:
    """scancel / timeout / SLURM send TERM to every process of the job, the checkpoint writer's
    helpers included: the save after the signal still completes and nothing is left behind."""
    proc, out = _start_saver(tmp_path)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.strip() == "saved on SIGTERM"
    assert (out / "preempt" / ".metadata").is_file()
    assert _group_members(proc.pid) == []


def test_no_checkpoint_helper_outlives_a_killed_trainer(tmp_path: Path) -> None:
    """kill -9 after a save must not leave megatron's helper processes running forever."""
    proc, _ = _start_saver(tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    assert _group_members(proc.pid) == []


STUCK = textwrap.dedent(
    """
    import sys, time
    from megatron_autothink.train.preempt import PreemptionWatcher
    w = PreemptionWatcher(repeat_after_s=float(sys.argv[1])).install()
    print("ready", flush=True)
    while True:  # a rank that never reaches a step boundary (stuck loading data)
        time.sleep(0.05)
    """
)


def test_second_sigterm_ends_a_process_stuck_before_the_step_boundary() -> None:
    proc = _python("-c", STUCK, "0.5")
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # a copy arriving together (torchrun forwards TERM)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)  # the first request waits for a step boundary
        proc.send_signal(signal.SIGUSR1)  # re-sent by the batch script while ranks save
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        assert proc.stderr is not None
        assert "second signal: exiting without checkpoint" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


BOUNDED = textwrap.dedent(
    """
    import sys, time
    from megatron_autothink.train.preempt import PreemptionWatcher
    w = PreemptionWatcher(boundary_timeout_s=float(sys.argv[1])).install()
    print("ready", flush=True)
    while not w.requested:
        time.sleep(0.01)
    if sys.argv[2] == "boundary":  # the ranks reach the boundary, then save for a while
        assert w.should_stop()
        time.sleep(3 * float(sys.argv[1]))
        print("saved", flush=True)
        sys.exit(0)
    time.sleep(60)  # a step that never ends (one collective, one data wait)
    """
)


@pytest.mark.parametrize("case", ["stuck", "boundary"])
def test_step_boundary_timeout_exits_without_checkpoint(case: str) -> None:
    """A single SIGTERM and no step boundary: the process exits by itself once
    ``boundary_timeout_s`` has passed, with the reason; a boundary reached in time disarms the
    timer (the save that follows is not timed)."""
    limit = 1.0
    proc = _python("-c", BOUNDED, str(limit), case)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
        stdout, stderr = proc.communicate()
        if case == "stuck":
            assert rc == 128 + signal.SIGTERM, stderr
            assert limit <= elapsed < limit + 2.0, elapsed
            assert (
                "SIGTERM: no step boundary within 1 s of the signal "
                "(checkpoint.preempt_timeout_s): exiting without checkpoint"
            ) in stderr
        else:
            assert rc == 0 and stdout.strip() == "saved", stderr
            assert elapsed >= 3 * limit and "no step boundary" not in stderr
    finally:
        proc.kill()
        proc.wait()


FORKER = textwrap.dedent(
    """
    import multiprocessing as mp, os, sys, time
    from megatron_autothink.checkpoint_io import _forks_die_with_parent

    def writer():
        time.sleep(60)  # a checkpoint writer still writing when the trainer dies

    if __name__ == "__main__":
        ctx = mp.get_context("fork")  # as megatron's FileSystemWriterAsync forks its writers
        with _forks_die_with_parent():
            bound = ctx.Process(target=writer)
            bound.start()
        free = ctx.Process(target=writer)  # forked outside a save: not bound
        free.start()
        print(bound.pid, free.pid, flush=True)
        time.sleep(60)
    """
)


def test_checkpoint_writers_forked_during_a_save_die_with_a_killed_trainer() -> None:
    """kill -9 of the trainer alone mid-save: its forked writers get SIGKILL too (they would
    go on writing into the unfinished checkpoint the next start removes)."""
    proc = _python("-c", FORKER, new_session=True)
    assert proc.stdout is not None
    bound, free = map(int, proc.stdout.readline().split())
    try:
        proc.kill()  # the trainer only, not its group
        proc.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{bound}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{bound}").exists() or "Z" in Path(f"/proc/{bound}/stat").read_text()
        assert Path(f"/proc/{free}").exists()  # the control: unbound forks outlive it
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
