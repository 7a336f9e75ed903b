"""Tests for megatron_autothink.rl.rethinking."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from megatron_autothink.rl.rethinking import (
    TRIGGER_DOUBLE_CHECK,
    TRIGGER_MISTAKE,
    TRIGGER_SEEM_RIGHT,
    TRIGGER_WAIT,
    RethinkPlan,
    accept_rethink,
    plan_rethink,
    truncate_before_conclusion,
)

TEXT = "Area = 6 * 7.\n\nThat is 42.\n\nSo the answer is \\boxed{42}."


def _plan(rng: random.Random, **kw: Any) -> RethinkPlan:
    args: dict[str, Any] = {
        "num_tokens": 100,
        "max_tokens": 4096,
        "finished": True,
        "correct": True,
        "group_accuracy": 0.5,
    }
    return plan_rethink(TEXT, rng=rng, **{**args, **kw})


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"finished": False}, "no_eos"),
        ({"num_tokens": 3073}, "low_budget"),  # 4096 - 3073 = 1023 < 1024
        ({"correct": False, "group_accuracy": 0.75}, "easy_group_incorrect"),
        ({"drop_prob": 1.0}, "dropped"),
    ],
)
def test_ineligible_reasons(kw: dict[str, object], reason: str) -> None:
    p = _plan(random.Random(0), **kw)
    assert not p.eligible and p.reason == reason and p.trigger == "" and p.prefix == TEXT


def test_eligibility_boundaries() -> None:
    assert _plan(random.Random(0), num_tokens=3072, drop_prob=0.0).eligible  # exactly 1024 left
    # Wrong answers stay eligible at accuracy exactly 0.7, and always in hard groups.
    assert _plan(random.Random(0), correct=False, group_accuracy=0.7, drop_prob=0.0).eligible
    # Correct answers are eligible even in saturated groups.
    assert _plan(random.Random(0), group_accuracy=1.0, drop_prob=0.0).eligible


def test_deterministic_given_rng() -> None:
    a = [_plan(random.Random(s)) for s in range(20)]
    b = [_plan(random.Random(s)) for s in range(20)]
    assert a == b


def test_recipe_probabilities() -> None:
    rng = random.Random(1234)
    n = 20_000
    correct_plans = [_plan(rng) for _ in range(n)]
    wrong_plans = [_plan(rng, correct=False, group_accuracy=0.2) for _ in range(n)]
    for plans, specific in ((correct_plans, TRIGGER_DOUBLE_CHECK), (wrong_plans, TRIGGER_MISTAKE)):
        kept = [p for p in plans if p.eligible]
        assert abs(1 - len(kept) / n - 0.35) < 0.015  # drop p = 0.35
        assert abs(sum(p.truncated for p in kept) / len(kept) - 0.5) < 0.02
        c = Counter(p.trigger for p in kept)
        m = len(kept)
        assert abs(c[TRIGGER_WAIT] / m - 0.5 * 0.4) < 0.02
        assert abs(c[TRIGGER_SEEM_RIGHT] / m - 0.5 * 0.6) < 0.02
        assert abs(c[specific] / m - 0.5) < 0.02
        assert set(c) == {TRIGGER_WAIT, TRIGGER_SEEM_RIGHT, specific}


def test_plan_fields() -> None:
    p = _plan(
        random.Random(0),
        drop_prob=0.0,
        truncate_prob=1.0,
        generic_trigger_prob=0.0,
        num_tokens=3000,
    )
    assert p.truncated and p.prefix == "Area = 6 * 7.\n\nThat is 42."
    assert p.continuation_prompt == "Area = 6 * 7.\n\nThat is 42." + TRIGGER_DOUBLE_CHECK
    assert p.max_new_tokens == 1024 and p.temperature == 0.9
    p = _plan(
        random.Random(0),
        drop_prob=0.0,
        truncate_prob=0.0,
        generic_trigger_prob=1.0,
        plain_wait_prob=1.0,
        max_tokens=10_000,
        max_continuation_tokens=2048,
    )
    assert not p.truncated and p.prefix == TEXT and p.trigger == TRIGGER_WAIT
    assert p.max_new_tokens == 2048


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (TEXT, "Area = 6 * 7.\n\nThat is 42."),
        ("a\n\nb\n\nWait, maybe c.\n\nFinal answer: c", "a\n\nb"),
        ("Compute.\n\nThus x = \\boxed{3}", "Compute."),
        ("One line answer is 5", "One line answer is 5"),  # cut would leave nothing
        # The only "answer" line is the first one: cutting would leave nothing, keep all.
        ("The answer is?\n\nWork: 2+2.\n\nResult 4", "The answer is?\n\nWork: 2+2.\n\nResult 4"),
        ("no conclusion here", "no conclusion here"),
    ],
)
def test_truncate_before_conclusion(text: str, expected: str) -> None:
    assert truncate_before_conclusion(text) == expected


@pytest.mark.parametrize(
    ("text", "tokens", "correct", "kept", "reason"),
    [
        ("fine", 30, True, 0, "accepted"),
        ("fine", 1024, True, 1, "accepted"),
        ("fine", 29, True, 0, "too_short"),
        ("fine", 1025, True, 0, "too_long"),
        ("fine", 100, False, 0, "incorrect"),
        ("wait wait wait", 100, True, 0, "accepted"),  # 3 + trigger = 4
        ("wait wait wait WAIT", 100, True, 0, "too_many_waits"),
        ("fine", 100, True, 2, "prompt_quota"),
    ],
)
def test_accept_rethink(text: str, tokens: int, correct: bool, kept: int, reason: str) -> None:
    v = accept_rethink(text, tokens, correct, kept)
    assert v.reason == reason and v.accept is (reason == "accepted")
