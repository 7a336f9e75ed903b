"""#19's goal table over several ``autothink demo`` runs (one per seed): each goal's measurement
per seed and how many seeds meet it, plus the per-level accuracy spread of each checkpoint.

Usage: python -m benchmarks.demo_seeds DEMO_DIR [DEMO_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_autothink.report import demo_goals, load_evals, load_metrics, load_rollouts


def main(dirs: list[Path]) -> str:
    runs = {d: demo_goals(load_evals(d), load_metrics(d), load_rollouts(d)) for d in dirs}
    seeds = {d: json.loads((d / "demo_args.json").read_text())["seed"] for d in dirs}
    first = next(iter(runs.values()))
    lines = [
        "| goal | target | " + " | ".join(f"seed {seeds[d]}" for d in dirs) + " | met |",
        "|---|---|" + "---|" * len(dirs) + "---|",
    ]
    for i, g in enumerate(first):
        cells = [runs[d][i].measured if i < len(runs[d]) else "-" for d in dirs]
        mets = [runs[d][i].met for d in dirs if i < len(runs[d])]
        met = "-" if g.met is None else f"{sum(bool(m) for m in mets)} of {len(mets)}"
        lines.append(f"| {g.goal} | {g.target} | " + " | ".join(cells) + f" | {met} |")
    lines += ["", "Accuracy per level, min-max over seeds (long / short / auto):", ""]
    evals = {d: load_evals(d) for d in dirs}
    for name, (summary, _) in next(iter(evals.values())).items():
        cells = []
        for level in [str(d) for d in summary["difficulties"]] + ["all"]:
            parts = []
            for mode in ("long", "short", "auto"):
                vals = [100 * evals[d][name][0]["modes"][mode][level]["accuracy"] for d in dirs]
                parts.append(f"{min(vals):.1f}-{max(vals):.1f}")
            cells.append(f"L{level} " + " / ".join(parts))
        lines.append(f"- {name}: " + "; ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    print(main([Path(a) for a in sys.argv[1:]]))
