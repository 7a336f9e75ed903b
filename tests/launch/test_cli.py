"""``autothink launch slurm``: standalone, mounted under the top-level CLI, dry run and submission."""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_autothink.launch import cli
from tests.launch.cases import REPO


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_module_help_works_standalone() -> None:
    for argv in (["--help"], ["slurm", "--help"]):
        r = subprocess.run(
            [sys.executable, "-m", "megatron_autothink.launch.cli", *argv],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert r.returncode == 0, r.stderr
    assert "--container-image" in r.stdout and "--signal-lead" in r.stdout


def test_add_arguments_mounts_under_a_parent_parser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What megatron_autothink/cli.py does: a `launch` subparser + add_arguments + main(args)."""
    parser = argparse.ArgumentParser(prog="autothink")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_arguments(sub.add_parser("launch"))
    args = parser.parse_args(
        [
            "launch",
            "slurm",
            "--nodes",
            "1",
            "--gpus-per-node",
            "0",
            "--dry-run",
            f"logging.run_dir={tmp_path}/run",
        ]
    )
    assert cli.main(args) == 0
    assert "#SBATCH --nodes=1" in capsys.readouterr().out


def test_top_level_cli_mounts_launch() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "megatron_autothink.cli", "launch", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if "slurm" not in r.stdout:
        pytest.skip(
            "megatron_autothink/cli.py does not mount launch.cli.add_arguments yet "
            "(the CLI engineer's change); `python -m megatron_autothink.launch.cli` works meanwhile"
        )
    assert r.returncode == 0


def test_dry_run_prints_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    rc, out, err = _run(
        [
            "slurm",
            "--nodes",
            "2",
            "--gpus-per-node",
            "0",
            "--procs-per-node",
            "2",
            "--time",
            "01:00:00",
            "--account",
            "acc",
            "--dry-run",
            f"logging.run_dir={run_dir}",
        ],
        capsys,
    )
    assert rc == 0, err
    assert out.startswith("#!/bin/bash\n") and "#SBATCH --account=acc" in out
    assert f"--config {run_dir}/slurm/" in out.replace(" \\\n  ", " ")
    assert "dry run: nothing written" in err
    assert not run_dir.exists()


def test_profile_then_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "site.yaml"
    profile.write_text(
        "account: from-profile\npartition: p1\ntime: '02:00:00'\n"
        "env: {NCCL_IB_HCA: mlx5}\ncontainer: {runtime: pyxis, image: 'nvcr.io#x/y:1', "
        "mounts: ['/a:/a']}\nsbatch_args: ['--constraint=h100']\n"
    )
    rc, out, err = _run(
        [
            "slurm",
            "--config",
            "tiny_cpu",
            "--nodes",
            "1",
            "--gpus-per-node",
            "0",
            "--profile",
            str(profile),
            "--partition",
            "from-flag",
            "--env",
            "NCCL_DEBUG=INFO",
            "--mount",
            "/b:/b",
            "--sbatch-arg=--mail-type=FAIL",
            "--dry-run",
            f"logging.run_dir={tmp_path}/run",
        ],
        capsys,
    )
    assert rc == 0, err
    assert "#SBATCH --account=from-profile" in out and "#SBATCH --partition=from-flag" in out
    assert "#SBATCH --constraint=h100" in out and "#SBATCH --mail-type=FAIL" in out
    assert "export NCCL_IB_HCA=mlx5" in out and "export NCCL_DEBUG=INFO" in out
    assert "MOUNTS+=,/a:/a" in out and "MOUNTS+=,/b:/b" in out
    assert "--container-image='nvcr.io#x/y:1'" in out
    assert " python --nnodes=1" in out.replace(" \\\n  ", " ")  # 'python' inside a container


def test_profile_from_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = tmp_path / "site.yaml"
    profile.write_text("qos: from-env\n")
    monkeypatch.setenv(cli.PROFILE_ENV, str(profile))
    rc, out, _ = _run(
        [
            "slurm",
            "--nodes",
            "1",
            "--gpus-per-node",
            "0",
            "--dry-run",
            f"logging.run_dir={tmp_path}/r",
        ],
        capsys,
    )
    assert rc == 0 and "#SBATCH --qos=from-env" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpus-per-node", "3", "parallel.tp=2"], "parallel.tp=2 does not divide the 3 GPUs"),
        (["--container", "apptainer"], "--container apptainer needs an image"),
        (["--gpus-per-node", "8"], "world size 8 does not fit the recipe: data.global_batch_size"),
        (["--gpus-per-node", "0", "--time", "4h"], "time: '4h' is not a SLURM time"),
        (["--gpus-per-node", "0", "--env", "NOEQUALS"], "--env 'NOEQUALS' must look like"),
        (["--gpus-per-node", "0", "optim.lr=-1"], "optim.lr"),
        (["--gpus-per-node", "0", "--config", "nope"], "recipe 'nope' not found"),
        (["--gpus-per-node", "0", "--profile", "/nonexistent.yaml"], "cluster profile"),
    ],
)
def test_bad_launches_fail_clearly(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = [a for a in argv if "=" not in a or a.startswith("-")]
    overrides = [a for a in argv if a not in options]
    rc, out, err = _run(
        [
            "slurm",
            "--nodes",
            "1",
            "--dry-run",
            *options,
            f"logging.run_dir={tmp_path}/r",
            *overrides,
        ],
        capsys,
    )
    assert rc == 2 and out == ""
    assert err.startswith("autothink launch: error: ") and message in err, err


def test_unwritable_run_dir_fails_before_submission(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "f").write_text("")
    rc, _, err = _run(
        ["slurm", "--nodes", "1", "--gpus-per-node", "0", f"logging.run_dir={tmp_path}/f/run"],
        capsys,
    )
    assert rc == 2 and "run directory (logging.run_dir)" in err and "not a directory" in err


def test_no_sbatch_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    rc, _, err = _run(
        ["slurm", "--nodes", "1", "--gpus-per-node", "0", f"logging.run_dir={tmp_path}/r"], capsys
    )
    assert rc == 2 and "sbatch not found on PATH" in err and "--dry-run" in err


def _fake_sbatch(bin_dir: Path, log: Path, rc: int = 0) -> None:
    bin_dir.mkdir(exist_ok=True)
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(
        f'#!/bin/bash\necho "$PWD $*" >> {log}\n'
        + ('echo "sbatch: error: invalid account" >&2\nexit 1\n' if rc else "echo 4242\n")
    )
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)


def test_submission_keeps_script_and_frozen_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "sbatch.log"
    _fake_sbatch(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(
        [
            "slurm",
            "--config",
            "tiny_cpu",
            "--nodes",
            "1",
            "--gpus-per-node",
            "0",
            "train.steps=7",
            "logging.run_dir=runs/t",
        ],
        capsys,
    )
    assert rc == 0, err
    assert "submitted job 4242" in out and "scancel --batch --signal=USR1 4242" in out
    slurm_dir = tmp_path / "runs" / "t" / "slurm"
    (script,) = slurm_dir.glob("*.sbatch")
    (config,) = slurm_dir.glob("*.config.yaml")
    text = script.read_text()
    assert f"--config {config}" in text.replace(" \\\n  ", " ")
    assert f"#SBATCH --chdir={tmp_path}" in text
    frozen = config.read_text()
    assert "steps: 7" in frozen and f"run_dir: {tmp_path}/runs/t" in frozen
    cwd, args = log.read_text().split(" ", 1)
    assert cwd == str(tmp_path) and args.strip() == f"--parsable {script}"
    assert (slurm_dir / "submissions.tsv").read_text().split("\t")[1] == "4242"


def test_sbatch_rejection_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_sbatch(tmp_path / "bin", tmp_path / "log", rc=1)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    rc, _, err = _run(
        ["slurm", "--nodes", "1", "--gpus-per-node", "0", f"logging.run_dir={tmp_path}/r"], capsys
    )
    assert rc == 2 and "sbatch rejected" in err and "invalid account" in err
