"""``autothink launch slurm``: render, check and submit the sbatch script for a recipe.

Mounted by the top-level CLI (``megatron_autothink/cli.py``) as the ``launch`` subcommand via
:func:`add_arguments` and :func:`main`; also runs on its own:
``python -m megatron_autothink.launch.cli slurm --config tiny_cpu --nodes 1 --dry-run``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from megatron_autothink.config import ConfigError, load_config
from megatron_autothink.launch import checks, submit
from megatron_autothink.launch.options import SlurmOptions

PROFILE_ENV = "AUTOTHINK_SLURM_PROFILE"

EPILOG = f"""
Cluster settings can live in a profile YAML (--profile, or ${PROFILE_ENV}) whose keys are the
SlurmOptions fields (megatron_autothink/launch/options.py): account, partition, qos, time,
gpus_per_node, container: {{runtime, image, mounts}}, env: {{NCCL_IB_HCA: ...}}, setup, sbatch_args.
Flags override the profile. Options that take a value starting with '--' need '=':
--sbatch-arg=--constraint=h100.

examples:
  autothink launch slurm --config recipes/tiny_cpu.yaml --nodes 1 --gpus-per-node 0 --dry-run
  autothink launch slurm --config launch/recipes/anneal_7b.yaml --nodes 8 --profile site.yaml \\
      --time 24:00:00 train.steps=20000
Pre-emption protocol, logs and resume: docs/launch.md.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``launch`` subcommands (``slurm``) to ``parser``."""
    sub = parser.add_subparsers(dest="launch_backend", metavar="BACKEND", required=True)
    p = sub.add_parser(
        "slurm",
        help="render an sbatch script for a recipe and submit it (or print it)",
        description="Render the sbatch script for a recipe (one torchrun per node or one srun "
        "task per GPU, rendezvous, container, logs per node, pre-emption with checkpoint and "
        "requeue), check it, keep it in the run directory and submit it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_slurm_arguments(p)


def add_slurm_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument(
        "--config",
        default="tiny_cpu",
        help="recipe name (recipes/NAME.yaml) or path to a recipe YAML (default: tiny_cpu)",
    )
    g.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    g.add_argument(
        "--dry-run", action="store_true", help="print the script; write and submit nothing"
    )
    g.add_argument(
        "--profile",
        default=os.environ.get(PROFILE_ENV, ""),
        help=f"cluster profile YAML with defaults for the options below (default: ${PROFILE_ENV})",
    )
    g.add_argument("--workdir", help="directory the job runs in (default: the current directory)")
    g.add_argument(
        "--python", help="interpreter on the nodes (default: this one; 'python' in a container)"
    )
    g.add_argument(
        "--entry",
        help="python arguments that start one rank, before --config "
        "(default: '-m megatron_autothink.cli train')",
    )

    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, required=True, help="number of nodes")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node, one rank each (default: 8)")
    g.add_argument(
        "--procs-per-node", type=int, help="ranks per node for CPU jobs (--gpus-per-node 0)"
    )
    g.add_argument(
        "--launcher",
        choices=["torchrun", "srun"],
        help="torchrun per node (default) or srun task per rank",
    )
    g.add_argument("--time", help="time limit, e.g. 04:00:00 or 1-00:00:00")
    g.add_argument("--account", help="SLURM account")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--qos", help="SLURM QOS")
    g.add_argument("--job-name", help="job name (default: autothink-<recipe>)")
    g.add_argument("--mem", help="memory per node, e.g. 0 for all")
    g.add_argument(
        "--cpus-per-rank", type=int, help="CPU cores per rank (default: node CPUs / ranks)"
    )
    g.add_argument(
        "--exclusive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whole nodes (default: yes)",
    )
    g.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="--OPT=VAL",
        help="extra #SBATCH option (repeatable)",
    )
    g.add_argument(
        "--srun-arg",
        action="append",
        default=[],
        metavar="--OPT=VAL",
        help="extra srun option (repeatable)",
    )

    g = p.add_argument_group("container")
    g.add_argument(
        "--container",
        choices=["none", "pyxis", "apptainer"],
        help="container runtime (default: none)",
    )
    g.add_argument(
        "--container-image",
        help="pyxis: nvcr.io#org/image:tag or .sqsh; apptainer: .sif or docker://",
    )
    g.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="SRC:DST",
        help="extra bind mount (repeatable)",
    )

    g = p.add_argument_group("environment and rendezvous")
    g.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="export to every rank, e.g. NCCL_IB_HCA=mlx5 (repeatable)",
    )
    g.add_argument("--master-addr", help="rendezvous host (default: first host of the allocation)")
    g.add_argument(
        "--master-port", type=int, help="rendezvous port (default: 20000 + job id %% 20000)"
    )

    g = p.add_argument_group("pre-emption")
    g.add_argument(
        "--requeue",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="checkpoint on USR1 before the time limit, then requeue (default: yes)",
    )
    g.add_argument(
        "--signal-lead", type=int, help="seconds before the time limit to send USR1 (default: 300)"
    )


def _load_profile(path: str) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except OSError as e:
        raise checks.LaunchError(f"cluster profile {p}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise checks.LaunchError(f"cluster profile {p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise checks.LaunchError(f"cluster profile {p}: top level must be a mapping")
    return data


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep:
            raise checks.LaunchError(f"--env '{item}' must look like KEY=VALUE")
        out[key] = value
    return out


def _format_validation(err: ValidationError, source: str) -> str:
    lines = [f"invalid launch options ({source}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "options"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(
            f"  {loc}: {msg}" + ("" if e["type"] == "value_error" else f" (got {e.get('input')!r})")
        )
    return "\n".join(lines)


def build_options(args: argparse.Namespace) -> SlurmOptions:
    """Profile values, then flags; defaults that depend on the machine filled in last."""
    data = _load_profile(args.profile)
    container = dict(data.pop("container", None) or {})
    flags = {
        "nodes": args.nodes,
        "gpus_per_node": args.gpus_per_node,
        "procs_per_node": args.procs_per_node,
        "launcher": args.launcher,
        "time": args.time,
        "account": args.account,
        "partition": args.partition,
        "qos": args.qos,
        "job_name": args.job_name,
        "mem": args.mem,
        "cpus_per_rank": args.cpus_per_rank,
        "exclusive": args.exclusive,
        "requeue": args.requeue,
        "signal_lead_s": args.signal_lead,
        "master_addr": args.master_addr,
        "master_port": args.master_port,
        "python": args.python,
        "workdir": args.workdir,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.entry is not None:
        data["entry"] = shlex.split(args.entry)
    data["env"] = {**(data.get("env") or {}), **_parse_env(args.env)}
    data["sbatch_args"] = list(data.get("sbatch_args") or []) + args.sbatch_arg
    data["srun_args"] = list(data.get("srun_args") or []) + args.srun_arg
    if args.container is not None:
        container["runtime"] = args.container
    if args.container_image is not None:
        container["image"] = args.container_image
    container["mounts"] = list(container.get("mounts") or []) + args.mount
    data["container"] = container
    data["workdir"] = str(Path(data.get("workdir") or os.getcwd()).resolve())
    if not data.get("python"):
        data["python"] = sys.executable if container.get("runtime", "none") == "none" else "python"
    source = f"profile {args.profile} + flags" if args.profile else "flags"
    try:
        return SlurmOptions.model_validate(data)
    except ValidationError as e:
        raise checks.LaunchError(_format_validation(e, source)) from None


def run_slurm(args: argparse.Namespace) -> int:
    opts = build_options(args)
    workdir = Path(opts.workdir)
    cfg = load_config(args.config, list(args.overrides))
    run_dir = checks.resolve(cfg.logging.run_dir, workdir)
    # Every node reads the same absolute run dir, whatever its working directory.
    cfg = load_config(args.config, [*args.overrides, f"logging.run_dir={run_dir}"])
    warnings = checks.preflight(cfg, opts, workdir, create=not args.dry_run)
    for w in warnings:
        print(f"autothink launch: warning: {w}", file=sys.stderr)
    files = submit.new_job_files(run_dir)
    script = submit.render_for(cfg, opts, files)
    if args.dry_run:
        sys.stdout.write(script)
        print(
            f"autothink launch: dry run: nothing written or submitted (would write {files.script})",
            file=sys.stderr,
        )
        return 0
    checks.check_sbatch()
    submit.write_job(cfg, files, script)
    job_id = submit.submit(files, workdir)
    print(submit.summary(cfg, opts, files, job_id))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autothink launch",
        description="Render and submit SLURM jobs for megatron-autothink recipes.",
    )
    add_arguments(parser)
    return parser


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Entry point: a parsed namespace (from the top-level CLI) or an argv list."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    try:
        if args.launch_backend == "slurm":
            return run_slurm(args)
        raise checks.LaunchError(f"unknown launch backend {args.launch_backend!r}")
    except ConfigError as e:
        print(f"autothink launch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
