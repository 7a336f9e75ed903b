"""A tiny stand-in for ``autothink train`` that obeys the launcher's pre-emption protocol.

It proves the SLURM mechanics for real while the trainer (``megatron_autothink.pipeline``) is
being written: it reads the same ``--config`` + overrides, joins a gloo process group through the
torchrun/srun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), "trains" by all-reducing
a counter each step, checkpoints the counter, and on USR1/TERM (PreemptionWatcher) agrees across
ranks, saves, writes the PREEMPTED marker and exits 0. On restart it resumes from the latest
checkpoint. Rank 0 also keeps a spawned helper process alive to show that helpers survive USR1.

Records (read by tests/launch/test_slurm_e2e.py), all in the run directory:
  standin.jsonl   one JSON line per event (start / preempted / done) from rank 0
  steps.log       "<restart> <step>" for every completed step (rank 0)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, when run as a script

from megatron_autothink.train.preempt import (
    PreemptionWatcher,
    marker_path,
    restart_count,
    write_marker,
)


def _helper(beat: str, stop: Any) -> None:
    """A spawned child like a checkpoint writer or an inference engine process."""
    while not stop.is_set():
        Path(beat).write_text(f"{time.time()}\n")
        time.sleep(0.2)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _latest_step(ckpt_dir: Path) -> int:
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return 0
    state = json.loads((ckpt_dir / latest.read_text().strip() / "state.json").read_text())
    return int(state["step"])


def main() -> int:
    watcher = PreemptionWatcher().install()  # first: before threads, groups and children

    ap = argparse.ArgumentParser()
    ap.add_argument("--step-seconds", type=float, default=0.2)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from megatron_autothink.config import load_config

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.logging.run_dir)
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"

    import torch
    import torch.distributed as dist

    print(
        f"standin: rank {os.environ.get('RANK')} python up at {time.strftime('%H:%M:%S')}",
        flush=True,
    )
    t0 = time.time()
    dist.init_process_group("gloo")
    print(
        f"standin: rank {os.environ.get('RANK')} joined the group in {time.time() - t0:.1f} s",
        flush=True,
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    def record(event: dict[str, Any]) -> None:
        print(f"standin rank {rank} at {time.strftime('%H:%M:%S')}: {event}", flush=True)
        if rank == 0:
            with (run_dir / "standin.jsonl").open("a") as f:
                f.write(json.dumps(event) + "\n")

    def save(step: int) -> str:
        name = f"step_{step:06d}"
        if rank == 0:
            d = ckpt_dir / name
            d.mkdir(exist_ok=True)
            _atomic_write(d / "state.json", json.dumps({"step": step}) + "\n")
            _atomic_write(ckpt_dir / "latest", name + "\n")
        dist.barrier()
        return str(ckpt_dir / name)

    start_t = torch.tensor([_latest_step(ckpt_dir) if cfg.checkpoint.resume else 0])
    dist.broadcast(start_t, src=0)
    start = int(start_t.item())
    hosts: list[Any] = [None] * world
    dist.all_gather_object(
        hosts,
        {
            "rank": rank,
            "local_rank": int(os.environ.get("LOCAL_RANK", "-1")),
            "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
        },
    )
    record(
        {
            "event": "start",
            "restart": restart_count(),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", ""),
            "job_id": os.environ.get("SLURM_JOB_ID", ""),
            "start_step": start,
            "world": world,
            "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
            "ranks": hosts,
        }
    )

    helper = stop = None
    beat = run_dir / f"helper-{restart_count()}.beat"
    if rank == 0:
        ctx = mp.get_context("spawn")
        stop = ctx.Event()
        helper = ctx.Process(target=_helper, args=(str(beat), stop), daemon=True)
        helper.start()

    done = start
    for step in range(start, cfg.train.steps):
        time.sleep(args.step_seconds)
        t = torch.tensor([step + 1])
        dist.all_reduce(t)
        assert int(t.item()) == world * (step + 1), "ranks disagree about the step"
        done = step + 1
        if rank == 0:
            with (run_dir / "steps.log").open("a") as f:
                f.write(f"{restart_count()} {done}\n")
        if cfg.checkpoint.save_every and done % cfg.checkpoint.save_every == 0:
            save(done)
        if cfg.checkpoint.save_on_signal and watcher.should_stop():
            path = save(done)
            if rank == 0:
                alive = helper is not None and helper.is_alive()
                write_marker(
                    marker_path(run_dir),
                    step=done,
                    checkpoint=path,
                    signal_name=watcher.signal_name,
                )
                record(
                    {
                        "event": "preempted",
                        "restart": restart_count(),
                        "step": done,
                        "signal": watcher.signal_name,
                        "helper_alive": alive,
                    }
                )
            break
    else:
        save(done)
        record({"event": "done", "restart": restart_count(), "step": done})

    if stop is not None and helper is not None:
        stop.set()
        helper.join(5)
    dist.destroy_process_group()
    print(f"standin rank {rank}: exiting at {time.strftime('%H:%M:%S')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
