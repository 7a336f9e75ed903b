"""Step 2 of ``run.sh``: install what the package needs from the wheel folder carried alongside
(``pack_wheels.sh`` makes it), without touching what the machine already has.

Only wheels whose module does not import yet are installed (``--no-deps --no-index``: the
machine's torch and CUDA libraries are never replaced), plus this package itself. In dry mode
pip only resolves (``--dry-run``). What ``pack_wheels.sh`` could not carry (``not_carried.json``
in the folder: Transformer Engine, CUDA vLLM) is reported as it stands.

    python -m benchmarks.gpu.install --out OUT [--wheels DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.gpu.common import dry_mode, exit_now, write_json

# distribution (normalised) -> the module whose import says it is there
MODULES = {
    "megatron_core": "megatron.core",
    "megatron_energon": "megatron.energon",
    "megatron_autothink": "megatron_autothink",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic_core",
    "pyyaml": "yaml",
    "pillow": "PIL",
    "typing_inspection": "typing_inspection",
    "annotated_types": "annotated_types",
    "multi_storage_client": "multistorageclient",
}
# The imports the later steps need (checked in a fresh interpreter after installing).
NEEDED = [
    "megatron.core",
    "pydantic",
    "yaml",
    "megatron_autothink.config",
    "megatron_autothink.train.step",
]


def wheel_info(path: Path) -> dict[str, Any]:
    """Name, version and whether this interpreter can install the wheel (its tags)."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:  # pip always vendors packaging
        from pip._vendor.packaging.tags import sys_tags  # type: ignore[no-redef, assignment]
        from pip._vendor.packaging.utils import parse_wheel_filename  # type: ignore[no-redef, assignment]
    name, version, _, tags = parse_wheel_filename(path.name)
    dist = str(name).replace("-", "_")
    supported = set(sys_tags())
    return {
        "file": path.name,
        "dist": dist,
        "version": str(version),
        "mib": round(path.stat().st_size / 2**20, 2),
        "module": MODULES.get(dist, dist),
        "compatible": any(t in supported for t in tags),
    }


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_imports(modules: list[str]) -> dict[str, str]:
    """Import each module in a fresh interpreter (what the later steps will see): "ok" or the
    error's last line."""
    code = (
        "import importlib, json\n"
        "r = {}\n"
        f"for m in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(m); r[m] = 'ok'\n"
        "    except Exception as e:\n"
        "        r[m] = f'{type(e).__name__}: {e}'.splitlines()[0][:300]\n"
        "print('IMPORTS ' + json.dumps(r))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    lines = [x for x in p.stdout.splitlines() if x.startswith("IMPORTS ")]
    if not lines:
        err = p.stderr.strip().splitlines()
        return {m: err[-1] if err else f"exit {p.returncode}" for m in modules}
    result: dict[str, str] = json.loads(lines[-1][8:])
    return result


def plan(wheel_dir: Path | None) -> list[dict[str, Any]]:
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir and wheel_dir.is_dir() else []
    rows = []
    for w in wheels:
        info = wheel_info(w)
        info["present_before"] = importable(info["module"])
        own = info["dist"] == "megatron_autothink"  # always: the entry points (vLLM plugin)
        if not info["compatible"]:
            info["action"] = "skip: not for this interpreter"
        elif info["present_before"] and not own:
            info["action"] = "skip: already importable"
        else:
            info["action"] = "install"
        rows.append(info)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--wheels", default="", help="the folder pack_wheels.sh made")
    args = ap.parse_args()
    wheel_dir = Path(args.wheels) if args.wheels else None
    rows = plan(wheel_dir)
    data: dict[str, Any] = {
        "wheel_dir": str(wheel_dir) if wheel_dir else None,
        "wheels": rows,
        "total_mib": round(sum(r["mib"] for r in rows), 2),
        "missing_before": {
            m: not importable(m.split(".")[0]) for m in ("megatron", "pydantic", "yaml")
        },
    }
    not_carried = wheel_dir / "not_carried.json" if wheel_dir else None
    if not_carried is not None and not_carried.is_file():
        data["not_carried"] = json.loads(not_carried.read_text())
    files = [str(wheel_dir / r["file"]) for r in rows if r["action"] == "install" and wheel_dir]
    if files:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-deps",
            "--disable-pip-version-check",
            "--find-links",
            str(wheel_dir),
        ]
        if dry_mode():
            cmd.append("--dry-run")  # never change the development machine's environment
        # Without PYTHONPATH: a source tree on it (run.sh puts the checkout there) would make
        # pip take this package as installed already and skip its wheel (entry points).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        p = subprocess.run([*cmd, *files], capture_output=True, text=True, check=False, env=env)
        data["pip"] = {
            "rc": p.returncode,
            "dry_run": dry_mode(),
            "tail": (p.stdout + p.stderr).strip().splitlines()[-8:],
        }
    if not dry_mode():
        data["imports_after"] = check_imports(NEEDED)
    else:  # pip only resolved, nothing changed since step 1 imported them: a child import
        # would cost ~10 s of CPU for nothing, so the modules are only located
        data["imports_after"] = {m: "ok" if importable(m) else "not found" for m in NEEDED}
        data["imports_checked"] = "dry run: located only (nothing was installed)"
    ok = all(v == "ok" for v in data["imports_after"].values())
    if not rows:
        data["status"] = "ok: no wheel folder, nothing installed" if ok else "failed: no wheels"
    else:
        data["status"] = "ok" if ok and data.get("pip", {}).get("rc", 0) == 0 else "failed"
    path = write_json(args.out, "2_install", data)
    n = sum(r["action"] == "install" for r in rows)
    print(f"{path}: {data['status']}; {len(rows)} wheels ({data['total_mib']} MiB), {n} to install")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
    exit_now()
