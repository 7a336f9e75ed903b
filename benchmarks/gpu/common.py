"""Shared pieces of the GPU evidence script (``benchmarks/gpu/run.sh``): the output folder, dry
mode, timers that wait for the device, and the figures every step's JSON carries."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def dry_mode() -> bool:
    """``run.sh --dry`` (or ``GPU_BENCH_DRY=1``): every step on CPU with a tiny config."""
    return os.environ.get("GPU_BENCH_DRY", "0") not in ("", "0")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name() -> str:
    try:
        import torch
    except ImportError:
        return "unknown (torch does not import)"
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None (strict JSON has no NaN), tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def write_json(out_dir: str | Path, name: str, data: dict[str, Any]) -> Path:
    """``OUT/<name>.json`` with the step's figures plus device, commit and mode."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "step": name,
        "device": device_name(),
        "commit": git_commit(),
        "dry": dry_mode(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **data,
    }
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean(record), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def sync() -> None:
    """Wait for queued device work (timers must not stop while kernels still run)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def timed(acc: dict[str, float], key: str) -> Iterator[None]:
    """Add the block's wall seconds, device work included, to ``acc[key]``."""
    sync()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        sync()
        acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0


def exit_now() -> None:
    """End the step's process once its JSON is written, without interpreter teardown: threads
    that imported libraries leave behind (vLLM, storage clients, gloo) can hold the exit past
    the step's time limit, which would mark a finished step as timed out."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
