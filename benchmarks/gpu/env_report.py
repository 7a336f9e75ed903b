"""Step 1 of ``run.sh``: what this machine has (GPU, driver, torch / CUDA, which of the
optional GPU libraries and of the package's own dependencies import).

    python -m benchmarks.gpu.env_report --out OUT
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks.gpu.common import dry_mode, exit_now, write_json

# The libraries the GPU-side code paths use when present (all optional).
GPU_LIBS = {
    "transformer_engine": "transformer-engine",
    "apex": "apex",
    "flash_attn": "flash-attn",
    "vllm": "vllm",
}
# What the package imports on the training path, module -> distribution (``install`` carries
# the missing ones it can; see pack_wheels.sh).
PACKAGE_DEPS = {
    "megatron.core": "megatron-core",
    "megatron.energon": "megatron-energon",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic-core",
    "yaml": "pyyaml",
    "numpy": "numpy",
    "PIL": "pillow",
    "safetensors": "safetensors",
    "transformers": "transformers",
    "psutil": "psutil",
    "tqdm": "tqdm",
    "megatron_autothink": "megatron-autothink",
}


def probe_import(module: str) -> dict[str, Any]:
    """Import ``module`` in this process; its version or the error (first line)."""
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(module)
    except BaseException as e:  # an import can raise anything (and SystemExit from C code)
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    version = getattr(mod, "__version__", None)
    return {
        "ok": True,
        "version": str(version) if version else None,
        "import_s": round(time.perf_counter() - t0, 2),
    }


def probe_dep(module: str) -> dict[str, Any]:
    """A dependency of the package: imported (on a GPU machine: does it work with this torch?);
    in dry mode only located, since the later steps import what they need anyway (imports of
    megatron-core, energon and transformers take ~15 s of CPU together)."""
    if not dry_mode():
        return probe_import(module)
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return {"ok": found, "note": "dry run: located, not imported"}


def probe_in_child(module: str, timeout_s: float | None = None) -> dict[str, Any]:
    """Import ``module`` in a fresh bare interpreter: a GPU library's import may start threads
    or processes (vLLM does) that would keep this one from exiting, or hang. Default limit
    20 s (a CUDA vLLM imports in ~10 s), times run.sh's ``GPU_BENCH_TIME_SCALE``."""
    if timeout_s is None:
        timeout_s = 20.0 * float(os.environ.get("GPU_BENCH_TIME_SCALE") or 1)
    code = (
        "import importlib, json, time\n"
        "t0 = time.perf_counter()\n"
        f"m = importlib.import_module({module!r})\n"
        "v = getattr(m, '__version__', None)\n"
        "print('PROBE ' + json.dumps({'ok': True, 'version': str(v) if v else None, "
        "'import_s': round(time.perf_counter() - t0, 2)}))\n"
    )
    try:
        p = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"import did not finish within {timeout_s:.0f} s"}
    lines = [x for x in p.stdout.splitlines() if x.startswith("PROBE ")]
    if not lines:
        err = p.stderr.strip().splitlines()
        return {"ok": False, "error": err[-1][:300] if err else f"exit {p.returncode}"}
    result: dict[str, Any] = json.loads(lines[-1][6:])
    return result


def probe_gpu_lib(module: str) -> dict[str, Any]:
    """A GPU library: imported in a child; in dry mode a heavy one that is installed (the CPU
    vLLM: ~15 s) is only located, unless ``GPU_BENCH_DRY_VLLM=1``."""
    if dry_mode() and os.environ.get("GPU_BENCH_DRY_VLLM", "0") in ("", "0"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            return {
                "ok": None,
                "found": True,
                "version": dist_version(GPU_LIBS[module]),
                "note": "dry run: located, not imported (GPU_BENCH_DRY_VLLM=1 imports it)",
            }
    return probe_in_child(module)


def dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_smi() -> dict[str, Any]:
    if shutil.which("nvidia-smi") is None:
        return {"available": False}
    query = "name,driver_version,memory.total,compute_cap,power.limit,clocks.max.sm"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return {"available": True, "error": repr(e)}
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line]
    return {"available": True, "gpus": [dict(zip(query.split(","), r, strict=False)) for r in rows]}


def nccl_version() -> str | None:
    """torch's NCCL version (a tuple in recent torch, an int in older ones)."""
    try:
        v = torch.cuda.nccl.version()
    except Exception:
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple | list) else str(v)


def report() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    gpus = []
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "name": p.name,
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "capability": f"{p.major}.{p.minor}",
                    "sms": p.multi_processor_count,
                }
            )
    peak = None
    if gpus:
        try:  # the package may not import yet (step 1 runs before the install step)
            from megatron_autothink.train.flops import peak_flops_for

            peak = peak_flops_for(str(gpus[0]["name"]))
        except ImportError:
            peak = None
    return {
        "status": "ok",
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": nccl_version() if cuda else None,
        "cuda_available": cuda,
        "gpus": gpus,
        "bf16_dense_peak_tflops": peak / 1e12 if peak else None,
        "nvidia_smi": nvidia_smi(),
        "gpu_libs": {m: probe_gpu_lib(m) for m in GPU_LIBS},
        "package_deps": {m: probe_dep(m) for m in PACKAGE_DEPS},
        "dist_versions": {d: dist_version(d) for d in [*GPU_LIBS.values(), *PACKAGE_DEPS.values()]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    data = report()
    path = write_json(args.out, "1_env", data)
    mark = {True: "yes", False: "no", None: "found"}
    libs = " ".join(f"{m}={mark[v['ok']]}" for m, v in data["gpu_libs"].items())
    print(
        f"{path}: torch {data['torch']} cuda {data['torch_cuda']} gpus "
        f"{[g['name'] for g in data['gpus']]} {libs}"
    )


if __name__ == "__main__":
    main()
    exit_now()
