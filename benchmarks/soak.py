"""Soak: ``kill -9`` an ``autothink train`` run again and again across an anneal -> RL stage
boundary (SSR and a KL term on), resume it each time, and compare the end with an uninterrupted
run (issue #21).

The run is the tiny R-4B BPO recipe (``r4b_bpo_tiny``: its think-format reward gives every step
a training signal, so the SSR buffer fills) as two stages, ``anneal`` (SFT) then ``rl`` (vLLM
rollouts, ``rl.ssr.enabled``, ``rl.kl_coef > 0``), a checkpoint every step. It is driven the way a
user drives it: ``python -m megatron_autothink.cli train ...`` in a subprocess of its own session
(``start_new_session``), restarted with the same command after each kill.

1. A reference run, uninterrupted: its wall time, its time to the first logged step (start-up)
   and its step times set the kill times of the next run.
2. The soaked run. Kill times are drawn from ``--seed`` before it starts: each kill either lands
   during start-up (a uniform time in ``[1 s, start-up]``; about one in five) or waits until this
   attempt prints a target step (targets drawn uniformly over all steps of both stages, in
   increasing order) and then a uniform share of that stage's step time, so kills land in a
   step's rollouts, its update, its log-then-save window, a checkpoint write, or a start-up.
   Half the kills (shuffled) are of the whole process group (``killpg``: what a node failure or
   SLURM does), half of the trainer process only (its helpers are then on their own).
3. After every kill, and at the end: no process may be left that carries this soak's tag in its
   environment (every process the trainer starts inherits it: vLLM, loader workers, megatron's
   helpers), names the run directory in its command line, or still sits in the killed process
   group. Survivors are reported as orphans (and killed, so the next attempt starts clean).
4. At the end: every (stage, step) row of ``metrics.jsonl`` appears once and equals the
   reference's (all keys but wall-clock ones: ``*_s``, ``*time*``, ``*per_s``, ``mfu``, ``mem*``),
   the rollouts JSONL equals the reference's line by line (same exclusions), and every tensor of
   the final checkpoint (model and optimizer state) and its rank state (data position, RNG, SSR
   buffer) is bit-identical.

Figures printed (and written with ``--json``): kills of each kind, resumes, steps replayed (steps
logged after the last checkpoint at each kill, run again after the resume), partial checkpoint
bytes discarded (``*.tmp`` folders at a kill), seconds lost (soaked minus reference wall time),
identical yes/no, orphans.

    python -m benchmarks.soak [--kills 20] [--seed 0] [--out runs/soak] [--anneal-steps 6]
        [--rl-steps 8] [--data DIR] [--json FILE]

Exit status 0 when identical and no orphan, 1 otherwise. ``tests/train/test_soak.py`` (slow)
runs a short version.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.tiny_runs import SMALL_RL, prepare_digits, train_command

RECIPE = "r4b_bpo_tiny"
SMALL = [
    *SMALL_RL,
    "checkpoint.save_every=1",
    "checkpoint.keep_last=2",
    "rl.ssr.enabled=true",
    "rl.rewards.think_format=0.5",
    "rl.kl_coef=0.05",
]
TAG_ENV = "AUTOTHINK_SOAK_TAG"
WALL_CLOCK = re.compile(r"(_s$|time|per_s|mfu|mem|elapsed|throughput)")
"""Metric keys that measure wall clock or memory: not compared."""
STEP_LINE = re.compile(rb"^\[(?P<stage>[^\]]+)\] step (?P<step>\d+)/", re.M)


@dataclass
class Run:
    """One training run directory and the command that (re)starts it."""

    dir: Path
    data: Path
    anneal_steps: int
    rl_steps: int
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def stages(self) -> list[tuple[str, int]]:
        return [("anneal", self.anneal_steps), ("rl", self.rl_steps)]

    def command(self) -> list[str]:
        stages = (
            f"[{{name: anneal, kind: sft, steps: {self.anneal_steps}}}, "
            f"{{name: rl, kind: rl, steps: {self.rl_steps}}}]"
        )
        data, tok = self.data, self.data / "tokenizer"
        return train_command(RECIPE, data, tok, self.dir, f"stages={stages}", *SMALL)

    def start(self, attempt: int) -> tuple[subprocess.Popen[bytes], Path]:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir.parent / f"{self.dir.name}.attempt{attempt:02d}.log"
        env = {**os.environ, TAG_ENV: self.tag, "PYTHONWARNINGS": "ignore"}
        env.setdefault("AUTOTHINK_THREADS", "1")  # a shared 2-core machine; same for both runs
        with log.open("wb") as f:
            p = subprocess.Popen(
                self.command(), stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return p, log

    def global_step(self, stage: str, step: int) -> int:
        offset = 0
        for name, n in self.stages:
            if name == stage:
                return offset + step
            offset += n
        raise KeyError(stage)

    def committed(self) -> int:
        """Global step of the newest complete checkpoint (0: none)."""
        best = 0
        for name, _ in self.stages:
            for d in (self.dir / "checkpoints" / name).glob("iter_*"):
                if d.suffix != ".tmp" and (d / "meta.json").is_file():
                    best = max(best, self.global_step(name, int(d.name.split("_")[1])))
        return best

    def partial_bytes(self) -> int:
        """Bytes in unfinished checkpoint folders (``*.tmp``): written, then discarded."""
        root = self.dir / "checkpoints"
        return sum(
            f.stat().st_size for d in root.glob("*/*.tmp") for f in d.rglob("*") if f.is_file()
        )


def last_logged(log: Path, run: Run) -> int:
    """Global step of the last progress line this attempt printed (0: none)."""
    hits = list(STEP_LINE.finditer(log.read_bytes()))
    if not hits:
        return 0
    m = hits[-1]
    return run.global_step(m["stage"].decode(), int(m["step"]))


# ----------------------------------------------------------------------------- orphans


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def leftovers(run: Run, pgid: int | None) -> list[dict[str, Any]]:
    """Live processes tied to the run: its tag in their environment, its directory in their
    command line, or membership of the killed process group."""
    out = []
    me = os.getpid()
    tag = f"{TAG_ENV}={run.tag}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        stat = _read(f"/proc/{pid}/stat")
        if not stat:
            continue
        # state and pgrp follow the parenthesised command name
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] == b"Z":  # a zombie holds nothing; its parent reaps it
            continue
        ppid, pgrp = int(fields[1]), int(fields[2])
        cmdline = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ")
        why = []
        if tag in _read(f"/proc/{pid}/environ").split(b"\0"):
            why.append("tag")
        if str(run.dir).encode() in cmdline:
            why.append("run_dir")
        if pgid is not None and pgrp == pgid:
            why.append("group")
        if why:
            out.append(
                {
                    "pid": pid,
                    "ppid": ppid,
                    "why": why,
                    "cmd": cmdline.decode(errors="replace")[:200],
                }
            )
    return out


def reap_orphans(run: Run, pgid: int | None, grace_s: float) -> list[dict[str, Any]]:
    """Wait up to ``grace_s`` for the run's processes to go; kill and return the survivors."""
    deadline = time.monotonic() + grace_s
    while True:
        left = leftovers(run, pgid)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    for p in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p["pid"], signal.SIGKILL)
    return left


def trainer_pid(p: subprocess.Popen[bytes]) -> int:
    """The trainer: the launched process itself (one rank, no torchrun)."""
    return p.pid


# ----------------------------------------------------------------------------- comparison


def metric_rows(run_dir: Path) -> tuple[dict[tuple[str, int], dict[str, Any]], list[str]]:
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    dup = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        key = (r["stage"], r["step"])
        if key in rows:
            dup.append(f"{key[0]}:{key[1]}")
        rows[key] = r
    return rows, dup


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not WALL_CLOCK.search(k)}


def _nan_equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def compare_metrics(ref: Path, run: Path) -> list[str]:
    want, _ = metric_rows(ref)
    got, dup = metric_rows(run)
    diffs = [f"metrics.jsonl: row {d} appears more than once" for d in dup]
    if sorted(want) != sorted(got):
        diffs.append(f"metrics.jsonl: steps {sorted(got)} != reference {sorted(want)}")
    for key in sorted(set(want) & set(got)):
        a, b = _comparable(want[key]), _comparable(got[key])
        for k in sorted(set(a) | set(b)):
            if not _nan_equal(a.get(k), b.get(k)):
                diffs.append(f"metrics {key[0]}:{key[1]} {k}: {b.get(k)!r} != {a.get(k)!r}")
    return diffs


def compare_rollouts(ref: Path, run: Path) -> list[str]:
    diffs = []
    for f in sorted((ref / "rollouts").glob("*.jsonl")):
        a = [_comparable(json.loads(x)) for x in f.read_text().splitlines()]
        other = run / "rollouts" / f.name
        b = [_comparable(json.loads(x)) for x in other.read_text().splitlines()]
        if len(a) != len(b):
            diffs.append(f"{f.name}: {len(b)} lines != reference {len(a)}")
        diffs += [
            f"{f.name} line {i + 1} differs"
            for i, (x, y) in enumerate(zip(a, b, strict=False))
            if x != y
        ]
    return diffs


def _final_iter(run_dir: Path, stage: str) -> Path:
    folder = run_dir / "checkpoints" / stage
    return folder / (folder / "latest").read_text().strip()


def _dist_tensors(dist_dir: Path) -> dict[str, Any]:
    """Every tensor of a dist-checkpoint, read without a model (restricted metadata reader)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_autothink.checkpoint_io import read_dist_metadata

    md = read_dist_metadata(dist_dir)
    sd = {
        k: torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
    dcp.load(sd, storage_reader=dcp.FileSystemReader(str(dist_dir)), no_dist=True)
    return sd


def _same(a: Any, b: Any, where: str, out: list[str]) -> None:
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            out.append(f"{where} differs")
    elif isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            out.append(f"{where}: keys differ")
        for k in a.keys() & b.keys():
            _same(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            out.append(f"{where}: lengths differ")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _same(x, y, f"{where}[{i}]", out)
    elif not _nan_equal(a, b):
        out.append(f"{where} differs")


def compare_checkpoints(ref: Path, run: Path, stage: str) -> tuple[list[str], int]:
    import torch

    a_dir, b_dir = _final_iter(ref, stage), _final_iter(run, stage)
    diffs: list[str] = []
    if a_dir.name != b_dir.name:
        return [f"final checkpoint {b_dir.name} != reference {a_dir.name}"], 0
    a, b = _dist_tensors(a_dir / "dist"), _dist_tensors(b_dir / "dist")
    _same(a, b, "dist", diffs)
    for f in sorted(a_dir.glob("rank_*.pt")):
        ra = torch.load(f, weights_only=True)
        rb = torch.load(b_dir / f.name, weights_only=True)
        _same(ra, rb, f.name, diffs)
    return diffs, len(a)


# ----------------------------------------------------------------------------- the soak


@dataclass
class Kill:
    kind: str  # "group" | "trainer"
    phase: str  # "startup" | "step"
    at_step: int = 0  # global step printed before the kill (phase "step")
    share: float = 0.0  # share of that stage's step time (or of start-up) slept before it


def plan_kills(n: int, total_steps: int, seed: int) -> list[Kill]:
    rng = random.Random(seed)
    kinds = (["group", "trainer"] * ((n + 1) // 2))[:n]
    rng.shuffle(kinds)
    startup = [rng.random() < 0.2 for _ in range(n)]
    steps = sorted(rng.randint(1, total_steps) for _ in range(n))
    return [
        Kill(kind, "startup" if s else "step", 0 if s else st, rng.random())
        for kind, s, st in zip(kinds, startup, steps, strict=True)
    ]


def reference_timing(run: Run, log: Path, wall: float) -> tuple[float, dict[str, float]]:
    """Start-up seconds (to the first progress line, from the log's line times) and the mean
    step time of each stage, from the reference's metrics."""
    rows, _ = metric_rows(run.dir)
    step_s = {}
    for name, _ in run.stages:
        # SFT rows carry step_time_s; RL rows their parts (time/rollout_s, time/train_s, ...)
        t = [
            r.get("step_time_s") or sum(v for k, v in r.items() if k.startswith("time/"))
            for (s, _), r in rows.items()
            if s == name
        ]
        step_s[name] = sum(t) / len(t) if t else 5.0
    total_steps = sum(step_s[name] * n for name, n in run.stages)
    return max(wall - total_steps, 5.0), step_s


def wait_for_step(p: subprocess.Popen[bytes], log: Path, run: Run, target: int) -> bool:
    while p.poll() is None:
        if last_logged(log, run) >= target:
            return True
        time.sleep(0.1)
    return False


def soak(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve() if args.data else prepare_digits(out)
    for name in ("ref", "soaked"):
        shutil.rmtree(out / name, ignore_errors=True)
    ref = Run(out / "ref", data, args.anneal_steps, args.rl_steps)
    run = Run(out / "soaked", data, args.anneal_steps, args.rl_steps)
    total = args.anneal_steps + args.rl_steps

    t0 = time.monotonic()
    p, log = ref.start(0)
    if p.wait() != 0:
        raise SystemExit(f"reference run failed:\n{log.read_text()[-3000:]}")
    ref_wall = time.monotonic() - t0
    orphans = [dict(o, after="reference") for o in reap_orphans(ref, None, args.grace_s)]
    startup_s, step_s = reference_timing(ref, log, ref_wall)
    print(f"reference: {ref_wall:.0f} s (start-up ~{startup_s:.0f} s, steps {step_s})", flush=True)

    plan = plan_kills(args.kills, total, args.seed)
    events: list[dict[str, Any]] = []
    t0 = time.monotonic()
    attempt = 0
    p = None
    for kill in plan:
        p, log = run.start(attempt)
        attempt += 1
        t_start = time.monotonic()
        if kill.phase == "startup":
            deadline = t_start + 1.0 + kill.share * startup_s
            while p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            if not wait_for_step(p, log, run, kill.at_step):
                break  # the run finished (or failed: checked below) before this kill
            stage = run.stages[0][0] if kill.at_step <= run.stages[0][1] else run.stages[1][0]
            time.sleep(kill.share * step_s[stage])
        if p.poll() is not None:
            break
        logged, committed, partial = last_logged(log, run), run.committed(), run.partial_bytes()
        pgid = os.getpgid(p.pid)
        if kill.kind == "group":
            os.killpg(pgid, signal.SIGKILL)
        else:
            os.kill(trainer_pid(p), signal.SIGKILL)
        p.wait()
        left = reap_orphans(run, pgid, args.grace_s)
        orphans += [dict(o, after=f"kill {len(events) + 1}") for o in left]
        events.append(
            {
                **asdict(kill),
                "attempt_s": round(time.monotonic() - t_start, 1),
                "logged": logged,
                "committed": committed,
                "replayed": max(logged - committed, 0),
                "partial_bytes": partial,
                "orphans": len(left),
            }
        )
        print(f"kill {len(events)}/{args.kills}: {events[-1]}", flush=True)
    if p is None or p.returncode == -signal.SIGKILL:
        p, log = run.start(attempt)  # the last attempt runs to the end
        attempt += 1
    rc = p.wait()
    soaked_wall = time.monotonic() - t0
    orphans += [dict(o, after="end") for o in reap_orphans(run, None, args.grace_s)]
    if rc != 0:
        raise SystemExit(f"soaked run failed ({rc}):\n{log.read_text()[-3000:]}")

    diffs = compare_metrics(ref.dir, run.dir) + compare_rollouts(ref.dir, run.dir)
    ckpt_diffs, tensors = compare_checkpoints(ref.dir, run.dir, run.stages[-1][0])
    diffs += ckpt_diffs
    resumes = (run.dir / "resumes.jsonl").read_text().splitlines()
    report = {
        "kills": len(events),
        "kills_group": sum(e["kind"] == "group" for e in events),
        "kills_trainer": sum(e["kind"] == "trainer" for e in events),
        "kills_in_startup": sum(e["phase"] == "startup" for e in events),
        "attempts": attempt,
        "restarts": attempt - 1,
        "resume_records": len(resumes),  # resumes.jsonl: one per stage with a checkpoint
        "steps": total,
        "steps_replayed": sum(e["replayed"] for e in events),
        "partial_checkpoint_bytes": sum(e["partial_bytes"] for e in events),
        "reference_s": round(ref_wall, 1),
        "soaked_s": round(soaked_wall, 1),
        "seconds_lost": round(soaked_wall - ref_wall, 1),
        "tensors_compared": tensors,
        "identical": not diffs,
        "differences": diffs[:50],
        "orphans": orphans,
        "events": events,
    }
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/soak")
    ap.add_argument("--data", default="", help="prepared digits shards (default: made in --out)")
    ap.add_argument("--anneal-steps", type=int, default=6)
    ap.add_argument("--rl-steps", type=int, default=8)
    ap.add_argument("--grace-s", type=float, default=10.0, help="wait for helpers to exit")
    ap.add_argument("--json", default="", help="write the report here")
    args = ap.parse_args(argv)
    report = soak(args)
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    summary = {k: v for k, v in report.items() if k not in ("events", "orphans", "differences")}
    print(json.dumps(summary, indent=1))
    for d in report["differences"]:
        print("DIFF", d)
    for o in report["orphans"]:
        print("ORPHAN", o)
    return 0 if report["identical"] and not report["orphans"] else 1


if __name__ == "__main__":
    sys.exit(main())
