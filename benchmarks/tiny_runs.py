"""What the RL benchmarks and the RL tests share: the tiny runs' batch shape, the digits data,
and starting ``autothink train`` in a fresh process.

``benchmarks/rl_learning.py``, ``rl_rethink_replay.py``, ``soak.py`` and ``tests/rl/`` all train
the tiny recipes on 256-token rows of the digits set; one definition keeps their figures
comparable (a seed study measured with one batch shape says nothing about another).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BATCH = [
    "data.seq_length=256",
    "data.micro_batch_size=2",
    "data.global_batch_size=4",
    "train.eval_every=0",
    "train.log_every=1",
    "logging.tensorboard=false",
]
"""Sequence length, batch shape and logging of every tiny run."""

SMALL_RL = [
    *BATCH,
    "rollout.max_new_tokens=48",
    "rl.prompts_per_step=2",
    "rl.group_size=4",
    "rl.bpo.g_think=2",
    "rl.bpo.g_nothink=2",
]
"""Plus the smallest RL step that still has a group: 2 prompts x 4 rollouts (BPO: 2 + 2)."""


def env() -> dict[str, str]:
    """The environment of a child run: this checkout's package first, warnings off."""
    out = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), out.get("PYTHONPATH", "")) if p)
    return out


def prepare_digits(root: Path, *, text_only: bool = False) -> Path:
    """Digits shards (200 train / 20 test) with the tiny tokenizer in ``<data>/tokenizer``;
    reused when a complete copy exists (written under a temporary name, then renamed)."""
    data = root / ("digits_text" if text_only else "digits")
    if (data / "tokenizer").is_dir():
        return data
    cli = [sys.executable, "-m", "megatron_autothink.cli", "prep"]
    tmp = data.with_name(data.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    digits = ["digits", "--out", str(tmp), "--train", "200", "--test", "20", "--no-progress"]
    for args in (
        [*digits, *(["--text-only"] if text_only else [])],
        ["tokenizer", "--out", str(tmp / "tokenizer")],
    ):
        subprocess.run([*cli, *args], check=True, env=env(), capture_output=True)
    tmp.rename(data)
    return data


def train_command(
    recipe: str,
    data: Path,
    tok: Path,
    run: Path,
    *overrides: str,
    launcher: list[str] | None = None,
    entry: str = "megatron_autothink.cli",
) -> list[str]:
    """``autothink train --config RECIPE`` on ``data`` into ``run`` (``launcher``: the
    interpreter, or torchrun for several ranks; ``entry``: the module run as the CLI)."""
    return [
        *(launcher or [sys.executable]),
        "-m",
        entry,
        "train",
        "--config",
        recipe,
        f"data.train_path={data}",
        f"data.tokenizer_path={tok}",
        f"logging.run_dir={run}",
        *overrides,
    ]


def run_train(cmd: list[str], run: Path, timeout: float = 1800) -> float:
    """Run one training command (log next to the run dir); returns its wall seconds."""
    t0 = time.perf_counter()
    log_path = run.parent / f"{run.name}.log"
    with log_path.open("wb") as log:
        p = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=REPO, timeout=timeout
        )
    if p.returncode != 0:
        raise RuntimeError(f"train exited {p.returncode}:\n{log_path.read_text()[-4000:]}")
    return time.perf_counter() - t0
