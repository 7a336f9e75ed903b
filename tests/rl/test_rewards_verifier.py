"""The time-limited math-verify worker (megatron_autothink.rl.rewards.verifier)."""

from __future__ import annotations

import threading
import time

import pytest

from megatron_autothink.rl.rewards import verifier as V


def _hang_on_marker(pred: str, gold: str, inner_timeout_s: int) -> tuple[str, bool]:
    """Worker target that hangs (like an uninterruptible C loop) when asked about 'HANG'."""
    if "HANG" in pred:
        time.sleep(120)
    return V._math_verify_target(pred, gold, inner_timeout_s)


def _broken_target(pred: str, gold: str, inner_timeout_s: int) -> tuple[str, bool]:
    """Worker target that fails during the worker's warm-up (like a missing dependency)."""
    raise ImportError("math_verify not installed")


@pytest.mark.parametrize(
    ("pred", "gold", "correct"),
    [
        (r"\frac{1}{2}", "0.5", True),
        ("1/2", r"\frac12", True),
        (r"2\sqrt{2}", r"\sqrt{8}", True),
        ("3", "4", False),
        ("x = 5", "5", True),
        ("10%", "10\\%", True),
    ],
)
def test_verify_math_answer(verifier: V.MathVerifier, pred: str, gold: str, correct: bool) -> None:
    assert V.verify_math_answer(pred, gold, verifier=verifier).correct is correct


def test_no_answer_and_unparseable_gold(verifier: V.MathVerifier) -> None:
    assert V.verify_math_answer(None, "3", verifier=verifier) == V.MathVerdict(False, "no_answer")
    assert V.verify_math_answer("  ", "3", verifier=verifier).status == "no_answer"
    # math-verify cannot turn this into an expression; correct comes from string comparison.
    assert V.verify_math_answer("3", r"\sqrt{}", verifier=verifier) == V.MathVerdict(
        False, "gold_unparseable"
    )


def test_text_gold_falls_back_to_string_match(verifier: V.MathVerifier) -> None:
    assert V.verify_math_answer("red", "red", verifier=verifier).correct
    assert not V.verify_math_answer("blue", "red", verifier=verifier).correct


def test_hard_time_limit_kills_and_recovers() -> None:
    v = V.MathVerifier(timeout_s=0.5, inner_timeout_s=1, target=_hang_on_marker)
    try:
        v.warm_up()
        start = time.perf_counter()
        verdict = v.verify("HANG", "1")
        elapsed = time.perf_counter() - start
        assert verdict == V.MathVerdict(correct=False, status="timeout")
        assert elapsed < 2.0
        assert v.num_restarts == 1
        # A fresh worker is started transparently on the next call; its start-up is not
        # charged against the 0.5 s answer limit.
        assert v.verify(r"\frac{4}{2}", "2") == V.MathVerdict(correct=True, status="ok")
        assert v.num_restarts == 1
    finally:
        v.close()


def test_worker_that_cannot_start_fails_loudly() -> None:
    v = V.MathVerifier(timeout_s=1.0, target=_broken_target, startup_timeout_s=30.0)
    with pytest.raises(RuntimeError, match="failed to start"):
        v.verify("1", "2")
    v.close()


def test_pathological_latex_returns_within_limit() -> None:
    v = V.MathVerifier(timeout_s=2.5, inner_timeout_s=1)
    try:
        v.warm_up()
        cases = [
            "(" * 40 + "x" + ")" * 40,  # slow for math-verify's LaTeX parser
            "9^{9^{9^{9^{9}}}}",  # astronomically large integer
            r"\frac{" * 200 + "1" + "}{2}" * 200,
            "1+" * 20_000 + "1",
        ]
        for pred in cases:
            start = time.perf_counter()
            verdict = v.verify(pred, "3")
            assert time.perf_counter() - start < 2.5 + 1.0, pred[:40]
            assert not verdict.correct
    finally:
        v.close()


def test_verifier_works_off_main_thread(verifier: V.MathVerifier) -> None:
    results: list[V.MathVerdict] = []
    t = threading.Thread(target=lambda: results.append(verifier.verify(r"\frac{2}{4}", "0.5")))
    t.start()
    t.join(timeout=30)
    assert results == [V.MathVerdict(correct=True, status="ok")]
