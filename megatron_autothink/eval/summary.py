"""Pure aggregation of per-sample eval records into the R-4B style summary table.

The table is what R-4B reports per benchmark (its Fig. 5 and Fig. 7), with our difficulty levels
standing in for benchmarks: accuracy, thinking trigger rate (share of answers with a non-empty
think block) and mean output tokens, per thinking mode and per difficulty, plus an ``all`` row.
Output tokens are whole assistant turns, the mode's prefill included: R-4B compares auto mode's
length with the forced modes', and auto mode writes the think block short mode gets prefilled.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

ALL = "all"
"""Key of the row that pools every difficulty."""


@dataclass(frozen=True, slots=True)
class EvalRecord:
    """One scored greedy answer (one line of ``samples.jsonl``)."""

    id: str
    difficulty: int
    mode: str  # "auto" | "long" | "short"
    response: str  # prefill + generated text (what the reward saw)
    correct: bool
    thinking: bool  # non-empty think block (rl.rewards.is_thinking)
    num_tokens: int  # the whole assistant turn: prefill + generated tokens (modes compare)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(records: Iterable[EvalRecord]) -> dict[str, Any]:
    """Accuracy, thinking rate and mean output tokens per mode per difficulty.

    Returns:
        ``{"modes": {mode: {difficulty_key: {"n", "accuracy", "think_rate", "mean_tokens"}}},
        "difficulties": [..], "num_samples": N}``; difficulty keys are strings (JSON) and
        include ``"all"``.

    Example:
        >>> r = [EvalRecord("a", 1, "auto", "", True, False, 4),
        ...      EvalRecord("b", 2, "auto", "", False, True, 10)]
        >>> s = summarize(r)
        >>> s["modes"]["auto"]["all"]
        {'n': 2, 'accuracy': 0.5, 'think_rate': 0.5, 'mean_tokens': 7.0}
        >>> s["difficulties"], s["num_samples"]
        ([1, 2], 2)
    """
    cells: dict[str, dict[str, list[EvalRecord]]] = defaultdict(lambda: defaultdict(list))
    ids: set[str] = set()
    diffs: set[int] = set()
    for r in records:
        cells[r.mode][str(r.difficulty)].append(r)
        cells[r.mode][ALL].append(r)
        diffs.add(r.difficulty)
        ids.add(r.id)
    modes = {
        mode: {key: _cell(rs) for key, rs in sorted(by_diff.items(), key=_diff_order)}
        for mode, by_diff in cells.items()
    }
    return {"modes": modes, "difficulties": sorted(diffs), "num_samples": len(ids)}


def _diff_order(item: tuple[str, Any]) -> tuple[int, int]:
    """Numeric difficulties first, ``all`` last."""
    key = item[0]
    return (1, 0) if key == ALL else (0, int(key))


def _cell(rs: Sequence[EvalRecord]) -> dict[str, float | int]:
    n = len(rs)
    return {
        "n": n,
        "accuracy": sum(r.correct for r in rs) / n,
        "think_rate": sum(r.thinking for r in rs) / n,
        "mean_tokens": sum(r.num_tokens for r in rs) / n,
    }


def metric_table(summary: dict[str, Any], metric: str) -> dict[str, dict[str, float]]:
    """``{mode: {difficulty_key: value}}`` of one metric (a view for plots and checks)."""
    return {
        mode: {k: float(cell[metric]) for k, cell in by_diff.items()}
        for mode, by_diff in summary["modes"].items()
    }


def format_markdown(summary: dict[str, Any], title: str = "Eval summary") -> str:
    """The summary as a markdown table: one row per mode x difficulty.

    Example:
        >>> s = summarize([EvalRecord("a", 1, "short", "", True, False, 4)])
        >>> print(format_markdown(s, "t"))  # doctest: +NORMALIZE_WHITESPACE
        ## t
        <BLANKLINE>
        | mode | difficulty | n | accuracy | think rate | mean tokens |
        |---|---|---|---|---|---|
        | short | 1 | 1 | 100.0% | 0.0% | 4.0 |
        | short | all | 1 | 100.0% | 0.0% | 4.0 |
        <BLANKLINE>
    """
    lines = [
        f"## {title}",
        "",
        "| mode | difficulty | n | accuracy | think rate | mean tokens |",
        "|---|---|---|---|---|---|",
    ]
    for mode in _mode_order(summary["modes"]):
        for key, c in summary["modes"][mode].items():
            lines.append(
                f"| {mode} | {key} | {c['n']} | {100 * c['accuracy']:.1f}% | "
                f"{100 * c['think_rate']:.1f}% | {c['mean_tokens']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def _mode_order(modes: Iterable[str]) -> list[str]:
    known = ["auto", "long", "short"]
    ms = list(modes)
    return [m for m in known if m in ms] + sorted(m for m in ms if m not in known)


ACC_GAP_FLOOR = 0.2
"""Below this accuracy of the better forced mode (all levels) the accuracy-gap goal is reported
as not meaningful instead of true/false."""


def goal_checks(summary: dict[str, Any]) -> dict[str, Any]:
    """The R-4B effect targets measured on one summary (auto mode vs the forced modes).

    * ``think_rate_hardest`` (goal >= 0.8) and ``think_rate_easiest`` (goal <= 0.2) in auto mode;
    * ``max_acc_gap``: largest (better of long/short) - auto accuracy over difficulties (goal
      <= 0.02); in ``goals_met`` a string saying why instead of true/false when the better
      forced mode is below :data:`ACC_GAP_FLOOR` overall accuracy (a gap between two failing
      modes proves nothing);
    * ``easy_length_ratio``: auto / short mean tokens on the easiest level (goal <= 1.5).

    Missing modes give ``None`` for the checks that need them.

    Example:
        >>> rs = [EvalRecord("a", 1, "auto", "", True, False, 6),
        ...       EvalRecord("a", 1, "short", "", True, False, 4),
        ...       EvalRecord("a", 1, "long", "", False, True, 20)]
        >>> g = goal_checks(summarize(rs))
        >>> g["think_rate_easiest"], g["max_acc_gap"], g["easy_length_ratio"]
        (0.0, 0.0, 1.5)
    """
    modes = summary["modes"]
    diffs = [str(d) for d in summary["difficulties"]]
    out: dict[str, Any] = {
        "think_rate_hardest": None,
        "think_rate_easiest": None,
        "max_acc_gap": None,
        "easy_length_ratio": None,
    }
    if not diffs or "auto" not in modes:
        return out
    auto = modes["auto"]
    # Levels auto mode answered (a mode may miss a level on a small or --limit'ed eval).
    diffs = [d for d in diffs if d in auto]
    if not diffs:
        return out
    easy, hard = diffs[0], diffs[-1]
    out["think_rate_hardest"] = auto[hard]["think_rate"]
    out["think_rate_easiest"] = auto[easy]["think_rate"]
    forced = [modes[m] for m in ("long", "short") if m in modes]
    gaps = [
        max(f[d]["accuracy"] for f in forced if d in f) - auto[d]["accuracy"]
        for d in diffs
        if any(d in f for f in forced)
    ]
    if gaps:
        out["max_acc_gap"] = max(gaps)
    short_easy = modes.get("short", {}).get(easy)
    if short_easy and short_easy["mean_tokens"] > 0:
        out["easy_length_ratio"] = auto[easy]["mean_tokens"] / short_easy["mean_tokens"]
    # A gap between two near-zero accuracies says nothing about auto mode: a model that solves
    # nothing would "meet" the target. Below the floor the check reports why it is not judged.
    best_forced = max((f["all"]["accuracy"] for f in forced if "all" in f), default=None)
    gap_ok: bool | str = out["max_acc_gap"] is not None and out["max_acc_gap"] <= 0.02
    if best_forced is not None and best_forced < ACC_GAP_FLOOR:
        gap_ok = f"not meaningful: best forced-mode accuracy {best_forced:.2f} < {ACC_GAP_FLOOR}"
    out["goals_met"] = {
        "think_hardest>=0.8": out["think_rate_hardest"] >= 0.8,
        "think_easiest<=0.2": out["think_rate_easiest"] <= 0.2,
        "acc_gap<=0.02": gap_ok,
        "easy_len<=1.5x_short": out["easy_length_ratio"] is not None
        and out["easy_length_ratio"] <= 1.5,
    }
    return out
