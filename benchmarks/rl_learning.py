"""Seed study for "RL optimises its reward" (issue #18; tests/rl/test_learning.py).

From one barely annealed tiny checkpoint (it emits R-4B's think format only part of the time),
GRPO and BPO runs with real vLLM rollouts and megatron updates should raise the mean training
reward, and a run with every advantage negated (tests/rl/flipped_advantages.py) should lower
it. Per run: mean reward of every rollout response in the first fifth of the RL steps vs the
last fifth (from ``<run_dir>/rollouts/rl.jsonl``, one row per response), and the delta.

The settings below are the ones the test uses; the test asserts margins well inside the
spread this script measures (docs/benchmarks.md, "RL optimises its reward: seed study").

Usage::

    python -m benchmarks.rl_learning --seeds 1 2 3 --out /tmp/rl_learning
    python -m benchmarks.rl_learning --seeds 1 2 3 4 5 --runs grpo flipped
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

from benchmarks import tiny_runs
from benchmarks.tiny_runs import BATCH, prepare_digits, run_train

COMMON = [
    *BATCH,
    # constant LR: a cosine over the short stages below would spend half of them near min_lr
    "optim.decay_style=constant",
]
# Bi-mode annealing until the sampled responses (temperature 1) are in R-4B's format roughly
# a quarter of the time: enough signal for the group advantages, plenty left to learn.
ANNEAL_STEPS = 80
ANNEAL = [f"stages=[{{name: anneal, kind: sft, steps: {ANNEAL_STEPS}}}]"]
ANNEAL_SEED = 1234
# The reward: the recipe's accuracy plus R-4B's format reward (the term a tiny model can move
# in a few steps; its accuracy on digits is near zero).
RL_STEPS = 30
RL_LR = 3e-4
RL = [
    f"stages=[{{name: rl, kind: rl, steps: {RL_STEPS}, lr: {RL_LR}}}]",
    "checkpoint.save_every=0",
    "rl.rewards.think_format=1.0",
    "rollout.max_new_tokens=48",
    "rl.prompts_per_step=4",
    "rl.group_size=8",
    "rl.bpo.g_think=4",
    "rl.bpo.g_nothink=4",
]
# name -> (recipe overrides, advantages negated)
RUNS: dict[str, tuple[list[str], bool]] = {
    "grpo": (["rl.algorithm=grpo"], False),
    "bpo": (["rl.algorithm=bpo"], False),
    "flipped": (["rl.algorithm=grpo"], True),
}


def prep_data(root: Path) -> tuple[Path, Path]:
    """Digits shards (200 train / 20 test) and the tokenizer; returns (data, tokenizer)."""
    data = prepare_digits(root)
    return data, data / "tokenizer"


def train_command(
    data: Path, tok: Path, run: Path, *overrides: str, flipped: bool = False
) -> list[str]:
    entry = "tests.rl.flipped_advantages" if flipped else "megatron_autothink.cli"
    return tiny_runs.train_command("r4b_bpo_tiny", data, tok, run, *COMMON, *overrides, entry=entry)


def annealed_checkpoint(data: Path, tok: Path, root: Path) -> Path:
    """Anneal, then export the last checkpoint as a HF dir that ``train.init_from`` loads."""
    from megatron_autothink.eval.model import export_training_checkpoint

    run = root / "anneal"
    hf = root / "anneal_hf"
    if not (hf / "config.json").exists():
        run_train(
            train_command(
                data,
                tok,
                run,
                *ANNEAL,
                f"train.seed={ANNEAL_SEED}",
                f"checkpoint.save_every={ANNEAL_STEPS}",
            ),
            run,
        )
        export_training_checkpoint(run / "checkpoints" / "anneal" / f"iter_{ANNEAL_STEPS:08d}", hf)
    return hf


def rl_command(data: Path, tok: Path, init: Path, run: Path, name: str, seed: int) -> list[str]:
    overrides, flipped = RUNS[name]
    return train_command(
        data,
        tok,
        run,
        *RL,
        *overrides,
        f"train.init_from={init}",
        f"train.seed={seed}",
        flipped=flipped,
    )


def step_rewards(run: Path, stage: str = "rl") -> dict[int, list[float]]:
    """Reward of every rollout response, by RL step."""
    out: dict[int, list[float]] = defaultdict(list)
    for line in (run / "rollouts" / f"{stage}.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]].append(float(row["reward"]))
    return dict(out)


def fifths(run: Path, stage: str = "rl") -> tuple[float, float]:
    """Mean reward over all responses of the first fifth of the steps and of the last fifth."""
    by_step = step_rewards(run, stage)
    steps = sorted(by_step)
    k = max(len(steps) // 5, 1)

    def mean(chosen: list[int]) -> float:
        rewards = [r for s in chosen for r in by_step[s]]
        return sum(rewards) / len(rewards)

    return mean(steps[:k]), mean(steps[-k:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--out", type=Path, default=Path("/tmp/rl_learning"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data, tok = prep_data(args.out)
    t0 = time.perf_counter()
    init = annealed_checkpoint(data, tok, args.out)
    print(f"annealed checkpoint: {init} ({time.perf_counter() - t0:.0f} s)", flush=True)
    deltas: dict[str, list[float]] = defaultdict(list)
    print("run      seed  first   last    delta   wall_s", flush=True)
    for name in args.runs:
        for seed in args.seeds:
            run = args.out / f"{name}_s{seed}"
            if not (run / "rollouts" / "rl.jsonl").exists():
                wall = run_train(rl_command(data, tok, init, run, name, seed), run)
            else:
                wall = float("nan")
            first, last = fifths(run)
            deltas[name].append(last - first)
            print(
                f"{name:8s} {seed:4d}  {first:.3f}  {last:.3f}  {last - first:+.3f}  {wall:6.0f}",
                flush=True,
            )
    for name, ds in deltas.items():
        sd = statistics.stdev(ds) if len(ds) > 1 else float("nan")
        print(
            f"{name:8s} delta mean {statistics.mean(ds):+.3f}  sd {sd:.3f}  "
            f"min {min(ds):+.3f}  max {max(ds):+.3f}  (n={len(ds)})"
        )


if __name__ == "__main__":
    main()
