"""Render the sbatch script for a run: a pure function of (config, launch options, paths).

Nothing here touches the file system, the clock or the environment, so the output is compared
byte for byte with golden files (``tests/launch/golden/``) and linted with shellcheck. Checks that
need the machine (writable run dir, image present, ``sbatch`` on PATH) live in
:mod:`megatron_autothink.launch.checks`.

The script, top to bottom: ``#SBATCH`` header; paths; rendezvous (first host of the allocation,
a port derived from the job id); environment; the pre-emption trap; one ``srun`` that starts the
ranks (one torchrun per node, or one task per rank) with one log file per node and restart; the
wait loop; requeue or exit. docs/launch.md explains each part.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import PurePosixPath

from megatron_autothink.config import AutothinkConfig
from megatron_autothink.launch.options import SlurmOptions

REFORWARD_S = 10
"""After USR1, re-send it to the ranks this often until they exit: a rank that was still
importing (signal ignored until the trainer installs its handler) gets another chance."""


def q(value: str) -> str:
    """Shell-quote one word (no quotes when none are needed)."""
    return shlex.quote(value)


def job_name(cfg: AutothinkConfig, opts: SlurmOptions) -> str:
    return opts.job_name or f"autothink-{cfg.recipe}"


def _dir_expr(path: str, workdir_var: str = "WORKDIR") -> str:
    """A shell expression for a directory: absolute paths quoted, relative ones under $WORKDIR."""
    if PurePosixPath(path).is_absolute():
        return q(path)
    rel = str(PurePosixPath(path))
    return f'"${{{workdir_var}}}"/{q(rel)}' if rel != "." else f'"${{{workdir_var}}}"'


def _header(cfg: AutothinkConfig, opts: SlurmOptions, layout: dict[str, int]) -> list[str]:
    gpus = (
        f"{opts.gpus_per_node} GPU(s)"
        if opts.gpus_per_node
        else f"{opts.ranks_per_node} CPU rank(s)"
    )
    lines = [
        "#!/bin/bash",
        f"# megatron-autothink: recipe {cfg.recipe} on {opts.nodes} node(s) x {gpus}, {opts.launcher};",
        f"# world {opts.world_size} = tp {layout['tp']} x pp {layout['pp']} x cp {layout['cp']}"
        f" x dp {layout['dp']}.",
        "# Rendered by `autothink launch slurm` (megatron_autothink/launch/render.py): re-render, don't edit.",
    ]
    if opts.requeue:
        lines += [
            f"# Pre-emption (docs/launch.md): SLURM sends USR1 {opts.signal_lead_s} s before the time limit;",
            "# the ranks checkpoint, rank 0 writes $RUN_DIR/PREEMPTED, all exit 0, and this script",
            "# requeues the job; the rerun resumes from the latest checkpoint.",
        ]
    run_dir = cfg.logging.run_dir
    log_dir = str(PurePosixPath(run_dir) / "slurm")
    if not opts.workdir:
        lines += [
            f"# Submit from the repository root: mkdir -p {log_dir} && sbatch THIS_FILE",
            "# (SLURM does not create the --output directory; `autothink launch slurm` does).",
        ]
    tasks = 1 if opts.launcher == "torchrun" else opts.ranks_per_node
    sb = [
        f"--job-name={job_name(cfg, opts)}",
        f"--nodes={opts.nodes}",
        f"--ntasks-per-node={tasks}",
    ]
    if opts.gpus_per_node:
        sb.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.cpus_per_rank:
        sb.append(f"--cpus-per-task={opts.cpus_per_rank * opts.ranks_per_node // tasks}")
    if opts.exclusive:
        sb.append("--exclusive")
    if opts.mem:
        sb.append(f"--mem={opts.mem}")
    for key, val in (
        ("time", opts.time),
        ("account", opts.account),
        ("partition", opts.partition),
        ("qos", opts.qos),
    ):
        if val:
            sb.append(f"--{key}={val}")
    sb.append(f"--output={log_dir}/%x-%j.out")
    sb.append("--open-mode=append")
    if opts.requeue:
        sb += ["--requeue", f"--signal=B:USR1@{opts.signal_lead_s}"]
    else:
        sb.append("--no-requeue")
    if opts.workdir:
        sb.append(f"--chdir={opts.workdir}")
    sb += opts.sbatch_args
    lines += [f"#SBATCH {s}" for s in sb]
    return lines


def _paths(cfg: AutothinkConfig, opts: SlurmOptions) -> list[str]:
    workdir = q(opts.workdir) if opts.workdir else '"${SLURM_SUBMIT_DIR}"'
    return [
        "",
        "set -uo pipefail",
        "",
        "# ---- paths: relative paths below are relative to WORKDIR",
        f"WORKDIR={workdir}",
        'cd "${WORKDIR}" || exit 1',
        f"RUN_DIR={_dir_expr(cfg.logging.run_dir)}",
        'LOG_DIR="${RUN_DIR}/logs"',
        'MARKER="${RUN_DIR}/PREEMPTED"',
        'RESTART="${SLURM_RESTART_COUNT:-0}"',
        'mkdir -p "${LOG_DIR}" "${RUN_DIR}/slurm"',
        "",
        'log() { echo "[autothink $(date -u +%FT%TZ) job ${SLURM_JOB_ID} restart ${RESTART}] $*"; }',
    ]


def _rendezvous(opts: SlurmOptions) -> list[str]:
    lines = [
        "",
        "# ---- rendezvous: node 0 of the allocation hosts the store; node ranks come from srun",
    ]
    if opts.master_addr:
        lines.append(f"MASTER_ADDR={q(opts.master_addr)}")
    else:
        lines.append('MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"')
    if opts.master_port:
        lines.append(f"MASTER_PORT={opts.master_port}")
    else:
        lines.append("MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))")
    lines.append("export MASTER_ADDR MASTER_PORT")
    return lines


def _environment(opts: SlurmOptions) -> list[str]:
    rpn = opts.ranks_per_node
    if opts.cpus_per_rank:
        cpus = f"CPUS_PER_RANK={opts.cpus_per_rank}"
    else:
        cpus = (
            f"CPUS_PER_RANK=$(( SLURM_CPUS_ON_NODE / {rpn} > 0 ? SLURM_CPUS_ON_NODE / {rpn} : 1 ))"
        )
    lines = [
        "",
        "# ---- environment of every rank",
        cpus,
        "export OMP_NUM_THREADS=${CPUS_PER_RANK}",
        "export PYTHONUNBUFFERED=1",
        "# A checkout in WORKDIR is what runs, also inside a container; any other WORKDIR stays off",
        "# PYTHONPATH (its files would shadow the installed package's modules)",
        'if [[ -f "${WORKDIR}/megatron_autothink/__init__.py" ]]; then',
        '  export PYTHONPATH="${WORKDIR}${PYTHONPATH:+:${PYTHONPATH}}"',
        "fi",
        'export AUTOTHINK_RUN_DIR="${RUN_DIR}" AUTOTHINK_PREEMPT_MARKER="${MARKER}"',
        'export AUTOTHINK_RESTART_COUNT="${RESTART}"',
        "# Per-job, node-local caches: ranks of concurrent jobs sharing one $HOME do not contend for",
        "# one cache. Defaults only: a value set where sbatch runs (or in env: below) wins.",
        'JOB_CACHE="${TMPDIR:-/tmp}/autothink-${SLURM_JOB_ID}"',
        'export HF_HOME="${HF_HOME:-${JOB_CACHE}/huggingface}"',
        'export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${JOB_CACHE}/triton}"',
    ]
    if opts.gpus_per_node:
        lines += [
            "# megatron-core: keeps TP/SP communication kernels ordered ahead of compute",
            "export CUDA_DEVICE_MAX_CONNECTIONS=1",
            "# a failed or timed-out NCCL collective aborts the rank (and, with --kill-on-bad-exit,",
            "# the step) instead of hanging it until the time limit; overridable like the caches",
            'export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"',
        ]
    if opts.launcher == "torchrun":
        lines += [
            "# torchrun waits this long for ranks to exit after a TERM before SIGKILL (read by",
            "# torch 2.13; older releases wait 30 s)",
            f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={opts.grace_s}",
        ]
    if opts.env:
        lines.append("# site settings (NCCL / InfiniBand / UCX): see docs/launch.md")
        lines += [f"export {k}={q(v)}" for k, v in opts.env.items()]
    else:
        lines.append("# no NCCL / InfiniBand settings given: NCCL auto-detects (docs/launch.md)")
    if opts.setup:
        lines += ["", "# ---- site setup", *opts.setup]
    return lines


def _trap(opts: SlurmOptions) -> list[str]:
    if not opts.requeue:
        return [
            "",
            "# ---- signals: TERM (scancel, pre-emption by SLURM) is forwarded to the ranks",
            'STEP_PID=""',
            "# shellcheck disable=SC2317  # runs from the trap",
            'on_term() { log "TERM: forwarding to the ranks"; [[ -n "${STEP_PID}" ]] && kill -s TERM "${STEP_PID}" 2>/dev/null; }',
            "trap on_term TERM",
        ]
    return [
        "",
        "# ---- pre-emption: USR1 comes from SLURM (--signal) or `scancel --batch --signal=USR1`.",
        "# srun relays a signal to every process of the step; ranks save, write MARKER, exit 0.",
        f"GRACE={opts.grace_s}",
        "PREEMPT=0",
        "DEADLINE=0",
        "LAST_FORWARD=0",
        'STEP_PID=""',
        'forward() { [[ -n "${STEP_PID}" ]] && kill -s "$1" "${STEP_PID}" 2>/dev/null; LAST_FORWARD=${SECONDS}; }',
        "# shellcheck disable=SC2317  # runs from the trap",
        "on_usr1() {",
        "  if (( PREEMPT == 0 )); then",
        "    PREEMPT=1",
        "    DEADLINE=$((SECONDS + GRACE))",
        '    log "USR1: asking the ranks to checkpoint and exit (grace ${GRACE}s)"',
        "  fi",
        "  forward USR1",
        "}",
        "# shellcheck disable=SC2317  # runs from the trap",
        'on_term() { log "TERM: forwarding to the ranks (job cancelled or pre-empted by SLURM)"; forward TERM; }',
        "trap on_usr1 USR1",
        "trap on_term TERM",
        "requeue() {",
        '  if scontrol requeue "${SLURM_JOB_ID}"; then',
        '    log "requeued; the next run resumes from the latest checkpoint"',
        "    exit 0",
        "  fi",
        '  log "ERROR: scontrol requeue failed; resubmit this script to resume"',
        "  exit 1",
        "}",
    ]


def _launch_cmd(opts: SlurmOptions, config_path: str, overrides: Sequence[str]) -> list[str]:
    rpn = opts.ranks_per_node
    torchrun = opts.launcher == "torchrun"
    tasks = 1 if torchrun else rpn
    cpus_per_task = f"$((CPUS_PER_RANK * {rpn}))" if torchrun else "${CPUS_PER_RANK}"
    srun = [
        "srun",
        f"--nodes={opts.nodes}",
        f"--ntasks-per-node={tasks}",
        f'--cpus-per-task="{cpus_per_task}"',
        "--kill-on-bad-exit=1",
    ]
    if not torchrun:
        srun.append("--label")
    srun.append('--output="${LOG_DIR}/%x-%j-r${RESTART}-node%n.log"')
    c = opts.container
    if c.runtime == "pyxis":
        srun += [
            f"--container-image={q(c.image)}",
            '--container-mounts="${MOUNTS}"',
            '--container-workdir="${WORKDIR}"',
        ]
    srun += opts.srun_args

    prefix: list[str] = []
    if c.runtime == "apptainer":
        prefix = ["apptainer", "exec"]
        if opts.gpus_per_node:
            prefix.append("--nv")
        prefix += ['--bind "${MOUNTS}"', '--pwd "${WORKDIR}"', q(c.image)]

    if torchrun:
        wrapper = (
            'trap "" USR1; exec "$0" -m torch.distributed.run --node-rank="${SLURM_NODEID}" "$@"'
        )
        rank_args = [
            q(opts.python),
            f"--nnodes={opts.nodes}",
            f"--nproc-per-node={rpn}",
            '--master-addr="${MASTER_ADDR}"',
            '--master-port="${MASTER_PORT}"',
            "--max-restarts=0",
        ]
        explain = [
            "# One torchrun per node starts its ranks (static rendezvous, node rank from SLURM_NODEID).",
        ]
    else:
        wrapper = (
            'trap "" USR1; export RANK="${SLURM_PROCID}" LOCAL_RANK="${SLURM_LOCALID}"'
            f' WORLD_SIZE={opts.world_size} LOCAL_WORLD_SIZE={rpn}; exec "$0" "$@"'
        )
        rank_args = [q(opts.python)]
        explain = ["# One srun task per rank; RANK/LOCAL_RANK/WORLD_SIZE come from SLURM."]
    rank_args += _pairs([q(a) for a in opts.entry])
    rank_args += ["--config " + q(config_path)] + [q(o) for o in overrides]

    lines = ["", "# ---- the ranks"]
    if c.runtime != "none":
        lines += [
            "# WORKDIR and RUN_DIR are mounted at their own paths, plus the site's mounts",
            'MOUNTS="${WORKDIR}:${WORKDIR},${RUN_DIR}:${RUN_DIR}"',
        ]
        lines += [f"MOUNTS+={q(',' + m)}" for m in c.mounts]
    else:
        lines += [
            f"# No container: every node must have {opts.python} (by default the submitting",
            "# machine's interpreter) with this project's packages; --container runs an image.",
        ]
    lines += explain
    survivors = (
        "torchrun and the ranks' helper processes" if torchrun else "the ranks' helper processes"
    )
    lines += [
        "# Ranks start with USR1 ignored; the trainer's PreemptionWatcher takes it over",
        f"# (megatron_autothink/train/preempt.py), so {survivors} survive it.",
        "# shellcheck disable=SC2016  # the single-quoted command expands on each node, not here",
        f"RANK_CMD={q(wrapper)}",
        'rm -f "${MARKER}"',
        'log "starting ${SLURM_JOB_NUM_NODES} node(s) (${SLURM_JOB_NODELIST}), master ${MASTER_ADDR}:${MASTER_PORT}"',
    ]
    words = srun + prefix + ['bash -c "${RANK_CMD}"'] + rank_args
    lines.append(_wrap(words) + " &")
    lines.append("STEP_PID=$!")
    return lines


def _pairs(words: list[str]) -> list[str]:
    """Keep ``-m module`` together when wrapping."""
    out: list[str] = []
    for w in words:
        if out and out[-1] == "-m":
            out[-1] = f"-m {w}"
        else:
            out.append(w)
    return out


def _wrap(words: list[str], width: int = 100) -> str:
    """Join words into a backslash-continued command, at most ``width`` columns per line."""
    out: list[str] = []
    line = ""
    for w in words:
        cand = f"{line} {w}" if line else w
        if line and len(cand) > width - 2:
            out.append(line + " \\")
            line = "  " + w
        else:
            line = cand
    out.append(line)
    return "\n".join(out)


def _wait(opts: SlurmOptions) -> list[str]:
    if not opts.requeue:
        return [
            "",
            "# ---- wait (a trapped signal interrupts `wait`; keep waiting until srun exits)",
            'while kill -0 "${STEP_PID}" 2>/dev/null; do',
            "  sleep 2 &",
            "  wait $!",
            "done",
            'wait "${STEP_PID}"',
            "RC=$?",
            'log "ranks exited with status ${RC}"',
            'exit "${RC}"',
        ]
    return [
        "",
        "# ---- wait; after USR1 re-send it now and then and give up after GRACE seconds",
        'while kill -0 "${STEP_PID}" 2>/dev/null; do',
        "  if (( PREEMPT )); then",
        "    if (( SECONDS >= DEADLINE )); then",
        '      log "ranks did not finish the checkpoint within ${GRACE}s; requeueing anyway"',
        "      requeue",
        "    fi",
        f"    (( SECONDS - LAST_FORWARD >= {REFORWARD_S} )) && forward USR1",
        "  fi",
        "  sleep 2 &",
        "  wait $!",
        "done",
        'wait "${STEP_PID}"',
        "RC=$?",
        'log "ranks exited with status ${RC}"',
        "if (( PREEMPT )); then",
        '  if [[ -f "${MARKER}" ]]; then',
        '    log "checkpoint confirmed: $(cat "${MARKER}")"',
        "    requeue",
        "  elif (( RC != 0 )); then",
        '    log "no PREEMPTED marker; the rerun resumes from the latest periodic checkpoint"',
        "    requeue",
        "  fi",
        '  log "training finished before the signal took effect; not requeueing"',
        "fi",
        'exit "${RC}"',
    ]


def render_sbatch(
    cfg: AutothinkConfig,
    opts: SlurmOptions,
    *,
    config_path: str,
    overrides: Sequence[str] = (),
) -> str:
    """The sbatch script that runs ``cfg`` as described by ``opts``.

    Args:
        cfg: the resolved run config (layout and ``logging.run_dir`` are read).
        opts: launch options (nodes, container, SLURM account, ...).
        config_path: what the ranks get as ``--config``; relative paths are relative to the
            job's working directory.
        overrides: ``KEY=VALUE`` overrides appended after ``--config``.

    Raises:
        ConfigError: when the layout does not fit ``opts.world_size``.
    """
    layout = cfg.world_layout(opts.world_size)
    parts = (
        _header(cfg, opts, layout)
        + _paths(cfg, opts)
        + _rendezvous(opts)
        + _environment(opts)
        + _trap(opts)
        + _launch_cmd(opts, config_path, overrides)
        + _wait(opts)
    )
    return "\n".join(parts) + "\n"
