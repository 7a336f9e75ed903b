"""Launch options for a SLURM job: what the cluster needs, kept apart from the run's recipe.

A recipe (``recipes/*.yaml`` -> :class:`~megatron_autothink.config.AutothinkConfig`) says *what* to
train; :class:`SlurmOptions` says *where and how* to run it (nodes, account, container, NCCL
environment). The same options come from a cluster profile YAML (``--profile``, keys as the field
names below) with command-line flags taking precedence, so a site's settings are written once.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_ENTRY = ["-m", "megatron_autothink.cli", "train"]
"""Python arguments that start one rank; ``--config`` and overrides are appended."""

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_TIME = re.compile(
    r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"  # D-H[:M[:S]]
    r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$"  # M | M:S | H:M:S
)


class _Opt(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_slurm_time(value: str) -> int:
    """Seconds in a SLURM ``--time`` value.

    SLURM accepts ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M`` and ``D-H:M:S``:

    >>> parse_slurm_time("30"), parse_slurm_time("04:00:00"), parse_slurm_time("1-12")
    (1800, 14400, 129600)
    """
    m = _TIME.match(value.strip())
    if not m:
        raise ValueError(
            f"'{value}' is not a SLURM time (use MINUTES, HH:MM:SS, D-HH or D-HH:MM:SS)"
        )
    g = m.groupdict()
    if g["d"] is not None:
        days, hours = int(g["d"]), int(g["dh"])
        return days * 86400 + hours * 3600 + int(g["dm"] or 0) * 60 + int(g["ds"] or 0)
    a, b, c = g["a"], g["b"], g["c"]
    if c is not None:  # H:M:S
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60  # M


class ContainerOptions(_Opt):
    """Where the ranks run: on the host, in a pyxis/enroot container, or under Apptainer."""

    runtime: Literal["none", "pyxis", "apptainer"] = "none"
    """``pyxis``: ``srun --container-image`` (NVIDIA pyxis + enroot). ``apptainer``:
    ``apptainer exec --nv IMAGE``. ``none``: the host's Python."""
    image: str = ""
    """pyxis: ``nvcr.io#nvidia/pytorch:26.07-py3``-style reference or a ``.sqsh`` file;
    apptainer: a ``.sif`` file or ``docker://`` URI."""
    mounts: list[str] = Field(default_factory=list)
    """Extra bind mounts ``SRC:DST[:FLAGS]``. The working directory and the run directory are
    always mounted at their own paths."""

    @field_validator("mounts")
    @classmethod
    def _check_mounts(cls, mounts: list[str]) -> list[str]:
        for m in mounts:
            parts = m.split(":")
            if len(parts) not in (2, 3) or not all(parts[:2]) or "," in m:
                raise ValueError(f"mount '{m}' must look like SRC:DST or SRC:DST:FLAGS (no commas)")
        return mounts


class SlurmOptions(_Opt):
    """Everything about a SLURM launch that is not part of the training recipe."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=0)
    """GPUs per node; one rank per GPU. 0 runs CPU ranks (tests, the tiny recipe)."""
    procs_per_node: int | None = Field(None, ge=1)
    """Ranks per node for CPU jobs (``gpus_per_node=0``); with GPUs it must equal
    ``gpus_per_node`` or stay unset."""
    launcher: Literal["torchrun", "srun"] = "torchrun"
    """``torchrun``: one srun task per node running torchrun, which starts the node's ranks.
    ``srun``: one srun task per rank; RANK/LOCAL_RANK/WORLD_SIZE come from SLURM."""
    job_name: str = ""
    """Empty: ``autothink-<recipe>``."""
    time: str = ""
    """SLURM time limit (``HH:MM:SS``, ``D-HH:MM:SS``, minutes); empty: the partition default."""
    account: str = ""
    partition: str = ""
    qos: str = ""
    exclusive: bool = True
    """Whole nodes; ranks then share the node's CPUs evenly."""
    mem: str = ""
    """``--mem`` per node (e.g. ``0`` for all of it); empty: not requested."""
    cpus_per_rank: int | None = Field(None, ge=1)
    """CPU cores per rank; unset: the node's CPUs divided evenly (needs ``exclusive``)."""
    container: ContainerOptions = Field(default_factory=ContainerOptions)
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment for every rank: NCCL / InfiniBand / UCX settings of the site
    (docs/launch.md lists the usual ones). Values are exported literally."""
    setup: list[str] = Field(default_factory=list)
    """Shell lines run in the batch script before the ranks start (``module load ...``)."""
    sbatch_args: list[str] = Field(default_factory=list)
    """Extra ``#SBATCH`` options, e.g. ``--constraint=h100``."""
    srun_args: list[str] = Field(default_factory=list)
    """Extra options for the srun that starts the ranks, e.g. ``--cpu-bind=none``."""
    requeue: bool = True
    """Ask for USR1 before the time limit, checkpoint, requeue and resume (docs/launch.md)."""
    signal_lead_s: int = Field(300, ge=20, le=3600)
    """Seconds before the time limit at which SLURM sends USR1. Must cover one training step
    plus one checkpoint save; SLURM may send it up to 60 s earlier."""
    master_addr: str = ""
    """Rendezvous host; empty: the first host of the allocation (``scontrol show hostnames``)."""
    master_port: int | None = Field(None, ge=1024, le=65535)
    """Rendezvous port; unset: ``20000 + SLURM_JOB_ID % 20000`` (distinct per job)."""
    python: str = "python3"
    """Interpreter on the nodes (in the container when one is used)."""
    entry: list[str] = Field(default_factory=lambda: list(DEFAULT_ENTRY))
    """Python arguments that start one rank; ``--config FILE`` and overrides are appended."""
    workdir: str = ""
    """Directory the job runs in (code and relative paths); empty: the submission directory."""

    @field_validator("job_name")
    @classmethod
    def _check_job_name(cls, v: str) -> str:
        if v and not _JOB_NAME.match(v):
            raise ValueError(f"'{v}' may contain only letters, digits and _.+-")
        return v

    @field_validator("time")
    @classmethod
    def _check_time(cls, v: str) -> str:
        if v:
            parse_slurm_time(v)
        return v

    @field_validator("env")
    @classmethod
    def _check_env(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not _ENV_KEY.match(key):
                raise ValueError(f"'{key}' is not a valid environment variable name")
        return env

    @field_validator("sbatch_args", "srun_args")
    @classmethod
    def _check_args(cls, args: list[str]) -> list[str]:
        for a in args:
            if not a.startswith("--") or "\n" in a:
                raise ValueError(f"'{a}' must be one long option such as --constraint=h100")
        return args

    @field_validator("setup")
    @classmethod
    def _check_setup(cls, lines: list[str]) -> list[str]:
        for line in lines:
            if "\n" in line:
                raise ValueError("each setup entry must be one shell line")
        return lines

    @field_validator("entry")
    @classmethod
    def _check_entry(cls, entry: list[str]) -> list[str]:
        if not entry:
            raise ValueError("entry must name a module (-m pkg.mod ...) or a script")
        return entry

    @model_validator(mode="after")
    def _check_ranks(self) -> SlurmOptions:
        if self.gpus_per_node and self.procs_per_node not in (None, self.gpus_per_node):
            raise ValueError(
                f"procs_per_node={self.procs_per_node} with gpus_per_node={self.gpus_per_node}: "
                "GPU jobs run one rank per GPU; leave procs_per_node unset"
            )
        if not self.exclusive and self.cpus_per_rank is None:
            raise ValueError(
                "exclusive=false needs cpus_per_rank (else SLURM gives each task one CPU)"
            )
        if self.time and self.requeue and parse_slurm_time(self.time) <= self.signal_lead_s:
            raise ValueError(
                f"signal_lead_s={self.signal_lead_s} must be shorter than time={self.time}"
            )
        return self

    # -- derived -------------------------------------------------------------------------------

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.procs_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def grace_s(self) -> int:
        """How long the batch script waits for the checkpoint after USR1 before requeueing anyway.

        30 s of the lead stay in reserve for the requeue itself.
        """
        return max(10, self.signal_lead_s - 30)
