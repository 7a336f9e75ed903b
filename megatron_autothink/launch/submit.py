"""Prepare a run directory for a SLURM job and submit it: the only part that writes files.

Per submission, ``<run_dir>/slurm/`` receives ``<stamp>.config.yaml`` (the resolved config the
ranks read, frozen so a requeued job trains exactly what was submitted), ``<stamp>.sbatch`` (the
script SLURM ran) and a line in ``submissions.tsv``; SLURM writes the batch log there too.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_autothink.config import AutothinkConfig, dump_config, load_config
from megatron_autothink.launch.checks import LaunchError, check_sbatch
from megatron_autothink.launch.options import SlurmOptions
from megatron_autothink.launch.render import job_name, render_sbatch


@dataclass(frozen=True)
class JobFiles:
    """Where one submission's files go."""

    run_dir: Path
    stamp: str

    @property
    def slurm_dir(self) -> Path:
        return self.run_dir / "slurm"

    @property
    def config(self) -> Path:
        return self.slurm_dir / f"{self.stamp}.config.yaml"

    @property
    def script(self) -> Path:
        return self.slurm_dir / f"{self.stamp}.sbatch"


def new_job_files(run_dir: Path) -> JobFiles:
    return JobFiles(run_dir=run_dir, stamp=time.strftime("%Y%m%d-%H%M%S"))


def render_for(cfg: AutothinkConfig, opts: SlurmOptions, files: JobFiles) -> str:
    """The script for a submission whose frozen config lives at ``files.config``."""
    return render_sbatch(cfg, opts, config_path=str(files.config))


def write_job(cfg: AutothinkConfig, files: JobFiles, script: str) -> None:
    """Write the frozen config and the script; check the config loads back identically."""
    files.slurm_dir.mkdir(parents=True, exist_ok=True)
    files.config.write_text(dump_config(cfg))
    if load_config(files.config) != cfg:
        raise LaunchError(f"{files.config}: the frozen config does not load back identically")
    files.script.write_text(script)
    files.script.chmod(0o755)


def submit(files: JobFiles, workdir: Path) -> str:
    """``sbatch --parsable`` the script; returns the job id."""
    sbatch = check_sbatch()
    proc = subprocess.run(
        [sbatch, "--parsable", str(files.script)],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise LaunchError(
            f"sbatch rejected {files.script} (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()}"
        )
    job_id = proc.stdout.strip().split(";")[0]
    with (files.slurm_dir / "submissions.tsv").open("a") as f:
        f.write(f"{files.stamp}\t{job_id}\t{files.script}\n")
    return job_id


def summary(cfg: AutothinkConfig, opts: SlurmOptions, files: JobFiles, job_id: str) -> str:
    name = job_name(cfg, opts)
    logs = files.run_dir / "logs"
    lines = [
        f"submitted job {job_id}: {cfg.recipe} on {opts.nodes} node(s) x "
        + (
            f"{opts.gpus_per_node} GPUs"
            if opts.gpus_per_node
            else f"{opts.ranks_per_node} CPU ranks"
        ),
        f"  script:     {files.script}",
        f"  config:     {files.config}",
        f"  batch log:  {files.slurm_dir}/{name}-{job_id}.out",
        f"  rank logs:  {logs}/{name}-{job_id}-r<restart>-node<n>.log",
        f"  watch:      squeue -j {job_id}; tail -f {files.slurm_dir}/{name}-{job_id}.out",
    ]
    if opts.requeue:
        lines.append(f"  checkpoint + requeue now: scancel --batch --signal=USR1 {job_id}")
    return "\n".join(lines)
