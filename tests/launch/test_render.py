"""The renderer is a pure function: golden files, shellcheck, and what the script must contain."""

from __future__ import annotations

import difflib
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_autothink.config import ConfigError, load_config
from megatron_autothink.launch.options import SlurmOptions
from megatron_autothink.launch.render import render_sbatch
from tests.launch.cases import CASES, REPO

UPDATE = os.environ.get("AUTOTHINK_UPDATE_GOLDEN") == "1"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    case = CASES[name]
    text = case.render()
    if UPDATE:
        case.path.parent.mkdir(parents=True, exist_ok=True)
        case.path.write_text(text)
        case.path.chmod(0o755)
    assert case.path.exists(), f"{case.path} missing: run with AUTOTHINK_UPDATE_GOLDEN=1"
    expected = case.path.read_text()
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(True), text.splitlines(True), str(case.path), "rendered"
            )
        )
        pytest.fail(
            f"rendered script differs from {case.path.relative_to(REPO)} "
            f"(AUTOTHINK_UPDATE_GOLDEN=1 regenerates it after review):\n{diff}"
        )


def test_render_is_deterministic() -> None:
    case = CASES["anneal_2n_apptainer"]
    assert case.render() == case.render()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bash_syntax(name: str) -> None:
    r = subprocess.run(["bash", "-n", str(CASES[name].path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck not installed (bash tools/install_ci_extras.sh installs it)",
)
@pytest.mark.parametrize("name", sorted(CASES))
def test_shellcheck(name: str) -> None:
    r = subprocess.run(
        ["shellcheck", "--norc", "--shell=bash", "--severity=style", str(CASES[name].path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _flat(script: str) -> str:
    """The script with backslash-continued lines joined (assertions don't depend on wrapping)."""
    return script.replace(" \\\n  ", " ")


def _render(**opts: object) -> str:
    cfg = load_config("tiny_cpu", ["logging.run_dir=/r", "data.global_batch_size=64"])
    options = SlurmOptions.model_validate({"gpus_per_node": 0, **opts})
    return _flat(render_sbatch(cfg, options, config_path="/r/c.yaml"))


def test_torchrun_rendezvous_and_logs() -> None:
    s = _render(nodes=2, procs_per_node=2)
    assert "#SBATCH --nodes=2" in s and "#SBATCH --ntasks-per-node=1" in s
    assert 'MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"' in s
    assert "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in s
    assert '--node-rank="${SLURM_NODEID}"' in s
    assert "--nnodes=2 --nproc-per-node=2" in s
    assert '--output="${LOG_DIR}/%x-%j-r${RESTART}-node%n.log"' in s
    assert "#SBATCH --output=/r/slurm/%x-%j.out" in s


def test_srun_launcher_maps_slurm_ids_to_torch_env() -> None:
    s = _render(nodes=2, procs_per_node=4, launcher="srun")
    assert "#SBATCH --ntasks-per-node=4" in s
    assert 'RANK="${SLURM_PROCID}" LOCAL_RANK="${SLURM_LOCALID}" WORLD_SIZE=8' in s
    assert "torch.distributed.run" not in s


def test_preemption_lines() -> None:
    s = _render(time="01:00:00", signal_lead_s=120)
    assert "#SBATCH --requeue" in s and "#SBATCH --signal=B:USR1@120" in s
    assert "#SBATCH --time=01:00:00" in s and "#SBATCH --open-mode=append" in s
    assert "trap on_usr1 USR1" in s and 'scontrol requeue "${SLURM_JOB_ID}"' in s
    assert "GRACE=90" in s
    s = _render(requeue=False)
    assert "#SBATCH --no-requeue" in s and "scontrol requeue" not in s and "--signal" not in s


def test_gpu_environment_and_site_env() -> None:
    cfg = load_config("tiny_cpu", ["logging.run_dir=/r", "data.global_batch_size=64"])
    s = render_sbatch(
        cfg,
        SlurmOptions(nodes=1, env={"NCCL_IB_HCA": "mlx5_0:1", "X": "a b"}),
        config_path="c.yaml",
    )
    assert "#SBATCH --gpus-per-node=8" in s
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in s
    assert "export NCCL_IB_HCA=mlx5_0:1" in s and "export X='a b'" in s
    # no InfiniBand setting is hard-coded
    assert "NCCL_IB" not in render_sbatch(cfg, SlurmOptions(nodes=1), config_path="c.yaml")


def test_overrides_and_paths_are_quoted() -> None:
    cfg = load_config("tiny_cpu", ["logging.run_dir=runs/it's"])
    s = _flat(
        render_sbatch(
            cfg,
            SlurmOptions(gpus_per_node=0),
            config_path="recipes/tiny_cpu.yaml",
            overrides=["optim.lr=1e-4", "data.train_path=/x y"],
        )
    )
    assert """RUN_DIR="${WORKDIR}"/'runs/it'"'"'s'""" in s
    assert "optim.lr=1e-4 'data.train_path=/x y'" in s
    assert 'WORKDIR="${SLURM_SUBMIT_DIR}"' in s


def test_layout_that_does_not_fit_raises() -> None:
    cfg = load_config("tiny_cpu", ["parallel.tp=2"])
    with pytest.raises(ConfigError, match="world size 3"):
        render_sbatch(cfg, SlurmOptions(gpus_per_node=0, procs_per_node=3), config_path="c")


def _run_environment(script: str, tmp_path: Path, workdir: Path, **env: str) -> dict[str, str]:
    """Run the script's environment block under bash as a node would; return what it exports."""
    block = script.split("# ---- environment of every rank\n", 1)[1].split("\n\n# ---- ", 1)[0]
    keys = ["PYTHONPATH", "HF_HOME", "TRITON_CACHE_DIR", "TORCH_NCCL_ASYNC_ERROR_HANDLING"]
    show = "; ".join(f'echo "{k}=${{{k}:-}}"' for k in keys)
    base = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": "77", "SLURM_CPUS_ON_NODE": "2"}
    r = subprocess.run(
        [
            "bash",
            "-c",
            f"set -u\nWORKDIR={shlex.quote(str(workdir))} RUN_DIR=/r MARKER=/r/M RESTART=0\n{block}\n{show}",
        ],
        capture_output=True,
        text=True,
        env={**base, "TMPDIR": str(tmp_path), **env},
    )
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.splitlines())


def test_environment_defaults_a_user_can_override(tmp_path: Path) -> None:
    cfg = load_config("tiny_cpu", ["logging.run_dir=/r", "data.global_batch_size=64"])
    gpu = render_sbatch(cfg, SlurmOptions(nodes=1), config_path="c.yaml")
    env = _run_environment(gpu, tmp_path, REPO)
    assert env["HF_HOME"] == f"{tmp_path}/autothink-77/huggingface"  # per job, node-local
    assert env["TRITON_CACHE_DIR"] == f"{tmp_path}/autothink-77/triton"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    # set where sbatch runs (sbatch passes the environment on): the user's values stay
    mine = {
        "HF_HOME": "/my/hf",
        "TRITON_CACHE_DIR": "/my/t",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    }
    assert {
        k: v for k, v in _run_environment(gpu, tmp_path, REPO, **mine).items() if k in mine
    } == mine
    # or set in the profile's env:
    site = render_sbatch(cfg, SlurmOptions(nodes=1, env={"HF_HOME": "/site/hf"}), config_path="c")
    assert _run_environment(site, tmp_path, REPO)["HF_HOME"] == "/site/hf"
    # CPU jobs have no NCCL
    cpu = render_sbatch(cfg, SlurmOptions(gpus_per_node=0), config_path="c.yaml")
    assert _run_environment(cpu, tmp_path, REPO)["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == ""


def test_workdir_goes_on_pythonpath_only_when_it_is_a_checkout(tmp_path: Path) -> None:
    cfg = load_config("tiny_cpu", ["logging.run_dir=/r"])
    s = render_sbatch(cfg, SlurmOptions(gpus_per_node=0), config_path="c.yaml")
    assert _run_environment(s, tmp_path, REPO, PYTHONPATH="/x")["PYTHONPATH"] == f"{REPO}:/x"
    assert _run_environment(s, tmp_path, tmp_path, PYTHONPATH="/x")["PYTHONPATH"] == "/x"
    assert _run_environment(s, tmp_path, tmp_path)["PYTHONPATH"] == ""


def test_a_host_interpreter_is_pointed_out() -> None:
    s = _render(python="/home/me/venv/bin/python")
    assert "# No container: every node must have /home/me/venv/bin/python" in s
    s = _render(container={"runtime": "apptainer", "image": "/i.sif"}, python="python")
    assert "No container" not in s
