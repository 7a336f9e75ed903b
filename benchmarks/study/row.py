"""One markdown row per run of the #19 study: accuracy per level in each mode, the L5 ratio.

Usage: python benchmarks/study/row.py RUN_DIR [LABEL]
Reads RUN_DIR/eval/summary.json (``autothink eval --modes auto,long,short``; long and short are
forced by the engine rule, docs/rl.md "Forced modes"). Prints
``| label | L1 long/short/auto | ... | L5 | L5 long/short | auto think rate L1 / L5 | n L5 |``
(modes the eval did not run are left out of the cells). With RUN_DIR/eval_t1/summary.json
(``autothink eval --modes auto --temperature 1.0 --out RUN_DIR/eval_t1``) a last cell gives auto
mode's *sampled* thinking rate per level, an estimate of the policy's P(think) that greedy
decoding hides (greedy thinks on 0 % or 100 % of a level as P(think) crosses 0.5).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(run: Path, label: str) -> str:
    modes = json.loads((run / "eval" / "summary.json").read_text())["modes"]
    order = [m for m in ("long", "short", "auto") if m in modes]
    first = modes[order[0]]
    levels = sorted((k for k in first if k != "all"), key=int)
    cells = [" / ".join(f"{100 * modes[m][lv]['accuracy']:.1f}" for m in order) for lv in levels]
    ratio = "-"
    if "long" in modes and "short" in modes:
        lo5, sh5 = modes["long"][levels[-1]]["accuracy"], modes["short"][levels[-1]]["accuracy"]
        ratio = f"{lo5 / sh5:.1f}x" if sh5 > 0 else "inf"
    think = "-"
    if "auto" in modes:
        a = modes["auto"]
        think = f"{100 * a[levels[0]]['think_rate']:.0f} / {100 * a[levels[-1]]['think_rate']:.0f}"
    n = first[levels[-1]]["n"]
    out = f"| {label} | " + " | ".join(cells) + f" | {ratio} | {think} | {n} |"
    sampled = run / "eval_t1" / "summary.json"
    if sampled.exists():
        a = json.loads(sampled.read_text())["modes"]["auto"]
        out += " " + " / ".join(f"{100 * a[lv]['think_rate']:.0f}" for lv in levels) + " |"
    return out


if __name__ == "__main__":
    p = Path(sys.argv[1])
    print(row(p, sys.argv[2] if len(sys.argv) > 2 else p.name))
