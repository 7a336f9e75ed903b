"""Tests for megatron_autothink.rl.rewards."""

from __future__ import annotations

import threading
import time

import pytest

from megatron_autothink.rl import rewards as R


def _hang_on_marker(pred: str, gold: str, inner_timeout_s: int) -> tuple[str, bool]:
    """Worker target that hangs (like an uninterruptible C loop) when asked about 'HANG'."""
    if "HANG" in pred:
        time.sleep(120)
    return R._math_verify_target(pred, gold, inner_timeout_s)


def _broken_target(pred: str, gold: str, inner_timeout_s: int) -> tuple[str, bool]:
    """Worker target that fails during the worker's warm-up (like a missing dependency)."""
    raise ImportError("math_verify not installed")


@pytest.fixture(scope="module")
def verifier():
    v = R.MathVerifier(timeout_s=10.0, inner_timeout_s=2)
    v.warm_up()
    yield v
    v.close()


# ---------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{a}{b^{2}}}", r"\frac{a}{b^{2}}"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed {7}", "7"),
        (r"\boxed{5} and a cut-off \boxed{\frac{1}{", "5"),
        (r"only \boxed{", None),
        ("nothing here", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert R.extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"<answer>\boxed{3}</answer> \boxed{4}", "4"),  # box wins over tags
        ("<answer>1</answer> <answer> 2 </answer>", "2"),  # last tag
        ("blah\nAnswer: 12 apples\nmore", "12 apples"),
        ("**Final Answer:** $x=1$", "$x=1$"),
        ("Answer:", None),  # empty answer line
        ("no indicator 42", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert R.extract_answer(text) == expected


def test_extract_huge_response_is_fast() -> None:
    text = ("{" * 50_000) + "x" + r" \boxed{" + ("1+" * 200_000) + "1}"
    start = time.perf_counter()
    out = R.extract_answer(text)
    assert out is not None and out.endswith("+1")
    assert time.perf_counter() - start < 2.0


def test_count_waits() -> None:
    assert R.count_waits("Wait, wait! WAIT... awaiting waits waited") == 3


# ---------------------------------------------------------------------------------------------
# math accuracy + time limits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "gt", "expected"),
    [
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{1/2}", r"\frac12", 1.0),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
        (r"\boxed{3}", "4", 0.0),
        (r"<answer>x = 5</answer>", "5", 1.0),
        ("Answer: 10%", "10\\%", 1.0),
        ("I do not know.", "3", 0.0),
        ("", "3", 0.0),
    ],
)
def test_math_accuracy_reward(
    verifier: R.MathVerifier, response: str, gt: str, expected: float
) -> None:
    assert R.math_accuracy_reward(response, gt, verifier=verifier) == expected


def test_math_accuracy_fallback_to_full_response(verifier: R.MathVerifier) -> None:
    resp = "The total is $7$."
    assert R.math_accuracy_reward(resp, "7", verifier=verifier) == 1.0
    assert R.math_accuracy_reward(resp, "7", verifier=verifier, fallback_to_response=False) == 0.0


def test_unparseable_ground_truth_policy(verifier: R.MathVerifier) -> None:
    gold = r"\sqrt{}"  # math-verify cannot turn this into an expression
    verdict = R.verify_math_answer("3", gold, verifier=verifier)
    assert verdict.status == "gold_unparseable"
    resp = r"\boxed{3}"
    assert R.math_accuracy_reward(resp, gold, verifier=verifier) == 0.0  # string compare
    assert R.math_accuracy_reward(resp, gold, verifier=verifier, unparseable_gold_score=1.0) == 1.0
    assert R.math_accuracy_reward(resp, gold, verifier=verifier, unparseable_gold_score=0.0) == 0.0
    # LMM-R1's policy is the lmm_r1_reward default.
    assert R.lmm_r1_reward(resp, gold, verifier=verifier) == 1.0


def test_text_gold_falls_back_to_string_match(verifier: R.MathVerifier) -> None:
    assert R.verify_math_answer("red", "red", verifier=verifier).correct
    assert not R.verify_math_answer("blue", "red", verifier=verifier).correct


def test_hard_time_limit_kills_and_recovers() -> None:
    v = R.MathVerifier(timeout_s=0.5, inner_timeout_s=1, target=_hang_on_marker)
    try:
        v.warm_up()
        start = time.perf_counter()
        verdict = v.verify("HANG", "1")
        elapsed = time.perf_counter() - start
        assert verdict == R.MathVerdict(correct=False, status="timeout")
        assert elapsed < 2.0
        assert v.num_restarts == 1
        # A fresh worker is started transparently on the next call; its start-up is not
        # charged against the 0.5 s answer limit.
        assert v.verify(r"\frac{4}{2}", "2") == R.MathVerdict(correct=True, status="ok")
        assert v.num_restarts == 1
    finally:
        v.close()


def test_worker_that_cannot_start_fails_loudly() -> None:
    v = R.MathVerifier(timeout_s=1.0, target=_broken_target, startup_timeout_s=30.0)
    with pytest.raises(RuntimeError, match="failed to start"):
        v.verify("1", "2")
    v.close()


def test_pathological_latex_returns_within_limit() -> None:
    v = R.MathVerifier(timeout_s=2.5, inner_timeout_s=1)
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


def test_verifier_works_off_main_thread(verifier: R.MathVerifier) -> None:
    results: list[R.MathVerdict] = []
    t = threading.Thread(target=lambda: results.append(verifier.verify(r"\frac{2}{4}", "0.5")))
    t.start()
    t.join(timeout=30)
    assert results == [R.MathVerdict(correct=True, status="ok")]


# ---------------------------------------------------------------------------------------------
# multiple choice
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("The answer is B", "B"),
        ("the correct option is (D).", "D"),
        ("Answer: C) 12 cm", "C"),
        (r"so \boxed{E}", "E"),
        (r"\boxed{\text{(A)}}", "A"),
        ("<answer>B. 42</answer>", "B"),
        ("I compared A and B.\nThe answer is C.", "C"),
        ("A cat sat on the mat.", None),
        ("Answer: Because of symmetry", None),
        ("The answer is F", None),  # not an allowed choice with the default A-E
    ],
)
def test_extract_choice(response: str, letter: str | None) -> None:
    assert R.extract_choice(response) == letter


def test_multiple_choice_reward() -> None:
    assert R.multiple_choice_reward("Comparing options, the answer is (B).", "(B)") == 1.0
    assert R.multiple_choice_reward(r"\boxed{C}", "B") == 0.0
    assert R.multiple_choice_reward("no idea", "B") == 0.0
    assert R.multiple_choice_reward(r"\boxed{G}", "G") == 1.0  # widened up to the gold letter
    assert R.multiple_choice_reward(r"\boxed{G}", "G", choices="ABCD") == 0.0
    # Default A-E: a pronoun "I" is not read as option I (and "it is B" is too vague to trust).
    assert R.extract_choice("Answer: I think it is B") is None
    assert R.extract_choice("Answer: I think it is B", choices="ABCDEFGHIJK") == "I"
    assert R.is_choice_letter("B") and R.is_choice_letter("(B)") and not R.is_choice_letter("Bob")


# ---------------------------------------------------------------------------------------------
# R-4B format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "mode"),
    [
        ("<think>\nreason\n</think>\n\nB", "thinking"),
        ("<think>\nline1\n\nline2\n</think>\n\nthe answer is 4\n", "thinking"),
        ("<think>\n\n</think>\n\nB", "non_thinking"),
        ("<think>\n \n</think>\n\nB", "invalid"),  # blank but not the canonical empty block
        ("<think>\nreason\n</think>\n\n", "invalid"),  # missing answer
        ("<think>\n\n</think>\n\n  \n", "invalid"),  # blank answer
        ("<think>reason</think>B", "invalid"),  # wrong newlines
        ("<think>\nreason\n</think>\nB", "invalid"),  # single newline before answer
        ("x<think>\nreason\n</think>\n\nB", "invalid"),  # text before the block
        ("<think>\na\n</think>\n\n<think>\nb\n</think>\n\nB", "invalid"),  # two blocks
        ("<think>\nno end", "invalid"),
        ("B", "invalid"),
    ],
)
def test_think_mode(response: str, mode: str) -> None:
    assert R.think_mode(response) == mode
    assert R.think_format_reward(response, "") == (0.0 if mode == "invalid" else 1.0)


@pytest.mark.parametrize(
    ("response", "thinking"),
    [
        ("<think>\nreason\n</think>\n\nB", True),
        ("<think>\n\n</think>\n\nB", False),
        ("<think>\nstill thinking when the limit hit", True),
        ("<think>\n   ", False),
        ("plain answer", False),
    ],
)
def test_is_thinking(response: str, thinking: bool) -> None:
    assert R.is_thinking(response) is thinking


# ---------------------------------------------------------------------------------------------
# LMM-R1
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "ok"),
    [
        ("<think>a</think><answer>1</answer>", True),
        ("  <think>a\nb</think>\n<answer>1</answer>\n", True),
        ("<think>a</think>x<answer>1</answer>", False),  # text between blocks
        ("<think>a</think><answer>1</answer> trailing", False),
        ("<think><think>a</think><answer>1</answer>", False),
        ("<answer>1</answer><think>a</think>", False),
        ("<think>a</think>", False),
    ],
)
def test_lmm_r1_format(response: str, ok: bool) -> None:
    assert R.lmm_r1_format_ok(response) is ok


def test_lmm_r1_reward(verifier: R.MathVerifier) -> None:
    good = r"<think>3+4</think><answer>\boxed{7}</answer>"
    assert R.lmm_r1_reward(good, "7", verifier=verifier) == 1.5
    assert R.lmm_r1_reward(good, "8", verifier=verifier) == 0.5
    assert R.lmm_r1_reward(r"\boxed{7}", "7", verifier=verifier) == 1.0
    assert R.lmm_r1_reward("nothing", "7", verifier=verifier) == 0.0


# ---------------------------------------------------------------------------------------------
# VL-Rethinker
# ---------------------------------------------------------------------------------------------


def test_vl_rethinker_validity_rules() -> None:
    boxed = r"so \boxed{1}"
    assert R.vl_rethinker_validity(boxed, finished=True) == R.Validity(True, "")
    assert R.vl_rethinker_validity(boxed, finished=False).reason == "no_eos"
    assert R.vl_rethinker_validity("1", finished=True).reason == "no_box"
    assert R.vl_rethinker_validity("1", finished=True, require_box=False).valid
    five = "Wait. " * 5 + boxed
    six = "Wait. " * 6 + boxed
    assert R.vl_rethinker_validity(five, finished=True).valid
    assert R.vl_rethinker_validity(six, finished=True).reason == "too_many_waits"
    assert R.vl_rethinker_validity("awaiting " * 9 + boxed, finished=True).valid


def test_vl_rethinker_reward(verifier: R.MathVerifier) -> None:
    assert R.vl_rethinker_reward(r"\boxed{7}", "7", finished=True, verifier=verifier) == 1.0
    assert R.vl_rethinker_reward(r"\boxed{6}", "7", finished=True, verifier=verifier) == 0.0
    assert R.vl_rethinker_reward(r"\boxed{7}", "7", finished=False, verifier=verifier) == -0.1
    assert R.vl_rethinker_reward("7", "7", finished=True, verifier=verifier) == -0.1
    # Multiple choice detected from the ground truth.
    assert R.vl_rethinker_reward(r"\boxed{(C)}", "C", finished=True) == 1.0
    assert R.vl_rethinker_reward(r"\boxed{B}", "C", finished=True) == 0.0


# ---------------------------------------------------------------------------------------------
# Rubric
# ---------------------------------------------------------------------------------------------


def test_rubric_weights_and_components() -> None:
    rubric = R.Rubric(
        (
            R.RubricEntry("format", R.think_format_reward, 0.25),
            R.RubricEntry("mc", R.multiple_choice_reward, 1.0),
        )
    )
    s = rubric.score("<think>\nhmm\n</think>\n\nThe answer is B", "B")
    assert s.components == {"format": 1.0, "mc": 1.0}
    assert s.total == 1.25
    s = rubric.score("B", "C")
    assert s.components == {"format": 0.0, "mc": 0.0} and s.total == 0.0


def test_rubric_score_batch_with_meta() -> None:
    rubric = R.Rubric(
        (
            R.RubricEntry("vlr", R.vl_rethinker_reward, 1.0),
            R.RubricEntry("think", R.think_format_reward, 0.5),
        )
    )
    out = rubric.score_batch(
        [r"<think>\n\n</think>\n\n\boxed{A}", r"\boxed{A}", r"\boxed{B}"],
        ["A", "A", "A"],
        metas=[{"finished": True}, {"finished": False}, {"finished": True}],
    )
    assert out.components["vlr"] == [1.0, -0.1, 0.0]
    assert out.components["think"] == [0.0, 0.0, 0.0]  # "\n" is literal here, not a newline
    assert out.total == [1.0, -0.1, 0.0]
    shared = rubric.score_batch([r"\boxed{A}"], ["A"], finished=True)
    assert shared.total == [1.0]


def test_rubric_errors() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        R.Rubric((R.RubricEntry("a", R.think_format_reward), R.RubricEntry("a", R.lmm_r1_reward)))
    rubric = R.Rubric((R.RubricEntry("f", R.think_format_reward),))
    with pytest.raises(ValueError):
        rubric.score_batch(["a", "b"], ["x"])
    with pytest.raises(ValueError):
        rubric.score_batch(["a"], ["x"], metas=[{}, {}])
