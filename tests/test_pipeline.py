"""`autothink train` end to end on real digits shards: loss falls, SIGKILL + restart resumes
exactly, and TP=2 / PP=2 runs on 2 gloo ranks (torchrun)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist_utils import python_launcher, sigkill_job

TINY = [
    "data.seq_length=256",
    "data.micro_batch_size=2",
    "data.global_batch_size=4",
    "optim.lr=2e-3",
    "optim.warmup_fraction=0.0",
    "train.eval_every=0",
    "train.log_every=1",
    "logging.tensorboard=false",
]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("digits") / "data"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cli = [sys.executable, "-m", "megatron_autothink.cli", "prep"]
    subprocess.run(
        [*cli, "digits", "--out", str(d), "--train", "600", "--test", "60", "--no-progress"],
        check=True,
        env=env,
        capture_output=True,
    )
    subprocess.run(
        [*cli, "tokenizer", "--out", str(d / "tokenizer")], check=True, env=env, capture_output=True
    )
    return d


def _cmd(data: Path, run: Path, *extra: str, nproc: int = 1) -> list[str]:
    return [
        *python_launcher(nproc),
        "-m",
        "megatron_autothink.cli",
        "train",
        f"data.train_path={data}",
        f"logging.run_dir={run}",
        *TINY,
        *extra,
    ]


def _losses(run: Path) -> dict[int, float]:
    """Last logged loss per step (a resumed run appends; re-logged steps overwrite)."""
    out: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def test_loss_falls_on_digits(digits: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    subprocess.run(
        _cmd(digits, run, "train.steps=30", "checkpoint.save_every=0"),
        check=True,
        capture_output=True,
        timeout=900,
    )
    losses = _losses(run)
    first = sum(losses[s] for s in (1, 2, 3)) / 3
    last = sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < first - 2.0, (first, last)
    ckpt = run / "checkpoints" / "sft" / "iter_00000030"
    assert (ckpt / "meta.json").exists()
    # train.init_from: the trained weights, exported to a HF dir, start a new run where the
    # old one ended (first loss far below a random init's).
    from megatron_autothink.eval.model import export_training_checkpoint

    export_training_checkpoint(ckpt, tmp_path / "hf")
    again = tmp_path / "again"
    subprocess.run(
        _cmd(digits, again, "train.steps=1", f"train.init_from={tmp_path / 'hf'}"),
        check=True,
        capture_output=True,
        timeout=900,
    )
    assert _losses(again)[1] < first - 1.5, (_losses(again), first)


def test_sigkill_then_restart_resumes_exactly(digits: Path, tmp_path: Path) -> None:
    steps = ["train.steps=10", "checkpoint.save_every=3"]
    ref = tmp_path / "ref"
    subprocess.run(_cmd(digits, ref, *steps), check=True, capture_output=True, timeout=900)
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(digits, run, *steps),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    target = run / "checkpoints" / "sft" / "iter_00000006"
    deadline = time.time() + 600
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert target.exists(), "no checkpoint at step 6 before the run ended"
    sigkill_job(proc)
    subprocess.run(_cmd(digits, run, *steps), check=True, capture_output=True, timeout=900)
    want, got = _losses(ref), _losses(run)
    assert sorted(got) == list(range(1, 11))
    assert [got[s] for s in range(7, 11)] == [want[s] for s in range(7, 11)]


def test_replayed_steps_are_logged_once_and_data_counts_are_logged(
    digits: Path, tmp_path: Path
) -> None:
    """A run that died after logging step 3 but before saving it resumes from step 2: step 3
    runs again and metrics.jsonl keeps one row for it. Every row carries the loader counts."""
    run = tmp_path / "run"
    args = _cmd(digits, run, "train.steps=3", "checkpoint.save_every=2")
    subprocess.run(args, check=True, capture_output=True, timeout=600)
    import shutil

    shutil.rmtree(run / "checkpoints" / "sft" / "iter_00000003")  # died before this save
    (run / "checkpoints" / "sft" / "latest").write_text("iter_00000002")
    subprocess.run(args, check=True, capture_output=True, timeout=600)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"data/samples_read", "data/bad_sample", "data/too_long"} <= r.keys()
        assert r["data/bad_sample"] == 0 and r["data/samples_read"] > 0


def test_no_sample_fits_fails_fast_with_the_reason(digits: Path, tmp_path: Path) -> None:
    """data.seq_length below every sample: a clear error in seconds, not an endless search
    (and SIGTERM-proof hang) writing warnings for every skipped sample."""
    t0 = time.time()
    proc = subprocess.run(
        _cmd(digits, tmp_path / "run", "train.steps=2", "data.seq_length=32"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "samples read were all unusable" in proc.stderr
    assert "longer than seq_length=32" in proc.stderr
    assert len(proc.stderr) + len(proc.stdout) < 100_000  # a few warnings, not one per sample
    assert time.time() - t0 < 120


def test_resume_refuses_changed_settings_unless_allowed(digits: Path, tmp_path: Path) -> None:
    """A resume with a new optim.lr or train.seed is refused naming the key; optim.lr listed in
    checkpoint.allow_changes resumes with the new value (and a longer train.steps), and the run
    dir records both configs and what the resume changed."""
    run = tmp_path / "run"
    first = _cmd(digits, run, "train.steps=2", "checkpoint.save_every=2")
    subprocess.run(first, check=True, capture_output=True, timeout=600)

    def again(*extra: str) -> subprocess.CompletedProcess[str]:
        args = _cmd(digits, run, "checkpoint.save_every=2", *extra)
        return subprocess.run(args, capture_output=True, text=True, timeout=600)

    lr = again("train.steps=3", "optim.lr=1e-3")
    assert lr.returncode == 3, lr.stderr[-3000:]
    assert "optim.lr: 0.002 -> 0.001" in lr.stderr and "checkpoint.allow_changes=[optim.lr]" in (
        lr.stderr
    )
    seed = again("train.steps=3", "train.seed=7")
    assert seed.returncode == 3 and "train.seed: 1234 -> 7" in seed.stderr, seed.stderr[-3000:]
    assert "train.init_from" in seed.stderr
    ok = again("train.steps=3", "optim.lr=1e-3", "checkpoint.allow_changes=[optim.lr]")
    assert ok.returncode == 0, ok.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["lr"] <= 1e-3 < rows[1]["lr"]  # the new peak LR is in effect
    (resume,) = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert resume["step"] == 2 and resume["changed"]["optim.lr"] == [0.002, 0.001]
    assert set(resume["accepted"]) >= {"optim.lr", "train.steps"}
    assert "lr: 0.001" in (run / "config.yaml").read_text()
    assert "lr: 0.002" in (run / "config.1.yaml").read_text()  # the refused starts left none
    assert not (run / "config.2.yaml").exists()


def test_preemption_signal_saves_and_marks(digits: Path, tmp_path: Path) -> None:
    run = tmp_path / "pre"
    proc = subprocess.Popen(
        _cmd(digits, run, "train.steps=200", "checkpoint.save_every=0"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 0
    marker = json.loads((run / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGUSR1"
    assert (run / "checkpoints" / "sft" / f"iter_{marker['step']:08d}" / "meta.json").exists()


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_two_rank_layouts_train(digits: Path, tmp_path: Path, layout: str) -> None:
    run = tmp_path / layout.replace("=", "")
    subprocess.run(
        _cmd(digits, run, layout, "train.steps=3", "checkpoint.save_every=3", nproc=2),
        check=True,
        capture_output=True,
        timeout=900,
    )
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3] and all(v == v for v in losses.values())
    assert (run / "checkpoints" / "sft" / "iter_00000003" / "meta.json").exists()


def _wandb_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No W&B state from the machine, every W&B folder under tmp_path, no reachable server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home = tmp_path / "wandb_home"
    env.update(
        WANDB_DIR=str(home),
        WANDB_CACHE_DIR=str(home / "cache"),
        WANDB_CONFIG_DIR=str(home / "config"),
        WANDB_DATA_DIR=str(home / "data"),
        WANDB_ARTIFACT_DIR=str(home / "artifacts"),
        WANDB_BASE_URL="http://127.0.0.1:9",  # nothing listens there: any upload attempt fails
        WANDB_SILENT="true",
        **extra,
    )
    return env


@pytest.mark.parametrize("mode", ["offline", "online_without_network"])
def test_wandb_offline_run_records_the_metrics(digits: Path, tmp_path: Path, mode: str) -> None:
    """`logging.wandb.enabled=true`: the run file under <run_dir>/wandb holds every step's
    metrics (read back from its records). An online run that cannot reach a server falls back
    to offline instead of failing the job."""
    from tests.train.wandb_records import history, read_records

    if mode == "offline":
        env = _wandb_env(tmp_path, WANDB_MODE="offline")
    else:
        env = _wandb_env(tmp_path, WANDB_API_KEY="x" * 40, WANDB_INIT_TIMEOUT="3")
    run = tmp_path / "run"
    proc = subprocess.run(
        _cmd(
            digits,
            run,
            "train.steps=3",
            "logging.wandb.enabled=true",
            f"logging.wandb.mode={'offline' if mode == 'offline' else 'online'}",
            "logging.wandb.project=autothink-test",
        ),
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if mode != "offline":
        assert "the online run could not start" in proc.stderr, proc.stderr[-3000:]
    run_id = (run / "wandb_run_id").read_text().strip()
    (run_dir,) = (run / "wandb").glob(f"offline-run-*-{run_id}")
    records = list(read_records(run_dir / f"run-{run_id}.wandb"))
    rows = history(run_dir / f"run-{run_id}.wandb")
    losses = _losses(run)
    assert sorted(rows) == sorted(losses) == [1, 2, 3]
    for step, loss in losses.items():
        assert rows[step]["sft/loss"] == pytest.approx(loss, rel=1e-6)
        assert {"sft/lr", "sft/grad_norm", "sft/loss_thinking"} <= rows[step].keys()
    (exit_rec,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_rec.exit_code == 0  # finish() ran at train end
    (run_rec,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_rec.project == "autothink-test" and run_rec.run_id == run_id
    config = {i.key: json.loads(i.value_json) for i in run_rec.config.update}
    assert config["model"]["num_layers"] > 0


def test_missing_data_path_is_reported_before_any_set_up(tmp_path: Path) -> None:
    import torch.distributed as dist

    from megatron_autothink.config import load_config
    from megatron_autothink.pipeline import main

    missing = tmp_path / "no-such-data"
    cfg = load_config("tiny_cpu", [f"data.train_path={missing}", f"logging.run_dir={tmp_path}/r"])
    # Another in-process test of the suite may have set up a process group already: what counts
    # is that this run set up nothing before refusing.
    was_initialized = dist.is_initialized()
    with pytest.raises(SystemExit, match=f"data.train_path={missing} does not exist"):
        main(cfg)
    assert dist.is_initialized() == was_initialized and not (tmp_path / "r").exists()


def test_branch_stage_starts_from_the_stage_it_names(digits: Path, tmp_path: Path) -> None:
    """``start_from``: stage ``c`` starts from ``a``'s final weights, not from ``b`` (the stage
    before it), whose lr ruins the model: c's first loss is a's last, far below b's."""
    run = tmp_path / "run"
    stages = (
        "stages=[{name: a, kind: sft, steps: 20}, {name: b, kind: sft, steps: 6, lr: 0.5},"
        " {name: c, kind: sft, steps: 2, lr: 1.0e-9, start_from: a}]"
    )
    subprocess.run(
        _cmd(digits, run, stages, "checkpoint.save_every=0"),
        check=True,
        capture_output=True,
        timeout=900,
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = {st: [r["loss"] for r in rows if r["stage"] == st] for st in "abc"}
    a_end, b_end, c_first = sum(loss["a"][-3:]) / 3, sum(loss["b"][-2:]) / 2, loss["c"][0]
    assert b_end > a_end + 1.0, loss  # b really moved away from a
    assert abs(c_first - a_end) < 0.5 < abs(c_first - b_end), loss
