"""Record what the user-facing commands produce, to show a restructuring changed nothing (#23).

Issue #23 asks, right before the redesign starts and again after it, for the same commands to
give the same losses (<= 1e-6, bitwise where they were), the same evaluation tables and the same
weights. This script runs them and writes one JSON record; ``--compare OLD.json`` prints what
differs and exits 1 if anything does (timings are never compared):

1. ``autothink train --config tiny_cpu`` on the digits set, 60 steps: per-step losses;
2. the same run at TP=2 and at PP=2 (10 steps each, two gloo ranks): per-step losses;
3. ``autothink demo --smoke``: the evaluation table of every evaluated checkpoint, the training
   losses of every stage, and the digest of the exported weights;
4. a conversion round trip: run 1's checkpoint -> HF -> megatron -> HF; digests of both HF
   exports (equal to each other, and to the record's).

Usage::

    python -m benchmarks.behaviour_record --out /tmp/before      # writes /tmp/before/record.json
    python -m benchmarks.behaviour_record --out /tmp/after --compare /tmp/before/record.json

~6-8 min on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.tiny_runs import REPO, env
from megatron_autothink.demo import EVAL_PHASES

CLI = [sys.executable, "-m", "megatron_autothink.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"]
TRAIN = [
    "--config",
    "tiny_cpu",
    "data.seq_length=256",
    "data.micro_batch_size=2",
    "data.global_batch_size=4",
    "train.eval_every=0",
    "train.log_every=10",
    "logging.tensorboard=false",
]
LOSS_TOLERANCE = 1e-6


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("wb") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{log.read_text()[-4000:]}")
    return time.perf_counter() - t0


def _losses(run: Path) -> dict[str, dict[str, float]]:
    """``{stage: {step: loss}}``, the last logged record of each step."""
    out: dict[str, dict[str, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out.setdefault(r["stage"], {})[str(r["step"])] = r["loss"]
    return out


def _digest(hf: Path) -> str:
    """The exported tensors (names, dtypes, shapes, bytes), independent of file layout."""
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    tensors: dict[str, Any] = {}
    for path in sorted(hf.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[name] = f.get_tensor(name)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def record(out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    data = out / "digits"
    rec: dict[str, Any] = {"seconds": {}}
    sec = rec["seconds"]
    if not (data / "tokenizer").is_dir():
        sec["prep"] = _run(
            [*CLI, "prep", "digits", "--out", str(data), "--train", "400", "--test", "20"],
            out / "prep.log",
        )
    base = [*TRAIN, f"data.train_path={data}", "checkpoint.save_every=0"]
    run = out / "tiny_cpu"
    sec["train"] = _run(
        [*CLI, "train", *base, f"logging.run_dir={run}", "train.steps=60"], out / "train.log"
    )
    rec["train_losses"] = _losses(run)
    for layout in ("parallel.tp=2", "parallel.pp=2"):
        name = layout.split(".")[1].replace("=", "")
        r = out / name
        sec[name] = _run(
            [*TORCHRUN, "-m", "megatron_autothink.cli", "train", *base,
             f"logging.run_dir={r}", layout, "train.steps=10"],
            out / f"{name}.log",
        )  # fmt: skip
        rec[f"{name}_losses"] = _losses(r)

    hf1, mcore, hf2 = out / "hf1", out / "mcore", out / "hf2"
    conv = [*CLI, "convert"]
    sec["convert"] = (
        _run([*conv, "mcore-to-hf", str(run), str(hf1), "--no-progress", "--overwrite"],
             out / "convert1.log")
        + _run([*conv, "hf-to-mcore", str(hf1), str(mcore), "--no-progress", "--overwrite"],
               out / "convert2.log")
        + _run([*conv, "mcore-to-hf", str(mcore), str(hf2), "--no-progress", "--overwrite"],
               out / "convert3.log")
    )  # fmt: skip
    rec["export_digest"], rec["round_trip_digest"] = _digest(hf1), _digest(hf2)

    demo = out / "demo"
    sec["demo"] = _run([*CLI, "demo", "--smoke", "--out", str(demo)], out / "demo.log")
    rec["demo_losses"] = _losses(demo / "run")
    rec["demo_eval"] = {
        name: json.loads((demo / name / "summary.json").read_text())["modes"]
        for name in EVAL_PHASES
    }
    rec["demo_export_digest"] = _digest(demo / "hf_model")
    return rec


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two records (timings excluded); empty when behaviour is unchanged."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key == "seconds":
            continue
        a, b = old.get(key), new.get(key)
        if key.endswith("_losses") and isinstance(a, dict) and isinstance(b, dict):
            for stage in sorted(set(a) | set(b)):
                sa, sb = a.get(stage, {}), b.get(stage, {})
                if sorted(sa) != sorted(sb):
                    diffs.append(f"{key}[{stage}]: steps {sorted(sa)} vs {sorted(sb)}")
                    continue
                # A step that trained no sample logs NaN (RL with all advantages 0): the same
                # when both are NaN, a difference when only one is.
                nan_mismatch = [s for s in sa if math.isnan(sa[s]) != math.isnan(sb[s])]
                both = [s for s in sa if not (math.isnan(sa[s]) or math.isnan(sb[s]))]
                worst = max((abs(sa[s] - sb[s]) for s in both), default=0.0)
                if nan_mismatch:
                    diffs.append(f"{key}[{stage}]: NaN in one record only at steps {nan_mismatch}")
                elif not worst <= LOSS_TOLERANCE:
                    diffs.append(f"{key}[{stage}]: max |loss diff| {worst:.3g}")
        elif a != b:
            diffs.append(f"{key}: differs")
    if new.get("export_digest") != new.get("round_trip_digest"):
        diffs.append("conversion round trip: hf1 and hf2 differ")
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="work folder; record.json lands here"
    )
    parser.add_argument("--compare", type=Path, help="an earlier record.json to compare with")
    args = parser.parse_args(argv)
    rec = record(args.out)
    (args.out / "record.json").write_text(json.dumps(rec, indent=1, sort_keys=True))
    print(
        f"wrote {args.out / 'record.json'} ({', '.join(f'{k} {v:.0f}s' for k, v in rec['seconds'].items())})"
    )
    # Without an earlier record only the round trip is checked (a record equals itself).
    old = json.loads(args.compare.read_text()) if args.compare else rec
    diffs = compare(old, rec)
    if diffs or args.compare:
        print("unchanged" if not diffs else "\n".join(["DIFFERENT:", *diffs]))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
