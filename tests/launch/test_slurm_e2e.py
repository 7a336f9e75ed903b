"""End to end on a real SLURM cluster (munged + slurmctld + 2 slurmd on 127.0.0.1).

Jobs are submitted by ``autothink launch slurm`` (``python -m megatron_autothink.launch.cli``)
exactly as users do, and run the tiny CPU recipe on 2 nodes. Two programs play the trainer:

* ``standin``: tests/launch/standin_job.py, which obeys the pre-emption protocol with a counter
  checkpoint, so the SLURM mechanics (rendezvous, node ranks, per-node logs, USR1, requeue,
  SLURM_RESTART_COUNT, resume) are proven now;
* ``autothink-train``: the real ``autothink train``; skipped while
  ``megatron_autothink.pipeline`` does not exist in this branch.

Skipped, with the reason, when SLURM/munge are missing or their daemons cannot start here.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.launch.cases import REPO
from tests.launch.slurm_cluster import HOST, NODES, SlurmCluster, host_is_loopback

pytestmark = pytest.mark.timeout(600)

HAVE_TRAINER = importlib.util.find_spec("megatron_autothink.pipeline") is not None
TRAINERS = [
    pytest.param("standin", id="standin"),
    pytest.param(
        "autothink-train",
        id="autothink-train",
        # The real trainer needs prepared shards and minutes per job: slow.
        marks=[
            pytest.mark.skipif(not HAVE_TRAINER, reason="megatron_autothink.pipeline missing"),
            pytest.mark.slow,
        ],
    ),
]


def launch(
    slurm: SlurmCluster,
    run_dir: Path,
    *,
    trainer: str,
    nodes: int,
    procs: int,
    steps: int,
    step_seconds: float = 0.25,
    launcher: str = "torchrun",
    extra: tuple[str, ...] = (),
    overrides: tuple[str, ...] = (),
) -> str:
    """Submit with the real CLI; return the job id."""
    argv = [
        sys.executable,
        "-m",
        "megatron_autothink.launch.cli",
        "slurm",
        "--config",
        "tiny_cpu",
        "--nodes",
        str(nodes),
        "--gpus-per-node",
        "0",
        "--procs-per-node",
        str(procs),
        "--launcher",
        launcher,
        "--time",
        "00:10:00",
        "--signal-lead",
        "120",
        # keep gloo on the loopback interface (the machine may have others)
        "--env",
        "GLOO_SOCKET_IFNAME=lo",
    ]
    if not host_is_loopback():
        # The default MASTER_ADDR is the first node's name, i.e. this machine's hostname; it
        # does not resolve to 127.0.0.1 here, so pin the rendezvous to the loopback address.
        argv += ["--master-addr", "127.0.0.1"]
    if trainer == "standin":
        argv += ["--entry", f"tests/launch/standin_job.py --step-seconds {step_seconds}"]
    argv += list(extra)
    argv += [f"logging.run_dir={run_dir}", f"train.steps={steps}", *overrides]
    r = subprocess.run(argv, env=slurm.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"submitted job (\d+)", r.stdout)
    assert m, r.stdout
    return m.group(1)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny digits shards + tokenizer for the real trainer (built on first use)."""
    d = tmp_path_factory.mktemp("slurm_digits") / "data"
    cli = [sys.executable, "-m", "megatron_autothink.cli", "prep"]
    subprocess.run(
        [*cli, "digits", "--out", str(d), "--train", "300", "--test", "20", "--no-progress"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*cli, "tokenizer", "--out", str(d / "tokenizer")], check=True, capture_output=True
    )
    return d


def trainer_overrides(request: pytest.FixtureRequest, trainer: str, dp: int) -> tuple[str, ...]:
    if trainer == "standin":
        return ()
    d = request.getfixturevalue("digits")
    return (
        f"data.train_path={d}",
        "data.seq_length=256",
        "data.micro_batch_size=2",
        f"data.global_batch_size={2 * dp}",
        "train.eval_every=0",
        "logging.tensorboard=false",
    )


def events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "standin.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def batch_log(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*.out")))


def diagnose(slurm: SlurmCluster, run_dir: Path, job_id: str) -> str:
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((run_dir / "logs").glob("*.log"))
    )
    return f"job {slurm.job(job_id)}\nbatch log:\n{batch_log(run_dir)}\n{logs}"


def _wait_until(
    ready: Callable[[], bool],
    failure: str,
    run_dir: Path,
    slurm: SlurmCluster,
    job_id: str,
    timeout: float,
    poll: float,
) -> None:
    """Poll ``ready`` until it holds; else fail with ``failure`` and the job's diagnosis."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(poll)
    pytest.fail(f"{failure} after {timeout} s\n{diagnose(slurm, run_dir, job_id)}")


def wait_for_training(run_dir: Path, slurm: SlurmCluster, job_id: str, timeout: float) -> None:
    """Wait until ``autothink train`` has logged a step (its console line ``step N/M``)."""

    def logged() -> bool:
        return any(re.search(r"\bstep \d+/\d+", p.read_text()) for p in run_dir.glob("logs/*.log"))

    _wait_until(logged, "no training step logged", run_dir, slurm, job_id, timeout, poll=0.5)


def wait_for_steps(run_dir: Path, n: int, slurm: SlurmCluster, job_id: str, timeout: float) -> None:
    log = run_dir / "steps.log"

    def done() -> bool:
        return log.exists() and len(log.read_text().splitlines()) >= n

    _wait_until(done, f"fewer than {n} steps", run_dir, slurm, job_id, timeout, poll=0.2)


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("srun", marks=pytest.mark.slow)])
def test_runs_to_completion(
    slurm: SlurmCluster, tmp_path: Path, trainer: str, launcher: str, request: pytest.FixtureRequest
) -> None:
    run_dir = tmp_path / "run"
    job = launch(
        slurm,
        run_dir,
        trainer=trainer,
        launcher=launcher,
        nodes=2,
        procs=2,
        steps=8,
        overrides=trainer_overrides(request, trainer, dp=4),
    )
    try:
        info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 240)
    except TimeoutError as e:
        pytest.fail(f"{e}\n{diagnose(slurm, run_dir, job)}")
    assert info["JobState"] == "COMPLETED", diagnose(slurm, run_dir, job)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    assert "ranks exited with status 0" in batch_log(run_dir)
    node_logs = sorted(p.name for p in (run_dir / "logs").glob("*.log"))
    assert node_logs == [
        f"autothink-tiny_cpu-{job}-r0-node0.log",
        f"autothink-tiny_cpu-{job}-r0-node1.log",
    ]
    if trainer != "standin":
        assert any((run_dir / "checkpoints").iterdir())
        return
    start, done = events(run_dir)
    assert start["world"] == 4 and start["start_step"] == 0 and start["job_id"] == job
    # ranks 0,1 on node 0 and 2,3 on node 1: node rank and local rank come from SLURM
    assert [(r["rank"], r["local_rank"], r["node"]) for r in start["ranks"]] == [
        (0, 0, NODES[0]),
        (1, 1, NODES[0]),
        (2, 0, NODES[1]),
        (3, 1, NODES[1]),
    ]
    if host_is_loopback():
        assert start["master"].startswith(f"{HOST}:")  # first host of the allocation
    assert done == {"event": "done", "restart": 0, "step": 8}
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000008"
    for name in node_logs:
        assert "joined the group" in (run_dir / "logs" / name).read_text()


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize(
    ("launcher", "nodes"),
    [
        ("torchrun", 1),  # the default suite: ~50 s here, most of it importing torch
        pytest.param("torchrun", 2, marks=pytest.mark.slow),
        pytest.param("srun", 2, marks=pytest.mark.slow),
    ],
)
def test_preempted_job_requeues_and_resumes(
    slurm: SlurmCluster,
    tmp_path: Path,
    trainer: str,
    launcher: str,
    nodes: int,
    request: pytest.FixtureRequest,
) -> None:
    """USR1 as SLURM sends it before the time limit (`scancel --batch --signal=USR1`):
    checkpoint, PREEMPTED marker, requeue, rerun with SLURM_RESTART_COUNT=1, resume."""
    run_dir = tmp_path / "run"
    # The real trainer must still be running when USR1 comes: ~50 ms a tiny step here.
    steps = 40 if trainer == "standin" else 600
    job = launch(
        slurm,
        run_dir,
        trainer=trainer,
        launcher=launcher,
        nodes=nodes,
        procs=1,
        steps=steps,
        step_seconds=0.1,
        overrides=trainer_overrides(request, trainer, dp=nodes),
    )
    if trainer == "standin":
        wait_for_steps(run_dir, 4, slurm, job, timeout=120)
    else:
        wait_for_training(run_dir, slurm, job, timeout=180)
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    try:
        info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
    except TimeoutError as e:
        pytest.fail(f"{e}\n{diagnose(slurm, run_dir, job)}")
    assert info["JobState"] == "COMPLETED", diagnose(slurm, run_dir, job)
    assert info["Restarts"] == "1", diagnose(slurm, run_dir, job)
    log = batch_log(run_dir)
    assert "USR1: asking the ranks to checkpoint" in log
    assert "checkpoint confirmed" in log and "requeued;" in log
    assert f"job {job} restart 1] starting" in log
    assert sorted(p.name for p in (run_dir / "logs").glob("*.log")) == [
        f"autothink-tiny_cpu-{job}-r{r}-node{n}.log" for r in (0, 1) for n in range(nodes)
    ]
    if trainer != "standin":
        return
    start0, preempted, start1, done = events(run_dir)
    k = preempted["step"]
    assert start0["restart"] == 0 and start0["start_step"] == 0
    assert preempted["restart"] == 0 and preempted["signal"] == "SIGUSR1"
    assert preempted["helper_alive"], "a spawned helper process died from USR1"
    assert 4 <= k < steps
    assert start1["restart"] == 1 and start1["slurm_restart_count"] == "1"
    assert start1["start_step"] == k, "the rerun did not resume from the checkpoint"
    assert done == {"event": "done", "restart": 1, "step": steps}
    # every step ran exactly once: 1..k before the requeue, k+1..steps after it
    lines = [
        tuple(map(int, line.split()))
        for line in (run_dir / "steps.log").read_text().split("\n")
        if line
    ]
    assert lines == [(0, s) for s in range(1, k + 1)] + [(1, s) for s in range(k + 1, steps + 1)]
    assert not (run_dir / "PREEMPTED").exists()  # removed by the rerun before it started


@pytest.mark.slow
def test_time_limit_signal_requeues_and_resumes(slurm: SlurmCluster, tmp_path: Path) -> None:
    """The real thing: SLURM itself sends USR1 60 s before a 2-minute limit; the job checkpoints,
    requeues, and the reruns finish the 100 steps (SLURM may signal up to 60 s early)."""
    run_dir = tmp_path / "run"
    job = launch(
        slurm,
        run_dir,
        trainer="standin",
        nodes=2,
        procs=1,
        steps=100,
        step_seconds=1.0,
        extra=("--time", "2", "--signal-lead", "60"),
    )
    try:
        info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 540, poll=2)
    except TimeoutError as e:
        pytest.fail(f"{e}\n{diagnose(slurm, run_dir, job)}")
    assert info["JobState"] == "COMPLETED", diagnose(slurm, run_dir, job)
    assert int(info["Restarts"]) >= 1
    evs = events(run_dir)
    pre = [e for e in evs if e["event"] == "preempted"]
    assert pre and all(e["signal"] == "SIGUSR1" for e in pre)
    assert evs[-1] == {"event": "done", "restart": int(info["Restarts"]), "step": 100}
    steps_done = [int(line.split()[1]) for line in (run_dir / "steps.log").read_text().splitlines()]
    assert steps_done == list(range(1, 101)), "a step was lost or repeated across requeues"
    # for the record in docs/launch.md (shown with -rA)
    print("\n".join(line for line in batch_log(run_dir).splitlines() if "[autothink" in line))
    print("preempted at steps", [e["step"] for e in pre], "restarts", info["Restarts"])
