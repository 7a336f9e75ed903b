"""Checks that run before anything is submitted, each failing with a message that says what to fix.

Layout and option checks are pure; the file-system checks look at this machine only (the login
node), which shares the run directory and images with the compute nodes on the clusters we target.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megatron_autothink.config import AutothinkConfig, ConfigError, input_paths
from megatron_autothink.launch.options import SlurmOptions


class LaunchError(ConfigError):
    """A launch that cannot work; raised before anything is written or submitted."""


def check_layout(cfg: AutothinkConfig, opts: SlurmOptions) -> None:
    """The parallel layout must fit the allocation: world = nodes x ranks per node."""
    p = cfg.parallel
    rpn = opts.ranks_per_node
    what = f"{opts.gpus_per_node} GPUs" if opts.gpus_per_node else f"{rpn} CPU ranks"
    if rpn % p.tp:
        fits = [d for d in range(1, rpn + 1) if rpn % d == 0]
        raise LaunchError(
            f"parallel.tp={p.tp} does not divide the {what} of one node: tensor-parallel groups "
            f"must stay inside a node (NVLink); use parallel.tp in {fits}"
        )
    try:
        cfg.world_layout(opts.world_size)
    except ConfigError as e:
        raise LaunchError(
            f"{opts.nodes} node(s) x {what} = world size {opts.world_size} does not fit the "
            f"recipe: {e}"
        ) from None
    if not opts.gpus_per_node:
        if p.backend == "nccl":
            raise LaunchError("parallel.backend=nccl needs GPUs; set --gpus-per-node or gloo")
        if cfg.model.fp8 != "none":
            raise LaunchError("model.fp8 needs GPUs (Transformer Engine on Hopper)")


def _looks_like_file(image: str) -> bool:
    return image.startswith(("/", "./", "../", "~")) or image.endswith((".sqsh", ".sif"))


def check_container(opts: SlurmOptions) -> None:
    c = opts.container
    if c.runtime == "none":
        if c.image:
            raise LaunchError(
                f"container image '{c.image}' given but no container runtime; "
                "pass --container pyxis or --container apptainer"
            )
        return
    if not c.image:
        raise LaunchError(
            f"--container {c.runtime} needs an image: pass --container-image IMAGE or set "
            "container.image in the cluster profile (docs/launch.md, 'Container image')"
        )
    if "://" in c.image and c.runtime == "pyxis":
        raise LaunchError(
            f"pyxis image '{c.image}': use enroot syntax (nvcr.io#nvidia/pytorch:TAG) or a "
            ".sqsh file, not a URI"
        )
    if _looks_like_file(c.image) and "://" not in c.image:
        path = Path(c.image).expanduser()
        if not path.is_file():
            raise LaunchError(f"container image file {path} does not exist (or is not a file)")


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_dir(path: Path, what: str, *, create: bool) -> None:
    """``path`` must be (or become) a writable directory.

    With ``create`` the directory is made and a probe file written; otherwise (``--dry-run``)
    nothing is created and the nearest existing ancestor is checked with ``os.access``.
    """
    if any(ch.isspace() for ch in str(path)):
        raise LaunchError(f"{what} {path} contains whitespace, which #SBATCH lines cannot quote")
    anc = _existing_ancestor(path)
    if not anc.is_dir():
        raise LaunchError(f"{what} {path} is not writable: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise LaunchError(f"{what} {path} is not writable: no write permission on {anc}")
    if not create:
        return
    probe = path / f".autothink-write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok\n")
        probe.unlink()
    except OSError as e:
        raise LaunchError(f"{what} {path} is not writable: {e.strerror or e}") from None


def check_resume(cfg: AutothinkConfig, opts: SlurmOptions) -> list[str]:
    """Requeueing only makes sense when the rerun resumes. Returns warnings."""
    ck = cfg.checkpoint
    if not opts.requeue:
        return []
    if not ck.resume:
        raise LaunchError(
            "checkpoint.resume=false: a requeued job would start again from step 0; "
            "set checkpoint.resume=true or pass --no-requeue"
        )
    warnings = []
    if not ck.save_on_signal:
        every = f"every {ck.save_every} steps" if ck.save_every else "never (save_every=0)"
        warnings.append(
            "checkpoint.save_on_signal=false: the trainer will not save on USR1; a requeued job "
            f"resumes from the last periodic checkpoint ({every})"
        )
    return warnings


def check_time(opts: SlurmOptions) -> list[str]:
    """Without ``--time`` the pre-emption signal may never come. Returns warnings."""
    if not opts.requeue or opts.time:
        return []
    return [
        f"no --time: SLURM sends USR1 {opts.signal_lead_s} s before the job's time limit, and "
        "without --time that is the partition's default (often UNLIMITED or days), so the "
        "checkpoint-and-requeue may never happen and the job is killed at the limit; pass "
        "--time (e.g. --time 24:00:00) or set time: in the cluster profile"
    ]


def check_interpreter(opts: SlurmOptions) -> list[str]:
    """Without a container the script names a host interpreter path. Returns warnings."""
    if opts.container.runtime != "none":
        return []
    return [
        f"no container: every node runs {opts.python} (written into the script), which must "
        "exist there with this project's packages; pass --container pyxis|apptainer with "
        "--container-image to run an image, or --python for the nodes' interpreter"
    ]


def _mounts(opts: SlurmOptions, workdir: Path, run_dir: Path) -> list[tuple[Path, Path]]:
    """(host source, container destination) of every bind mount the script makes."""
    out = [(workdir, workdir), (run_dir, run_dir)]
    for m in opts.container.mounts:
        src, dst = m.split(":")[:2]
        out.append((Path(src).expanduser(), Path(dst)))
    return out


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_paths(cfg: AutothinkConfig, opts: SlurmOptions, workdir: Path, run_dir: Path) -> None:
    """The data and model paths of the recipe must exist, and, in a container, lie under a mount.

    Checked on this machine, which must see the cluster's shared file system (as it does for the
    run directory): a path only the compute nodes have cannot be checked here. Raises
    :class:`LaunchError` for the first problem.
    """
    inputs, outputs = input_paths(cfg), [("checkpoint.dir", cfg.checkpoint.dir)]
    outputs = [(k, v) for k, v in outputs if v and "://" not in v]
    container = opts.container.runtime != "none"
    mounts = _mounts(opts, workdir, run_dir)
    for key, value in [*inputs, *outputs]:
        path = Path(os.path.normpath(resolve(value, workdir)))
        host = path
        if container:
            found = [(src, dst) for src, dst in mounts if _inside(path, dst)]
            if not found:
                raise LaunchError(
                    f"{key}={value} is not inside the container: only WORKDIR ({workdir}), the "
                    f"run directory ({run_dir}) and the container mounts "
                    f"{list(opts.container.mounts)} are; add --mount {path}:{path} (or list it "
                    "under container.mounts in the cluster profile)"
                )
            # The longest destination wins, as the innermost bind mount does.
            src, dst = max(found, key=lambda m: len(m[1].parts))
            host = src / path.relative_to(dst)
        if key in dict(inputs) and not host.exists():
            where = f" (host path {host}, through the mount)" if host != path else ""
            raise LaunchError(
                f"{key}={value} does not exist{where}: the ranks would fail at start-up; point "
                f"{key} at an existing path (override it on the command line: {key}=PATH)"
            )


def check_sbatch() -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError(
            "sbatch not found on PATH: run on a SLURM login node, or use --dry-run to print the script"
        )
    return sbatch


def resolve(path: str, workdir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else workdir / p


def preflight(
    cfg: AutothinkConfig, opts: SlurmOptions, workdir: Path, *, create: bool
) -> list[str]:
    """Every check that can fail before submission; returns warnings for the user."""
    check_container(opts)
    check_layout(cfg, opts)
    warnings = check_resume(cfg, opts) + check_time(opts) + check_interpreter(opts)
    run_dir = resolve(cfg.logging.run_dir, workdir)
    try:
        check_paths(cfg, opts, workdir, run_dir)
    except LaunchError as e:
        if create:
            raise
        # --dry-run: still show the script (e.g. a recipe's placeholder paths), but say so.
        warnings.append(f"{e} (an error when submitting)")
    check_writable_dir(run_dir, "run directory (logging.run_dir)", create=create)
    if cfg.checkpoint.dir:
        check_writable_dir(resolve(cfg.checkpoint.dir, workdir), "checkpoint.dir", create=create)
    return warnings
