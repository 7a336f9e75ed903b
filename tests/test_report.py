"""The demo report's goal table on hand-made eval summaries: each of #19's goals can fail."""

from __future__ import annotations

from typing import Any

from megatron_autothink.report import demo_goals, format_goals


def _cell(acc: float, think: float, tokens: float, n: int = 200) -> dict[str, Any]:
    return {"n": n, "accuracy": acc, "think_rate": think, "mean_tokens": tokens}


def _summary(auto: dict[str, tuple[float, float, float]], long_think: float = 1.0) -> dict:
    """Levels 1 and 5: long 95 / 70 %, short 95 / 10 %, auto as given (acc, think, tokens)."""
    modes = {
        "long": {"1": _cell(0.95, long_think, 34), "5": _cell(0.7, long_think, 68)},
        "short": {"1": _cell(0.95, 0.0, 16), "5": _cell(0.1, 0.0, 17)},
        "auto": {k: _cell(*v) for k, v in auto.items()},
    }
    for m in modes.values():
        m["all"] = _cell(sum(c["accuracy"] for c in m.values()) / 2, 0.5, 30, 400)
    return {"difficulties": [1, 5], "modes": modes}


def _goals(bpo_auto: dict[str, tuple[float, float, float]], **kw: Any) -> dict[str, bool | None]:
    atrophied = _summary({"1": (0.95, 0.0, 16), "5": (0.1, 0.0, 17)})
    evals = {
        "anneal": (atrophied, None),
        "curate": (atrophied, None),
        "BPO": (_summary(bpo_auto, **kw), None),
    }
    return {g.target: g.met for g in demo_goals(evals, {})}


def test_the_switch_meets_goal_3() -> None:
    met = _goals({"1": (0.95, 0.0, 16), "5": (0.7, 1.0, 68)})
    assert all(met.values()), met


def test_thinking_everywhere_fails_the_easy_level_and_its_cost() -> None:
    """What plain GRPO does here: auto = long on every level. Accuracy goals hold, the switch's
    do not."""
    met = _goals({"1": (0.95, 1.0, 34), "5": (0.7, 1.0, 68)})
    assert met["auto thinks on >= 90 % of the hardest level"]
    assert met["auto thinks on <= 20 % of the easiest level"] is False
    assert met["auto's mean output on the easiest level <= 1.5x short mode's"] is False


def test_a_lost_format_fails_the_accuracy_gap_and_long_mode_not_forced_fails_goal_0() -> None:
    met = _goals({"1": (0.95, 0.0, 16), "5": (0.3, 1.0, 40)}, long_think=0.98)
    gap = (
        "auto within 3 points of the better forced mode on every level (>= 200 questions per level)"
    )
    assert met[gap] is False
    assert (
        met["long mode thinks on 100 %, short on 0 % of every level (eval and BPO rollouts)"]
        is False
    )
    table = format_goals(
        demo_goals({"anneal": (_summary({"1": (0.9, 0, 16), "5": (0.1, 0, 17)}), None)}, {})
    )
    assert table.count("\n") == 4 and "| 2 |" in table  # header, rule, goals 0, 1 and 2


def test_goal_0_counts_forced_rollouts_one_by_one() -> None:
    """One empty, unfinished thinking-forced rollout in 64 fails goal 0 (a per-step rate would
    round it to 100 %) and is named as such."""
    s = _summary({"1": (0.95, 0.0, 16), "5": (0.1, 0.0, 17)})
    ok = {"mode": "long", "thinking": True, "finished": True, "text": "<think>\nx</think>\n\n4"}
    empty = {"mode": "long", "thinking": False, "finished": False, "text": "<think>\n"}
    short = {"mode": "short", "thinking": False, "finished": True, "text": "4"}
    (g0,) = [g for g in demo_goals({"anneal": (s, None)}, {}, [ok] * 31 + [empty] + [short] * 32)
             if g.goal == "0"]  # fmt: skip
    assert g0.met is False
    assert "31 of 32 long think (1 came back empty and unfinished), 0 of 32 short" in g0.measured
    (g0,) = [g for g in demo_goals({"anneal": (s, None)}, {}, [ok] * 32 + [short] * 32)
             if g.goal == "0"]  # fmt: skip
    assert g0.met is True
