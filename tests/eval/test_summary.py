"""Unit tests of the pure eval aggregation (no model, no engine)."""

from __future__ import annotations

import pytest

from megatron_autothink.eval.runner import parse_modes
from megatron_autothink.eval.summary import (
    EvalRecord,
    format_markdown,
    goal_checks,
    metric_table,
    summarize,
)

MODES = ("auto", "long", "short")


def _rec(i: int, diff: int, mode: str, correct: bool, thinking: bool, n: int) -> EvalRecord:
    return EvalRecord(f"s{i}", diff, mode, "x", correct, thinking, n)


@pytest.fixture
def records() -> list[EvalRecord]:
    # Two easy (1) and two hard (5) prompts, three modes each.
    rs = []
    for i, diff in enumerate((1, 1, 5, 5)):
        hard = diff == 5
        rs.append(_rec(i, diff, "short", not hard, False, 5))
        rs.append(_rec(i, diff, "long", True, True, 30))
        rs.append(_rec(i, diff, "auto", True, hard, 30 if hard else 6))
    return rs


def test_summarize_cells(records: list[EvalRecord]) -> None:
    s = summarize(records)
    assert s["difficulties"] == [1, 5]
    assert s["num_samples"] == 4
    assert list(s["modes"]["auto"]) == ["1", "5", "all"]
    assert s["modes"]["short"]["5"] == {
        "n": 2,
        "accuracy": 0.0,
        "think_rate": 0.0,
        "mean_tokens": 5.0,
    }
    assert s["modes"]["auto"]["all"]["think_rate"] == 0.5
    assert s["modes"]["auto"]["all"]["mean_tokens"] == 18.0


def test_difficulty_order_is_numeric() -> None:
    s = summarize([_rec(0, 10, "auto", True, False, 1), _rec(1, 2, "auto", True, False, 1)])
    assert list(s["modes"]["auto"]) == ["2", "10", "all"]


def test_metric_table(records: list[EvalRecord]) -> None:
    t = metric_table(summarize(records), "accuracy")
    assert t["short"] == {"1": 1.0, "5": 0.0, "all": 0.5}


def test_goal_checks_met(records: list[EvalRecord]) -> None:
    g = goal_checks(summarize(records))
    assert g["think_rate_hardest"] == 1.0
    assert g["think_rate_easiest"] == 0.0
    assert g["max_acc_gap"] == 0.0
    assert g["easy_length_ratio"] == pytest.approx(6 / 5)
    assert all(g["goals_met"].values())


def test_goal_checks_missed() -> None:
    rs = [
        _rec(0, 1, "auto", False, True, 40),
        _rec(0, 1, "short", True, False, 4),
        _rec(1, 3, "auto", False, False, 4),
        _rec(1, 3, "long", True, True, 40),
        _rec(1, 3, "short", False, False, 4),
        _rec(0, 1, "long", False, True, 40),
    ]
    g = goal_checks(summarize(rs))
    assert g["max_acc_gap"] == 1.0
    assert g["easy_length_ratio"] == 10.0
    assert not any(g["goals_met"].values())


def test_acc_gap_of_a_failing_model_is_not_meaningful() -> None:
    rs = [_rec(i, d, m, False, m == "long", 5) for i, d in enumerate((1, 5)) for m in MODES]
    g = goal_checks(summarize(rs))
    assert g["max_acc_gap"] == 0.0  # 0 % everywhere: no gap, and no evidence either
    assert g["goals_met"]["acc_gap<=0.02"].startswith("not meaningful")


def test_goal_checks_without_auto() -> None:
    g = goal_checks(summarize([_rec(0, 1, "short", True, False, 4)]))
    assert g["think_rate_hardest"] is None and "goals_met" not in g


def test_markdown_has_every_cell(records: list[EvalRecord]) -> None:
    md = format_markdown(summarize(records), "t")
    rows = [line for line in md.splitlines() if line.startswith("| ") and "mode" not in line]
    assert len(rows) == 3 * 3  # modes x (2 difficulties + all)
    assert rows[0].startswith("| auto | 1 |")


def test_parse_modes() -> None:
    assert parse_modes("auto, short") == ["auto", "short"]
    with pytest.raises(ValueError):
        parse_modes("auto,medium")
    with pytest.raises(ValueError):
        parse_modes(",")


def test_records_count_the_whole_turn_and_use_the_eval_temperature() -> None:
    """Issue #18 defects 7 and 9: short mode's prefilled empty think block counts exactly as
    auto mode's self-written one, and eval samples at the temperature it is given."""
    from megatron_autothink.data.batch import PromptSample
    from megatron_autothink.eval.runner import generate_records
    from tests.rollout.harness import CharTokenizer, ScriptedEngine

    block = "<think>\n\n</think>\n\n"  # 19 tokens (one per character)
    engine = ScriptedEngine({"eval-0-auto": block + "\\boxed{4}", "eval-0-short": "\\boxed{4}"})
    prompt = PromptSample(id="q", prompt="2+2?", prompt_ids=[1, 2], vllm_prompt="2+2?", answer="4")
    records = generate_records(
        engine, [prompt], ["auto", "short"], CharTokenizer(), max_new_tokens=32, temperature=0.6
    )
    assert [(r.mode, r.num_tokens) for r in records] == [("auto", 28), ("short", 28)]  # 19 + 9
    assert [r.response for r in records] == [block + "\\boxed{4}"] * 2
    ((_, sampling),) = engine.calls
    assert sampling.temperature == 0.6 and sampling.seed == 0


def test_eval_temperature_comes_from_the_run() -> None:
    from megatron_autothink.config import load_config
    from megatron_autothink.eval.runner import eval_temperature

    run = load_config("vl_rethinker_7b")
    assert run.rollout.eval_temperature == 0.6  # the recipe's value, not the default 0
    assert eval_temperature(None, run) == 0.6
    assert eval_temperature(0.3, run) == 0.3
    assert eval_temperature(None, None) == 0.0
