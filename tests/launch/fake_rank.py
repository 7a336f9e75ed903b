"""A torch-free rank for testing the batch script's logic under fake srun/scontrol.

Modes: ``obey`` follows the protocol (marker, exit 0); ``crash`` exits 3 on the signal without a
marker; ``hang`` notes the signal and never exits; ``ignore`` never installs the watcher (the
signal stays ignored) and finishes after ``--steps``. ``--listen-after`` delays the watcher.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_autothink.train.preempt import (
    ENV_RUN_DIR,
    PreemptionWatcher,
    marker_path,
    write_marker,
)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["obey", "crash", "hang", "ignore"], default="obey")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--listen-after", type=float, default=0.0, help="seconds before installing")
    ap.add_argument("--config")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    run_dir = Path(os.environ[ENV_RUN_DIR])
    (run_dir / "started").write_text(f"{os.getpid()}\n")
    time.sleep(args.listen_after)  # like a trainer still importing: USR1 is ignored meanwhile
    watcher = PreemptionWatcher() if args.mode != "ignore" else None
    if watcher is not None:
        watcher.install()
    (run_dir / "ready").write_text(f"{os.getpid()} {os.environ.get('RANK')}\n")
    for step in range(args.steps):
        time.sleep(0.1)
        if watcher is not None and watcher.requested:
            print(f"fake rank: {watcher.signal_name} at step {step}", flush=True)
            if args.mode == "obey":
                write_marker(
                    marker_path(run_dir),
                    step=step,
                    checkpoint="ckpt",
                    signal_name=watcher.signal_name,
                )
                return 0
            if args.mode == "crash":
                return 3
            while True:  # hang
                time.sleep(1)
    print("fake rank: finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
