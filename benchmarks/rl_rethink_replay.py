"""Seed study: VL-Rethinker's forced rethinking is accepted and SSR replays are trained, end to
end (issue #18; ``tests/rl/test_trainer.py::test_vl_rethinker_accepts_rethinks_trains_replays``).

A tiny model that answers nothing right never sees a correct rethink, and SSR's buffer then
stays empty. So the task is made one that any barely trained model gets right half the time:
the "coin" set asks "One or two?" about an image of a handwritten digit, and its ground truth is
1 or 2 at random, independent of the image and the question. Once the model writes the answer
format (``The answer is \\boxed{N}.`` then EOS) with N in {1, 2}, a sampled answer is right
with probability ~1/2, whatever it learned:

* **Rethinks get accepted.** Every finished response is rethought (``drop_prob=0``,
  ``truncate_prob=0``, a small ``min_budget_tokens``); a continuation after the trigger is kept
  when it is 30+ tokens, finished and correct. Half of the annealing responses carry a rethink
  themselves (an answer, one of the recipe's four triggers, a 30-token re-read, the final
  answer), so the model continues a trigger that way, and its final answer is right ~1/2 of the
  time. Measured (docs/benchmarks.md): 1.3-2.0 continuations issued per step, 21-50 % of them
  accepted (the rest: wrong answer, or too short after a response that had rethought already).
  At the worst measured rates, 24 steps issue >= 31 continuations, none accepted with
  probability 0.79^31 = 7e-4.
* **Replays get trained.** One prompt per step and groups of two: SSR's training set is one
  sample (half the step's rollouts), taken from the step's own samples when its group is mixed
  (the two rewards differ: non-zero advantages, which then enter the buffer), and from the
  buffer, i.e. a replay, when the group is uniform (zero advantages). With u the chance that a
  step's group is mixed, a run of S steps has no replay only if no uniform step follows a mixed
  one: the S+1 sequences U^k M^(S-k), probability sum_k (1-u)^k u^(S-k). Measured u is
  0.38-0.69; at S=24 that sum is 1.5e-6 at u=0.5, 1.4e-5 at u=0.4 or 0.6, 3.4e-4 at u=0.3
  or 0.7.

The runs anneal in the same process (an SFT stage on the coin set), then run the recipe's RL
stage on it. Counts come from what the trainer logs: ``metrics.jsonl`` (``rethink/accepted``,
``ssr/replayed``, ``actor/replay/tokens``) and ``rollouts/<stage>.jsonl`` (``rethink``
verdicts per response).

Usage::

    python -m benchmarks.rl_rethink_replay --seeds 1 2 3 --out /tmp/rl_rethink
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import tiny_runs
from benchmarks.tiny_runs import BATCH, run_train

QUESTION = "One or two? Put the final answer in \\boxed{}."
# A re-read of ~30 tokens of the tiny tokenizer (it is trained on the digits corpus, whose
# words these are), so a continuation that repeats it passes the 30-token minimum.
REREAD = (
    " Let me read the image again. The digits are 1, 2. The first is 1. That is 2 digits. "
    "The sum of the digits is 3."
)
ANNEAL_STEPS = 60
RL_STEPS = 24
# The model and batch shape of tests/rl/test_trainer.py's SMALL runs; one prompt and groups of
# two per RL step (see the module docstring for why).
SETTINGS = [
    *BATCH,
    "data.global_batch_size=8",
    "checkpoint.save_every=0",
    "optim.decay_style=constant",
    "rollout.max_new_tokens=160",
    # A barely trained model at temperature 1 writes much noise (no EOS, cut boxes, too short
    # continuations); cooler sampling keeps its answer format while the choice between 1 and 2
    # stays a coin flip (the annealing data's answers are 50/50).
    "rollout.temperature=0.6",
    "rl.rethink.temperature=0.6",
    "rl.prompts_per_step=1",
    "rl.group_size=2",
    "rl.rethink.drop_prob=0.0",
    "rl.rethink.truncate_prob=0.0",
    "rl.rethink.min_budget_tokens=40",
    f"stages=[{{name: anneal, kind: sft, steps: {ANNEAL_STEPS}}}, "
    f"{{name: grpo_ssr, kind: rl, steps: {RL_STEPS}, lr: 2.0e-05}}]",
]


def coin_samples(n: int, seed: int = 0, start: int = 0) -> Iterator[Any]:
    """Samples ``start .. n-1`` of the coin set (deterministic in ``(seed, i)``)."""
    import numpy as np

    from megatron_autothink.data.digits import _digit_data, compose_image
    from megatron_autothink.data.schema import IMAGE_PLACEHOLDER, Sample, Turn
    from megatron_autothink.modes import EMPTY_THINK
    from megatron_autothink.rl.rethinking import (
        TRIGGER_DOUBLE_CHECK,
        TRIGGER_MISTAKE,
        TRIGGER_SEEM_RIGHT,
        TRIGGER_WAIT,
    )

    n_scans = len(_digit_data()[1])
    for i in range(start, n):
        rng = np.random.default_rng([seed, 4242, i])
        answer = int(rng.integers(1, 3))
        final = f"The answer is \\boxed{{{answer}}}."
        if rng.random() < 0.5:  # a rethink: a first answer, a trigger, the re-read, the answer
            first = int(rng.integers(1, 3))
            trigger = [TRIGGER_WAIT, TRIGGER_SEEM_RIGHT, TRIGGER_DOUBLE_CHECK, TRIGGER_MISTAKE][
                int(rng.integers(4))
            ]
            final = f"The answer is \\boxed{{{first}}}.{trigger}{REREAD} {final}"
        buf = io.BytesIO()
        compose_image((int(rng.integers(n_scans)),)).save(buf, format="PNG")
        yield Sample(
            id=f"coin-{i:06d}",
            images=[buf.getvalue()],
            conversations=[Turn(role="user", content=f"{IMAGE_PLACEHOLDER}\n{QUESTION}")],
            responses={
                "thinking": f"<think>\nIt is one or two.\n</think>\n\n{final}",
                "non_thinking": EMPTY_THINK + final,
            },
            answer=str(answer),
            answer_type="number",
            difficulty=1,
            source="coin",
        )


def prep_coin(root: Path, n: int = 400) -> tuple[Path, Path]:
    """The coin set (``n`` train samples) and the tiny tokenizer; returns (data, tokenizer)."""
    from megatron_autothink.data.digits import build_tiny_tokenizer
    from megatron_autothink.data.shards import PrepOptions, write_samples

    data = root / "coin"
    if not (data / "tokenizer" / "tokenizer.json").exists():
        write_samples(
            lambda start: coin_samples(n, start=start),
            str(data),
            PrepOptions(split="train", progress=False, max_error_rate=0.0),
            total=n,
            source_id={"coin": 1, "n": n},
        )
        build_tiny_tokenizer(str(data / "tokenizer"))
    return data, data / "tokenizer"


def train_command(data: Path, tok: Path, run: Path, seed: int, *extra: str) -> list[str]:
    return tiny_runs.train_command(
        "vl_rethinker_tiny", data, tok, run, f"train.seed={seed}", *SETTINGS, *extra
    )


def counts(run: Path, stage: str = "grpo_ssr") -> dict[str, float]:
    """What one run logged: rollouts, correct ones (after rethinking), rethinks issued and
    accepted, steps whose group has differing rewards, replayed samples trained, replay tokens in
    the updates."""
    rows = [json.loads(x) for x in (run / "rollouts" / f"{stage}.jsonl").read_text().splitlines()]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if m["stage"] == stage]
    by_step: dict[int, set[float]] = {}
    for r in rows:
        by_step.setdefault(r["step"], set()).add(r["reward"])
    return {
        "rollouts": len(rows),
        "correct": sum(r["correct"] for r in rows),
        "rethinks": sum(m.get("rethink/attempted", 0.0) for m in metrics),
        "accepted": sum(m.get("rethink/accepted", 0.0) for m in metrics),
        "mixed_steps": sum(len(v) > 1 for v in by_step.values()),
        "replayed": sum(m.get("ssr/replayed", 0.0) for m in metrics),
        "replay_tokens": sum(m.get("actor/replay/tokens", 0.0) for m in metrics),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", type=Path, default=Path("/tmp/rl_rethink"))
    ap.add_argument("extra", nargs="*", help="more overrides, e.g. rl.ssr.enabled=false")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data, tok = prep_coin(args.out)
    for seed in args.seeds:
        run = args.out / f"s{seed}"
        wall = run_train(train_command(data, tok, run, seed, *args.extra), run)
        print(f"seed {seed}: {counts(run)}  ({wall:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
