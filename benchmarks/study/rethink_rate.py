"""#19 goal 5: how often a run's auto-mode answers contain a rethinking phrase ("wait"), per
level, and its forced rethinks' acceptance per RL step.

Usage: python benchmarks/study/rethink_rate.py RUN_OR_EVAL_DIR [STAGE]
Reads every ``samples.jsonl`` under the folder (``autothink eval`` output) and, when there is
one, ``metrics.jsonl``'s ``rethink/*`` rows of STAGE (default: the last RL stage logged).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from megatron_autothink.rl.rewards import count_waits


def phrase_rates(samples: Path) -> dict[int, tuple[int, int]]:
    """``{level: (answers with a "wait", auto answers)}`` of one eval's samples."""
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for line in samples.read_text().splitlines():
        r = json.loads(line)
        if r["mode"] == "auto":
            counts[int(r["difficulty"])][0] += count_waits(r["response"]) > 0
            counts[int(r["difficulty"])][1] += 1
    return {k: (v[0], v[1]) for k, v in sorted(counts.items())}


def main() -> None:
    root = Path(sys.argv[1])
    for samples in sorted(root.rglob("samples.jsonl")):
        rates = phrase_rates(samples)
        cells = " / ".join(f"{100 * a / max(n, 1):.1f}" for a, n in rates.values())
        print(f"{samples.parent}: auto answers with a rethinking phrase, % per level: {cells}")
    metrics = root / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        rows = [r for r in rows if "rethink/attempted" in r]
        stage = sys.argv[2] if len(sys.argv) > 2 else (rows[-1]["stage"] if rows else "")
        rows = [r for r in rows if r["stage"] == stage]
        if rows:
            att = sum(r["rethink/attempted"] for r in rows)
            acc = sum(r["rethink/accepted"] for r in rows)
            fifth = max(len(rows) // 5, 1)
            first = sum(r["rethink/acceptance"] for r in rows[:fifth]) / fifth
            last = sum(r["rethink/acceptance"] for r in rows[-fifth:]) / fifth
            print(
                f"{stage}: {att:.0f} rethinks attempted, {acc:.0f} accepted "
                f"({100 * acc / max(att, 1):.1f} %); acceptance first / last fifth of steps "
                f"{100 * first:.1f} / {100 * last:.1f} %"
            )


if __name__ == "__main__":
    main()
