"""Where forced-thinking answers of the depth family go wrong: reading, a product, or a sum.

Usage: python benchmarks/study/trace_errors.py EVAL_DIR [DEPTH_LOW_DIGIT [any] [split]]
(``any``: data prepared with ``--depth-any-letter``, as runs t1, t2, c1, c2 of docs/demo_study.md;
``split``: with ``--depth-split-sum``)
Reads EVAL_DIR/samples.jsonl (long mode), regenerates each test problem from its id (dataset
seed 0) and prints, per level, the share of traces whose first wrong part is the reading line,
a product line or a sum line (a line is wrong when its result does not follow from its operands,
or its operands are not the digits / earlier results), and the accuracy.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from megatron_autothink.data.digits import DigitsConfig, make_problem

LINE = re.compile(r"^([a-d*+]+)=(\d+)([*+])(\d+)=(?:(\d+)\+(\d+)=)?(\d+)$")


def first_error(response: str, truth: tuple[int, ...], expected: tuple[str, ...]) -> str | None:
    lines = response.split("</think>")[0].removeprefix("<think>\n").strip().split("\n")
    if not lines or lines[0] != expected[0]:
        return "read"
    for got, want in zip(lines[1:], expected[1:], strict=False):
        if got == want:
            continue
        m = LINE.match(got)
        if m is None:
            return "format"
        x, op, y, z = int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(7))
        if m.group(5) is not None:  # split sum x+y=x'+y'=z: both forms must equal z
            x2, y2 = int(m.group(5)), int(m.group(6))
            if x2 + y2 != z or x + y != z:
                return "sum"
        if (x * y if op == "*" else x + y) != z:
            return "product" if op == "*" else "sum"
        return "operands"
    if len(lines) != len(expected):
        return "length"
    return None


def main(path: Path, low: int, any_letter: bool = False, split_sum: bool = False) -> None:
    cfg = DigitsConfig(
        family="depth", depth_low_digit=low, depth_any_letter=any_letter, depth_split_sum=split_sum
    )
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    for line in (path / "samples.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["mode"] != "long":
            continue
        p = make_problem(0, "test", int(r["id"].rsplit("-", 1)[1]), config=cfg)
        err = first_error(r["response"], p.digits, p.steps)
        counts[p.difficulty][err or ("ok" if r["correct"] else "answer")] += 1
    print("| level | n | correct | read | product | sum | other |")
    print("|---|---|---|---|---|---|---|")
    for lv in sorted(counts):
        c, n = counts[lv], sum(counts[lv].values())
        other = n - sum(c[k] for k in ("ok", "read", "product", "sum"))
        print(
            f"| {lv} | {n} | {100 * c['ok'] / n:.1f} | {100 * c['read'] / n:.1f} | "
            f"{100 * c['product'] / n:.1f} | {100 * c['sum'] / n:.1f} | {100 * other / n:.1f} |"
        )


if __name__ == "__main__":
    low = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    main(Path(sys.argv[1]), low, "any" in sys.argv[3:], "split" in sys.argv[3:])
