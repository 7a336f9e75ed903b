"""Rendering cases checked against golden files, and the example scripts shipped in launch/.

Each case is (config, options, --config path as the script shows it). Regenerate every file with
``AUTOTHINK_UPDATE_GOLDEN=1 python -m pytest tests/launch/test_render.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_autothink.config import AutothinkConfig, load_config
from megatron_autothink.launch.options import SlurmOptions
from megatron_autothink.launch.render import render_sbatch

REPO = Path(__file__).resolve().parents[2]
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
EXAMPLES_DIR = REPO / "launch"
PROFILE = EXAMPLES_DIR / "cluster.example.yaml"
EXAMPLE_RECIPES = {
    "anneal_7b": "launch/recipes/anneal_7b.yaml",
    "rl_bpo_7b": "launch/recipes/rl_bpo_7b.yaml",
}
EXAMPLE_NODES = (1, 2, 8)


@dataclass(frozen=True)
class Case:
    path: Path
    build: Callable[[], tuple[AutothinkConfig, SlurmOptions, str]]

    def render(self) -> str:
        cfg, opts, config_path = self.build()
        return render_sbatch(cfg, opts, config_path=config_path)


def _profile(**extra: object) -> SlurmOptions:
    data = yaml.safe_load(PROFILE.read_text())
    data.update(extra)
    return SlurmOptions.model_validate(data)


def _example(recipe: str, nodes: int) -> Callable[[], tuple[AutothinkConfig, SlurmOptions, str]]:
    def build() -> tuple[AutothinkConfig, SlurmOptions, str]:
        path = EXAMPLE_RECIPES[recipe]
        # workdir unset: the scripts run from wherever they are submitted (the repository root).
        return load_config(REPO / path), _profile(nodes=nodes), path

    return build


def _tiny_cpu() -> tuple[AutothinkConfig, SlurmOptions, str]:
    cfg = load_config("tiny_cpu", ["logging.run_dir=/shared/runs/tiny_cpu", "train.steps=20"])
    opts = SlurmOptions(
        nodes=1,
        gpus_per_node=0,
        procs_per_node=2,
        time="00:30:00",
        partition="cpu",
        signal_lead_s=120,
        python="/opt/venv/bin/python",
        workdir="/shared/megatron-autothink",
    )
    return cfg, opts, "/shared/runs/tiny_cpu/slurm/20260101-000000.config.yaml"


def _tiny_cpu_srun_2n() -> tuple[AutothinkConfig, SlurmOptions, str]:
    cfg = load_config("tiny_cpu", ["logging.run_dir=/shared/runs/tiny_srun"])
    opts = SlurmOptions(
        nodes=2,
        gpus_per_node=0,
        procs_per_node=2,
        launcher="srun",
        exclusive=False,
        cpus_per_rank=1,
        master_port=29400,
        env={"GLOO_SOCKET_IFNAME": "lo"},
        python="python3",
        entry=["tests/launch/standin_job.py", "--step-seconds", "0.2"],
        workdir="/shared/megatron-autothink",
    )
    return cfg, opts, "/shared/runs/tiny_srun/slurm/20260101-000000.config.yaml"


def _anneal_apptainer() -> tuple[AutothinkConfig, SlurmOptions, str]:
    cfg = load_config(REPO / EXAMPLE_RECIPES["anneal_7b"], ["logging.run_dir=/lustre/runs/anneal"])
    opts = SlurmOptions(
        nodes=2,
        time="2-00:00:00",
        account="proj42",
        partition="h100",
        qos="high",
        mem="0",
        job_name="anneal-apptainer",
        container={
            "runtime": "apptainer",
            "image": "/lustre/images/megatron-autothink.sif",
            "mounts": ["/lustre/datasets:/lustre/datasets:ro", "/lustre/models:/lustre/models"],
        },
        env={
            "NCCL_IB_HCA": "mlx5_0,mlx5_1,mlx5_2,mlx5_3",
            "NCCL_SOCKET_IFNAME": "^lo,docker0",
            "NCCL_DEBUG": "WARN",
        },
        setup=["module load apptainer/1.4"],
        sbatch_args=["--constraint=h100", "--mail-type=FAIL"],
        python="python",
        workdir="/lustre/home/me/megatron-autothink",
    )
    return cfg, opts, "/lustre/runs/anneal/slurm/20260101-000000.config.yaml"


def _rl_srun_no_requeue() -> tuple[AutothinkConfig, SlurmOptions, str]:
    cfg = load_config(REPO / EXAMPLE_RECIPES["rl_bpo_7b"], ["logging.run_dir=/lustre/runs/rl"])
    opts = SlurmOptions(
        nodes=1,
        launcher="srun",
        requeue=False,
        container={"runtime": "pyxis", "image": "nvcr.io#nvidia/pytorch:26.07-py3"},
        srun_args=["--cpu-bind=none"],
        master_addr="10.0.0.1",
        python="python",
        workdir="/lustre/home/me/megatron-autothink",
    )
    return cfg, opts, "/lustre/runs/rl/slurm/20260101-000000.config.yaml"


CASES: dict[str, Case] = {
    "tiny_cpu_1n_torchrun": Case(GOLDEN_DIR / "tiny_cpu_1n_torchrun.sbatch", _tiny_cpu),
    "tiny_cpu_2n_srun": Case(GOLDEN_DIR / "tiny_cpu_2n_srun.sbatch", _tiny_cpu_srun_2n),
    "anneal_2n_apptainer": Case(GOLDEN_DIR / "anneal_2n_apptainer.sbatch", _anneal_apptainer),
    "rl_1n_srun_pyxis_no_requeue": Case(
        GOLDEN_DIR / "rl_1n_srun_pyxis_no_requeue.sbatch", _rl_srun_no_requeue
    ),
}
for _recipe in EXAMPLE_RECIPES:
    for _n in EXAMPLE_NODES:
        _name = f"{_recipe}_{_n}n"
        CASES[f"example_{_name}"] = Case(EXAMPLES_DIR / f"{_name}.sbatch", _example(_recipe, _n))
