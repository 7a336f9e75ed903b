"""Accuracy graders and format checks (megatron_autothink.rl.rewards.graders)."""

from __future__ import annotations

import pytest

from megatron_autothink.rl.rewards import graders as G
from megatron_autothink.rl.rewards.verifier import MathVerifier


@pytest.mark.parametrize(
    ("response", "gt", "correct"),
    [
        (r"\boxed{\frac{1}{2}}", "0.5", True),
        (r"\boxed{1/2}", r"\frac12", True),
        (r"\boxed{3}", "4", False),
        (r"<answer>x = 5</answer>", "5", True),
        ("Answer: 10%", "10\\%", True),
        ("I do not know.", "3", False),
        ("", "3", False),
    ],
)
def test_grade_math(verifier: MathVerifier, response: str, gt: str, correct: bool) -> None:
    assert G.grade_math(response, gt, verifier=verifier).correct is correct


def test_whole_text_is_parsed_only_when_asked(verifier: MathVerifier) -> None:
    # No box, no <answer>, no "Answer:": nothing to grade unless the recipe opts in (the
    # released LMM-R1 / VL-Rethinker code hands math-verify the whole response).
    resp = "3+4 makes $7$."
    assert G.grade_math(resp, "7", verifier=verifier).status == "no_answer"
    assert G.grade_math(resp, "7", verifier=verifier, parse_whole_text=True).correct
    # A marker, when present, is graded either way: the option changes nothing then.
    marked = r"3+4 is $7$, so \boxed{8}"
    assert not G.grade_math(marked, "7", verifier=verifier, parse_whole_text=True).correct


def test_grade_choice() -> None:
    assert G.grade_choice("Comparing options, the answer is (B).", "(B)")
    assert not G.grade_choice(r"\boxed{C}", "B")
    assert not G.grade_choice("no idea", "B")
    assert G.grade_choice(r"\boxed{G}", "G")  # widened up to the gold letter
    assert not G.grade_choice(r"\boxed{G}", "G", choices="ABCD")
    assert not G.grade_choice("B", "42")  # a non-letter ground truth never matches


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
    assert G.lmm_r1_format_ok(response) is ok


def test_vl_rethinker_validity_rules() -> None:
    boxed = r"so \boxed{1}"
    assert G.vl_rethinker_validity(boxed, finished=True) == G.Validity(True, "")
    assert G.vl_rethinker_validity(boxed, finished=False).reason == "no_eos"
    assert G.vl_rethinker_validity("1", finished=True).reason == "no_box"
    assert G.vl_rethinker_validity(r"\boxed{1", finished=True).reason == "no_box"  # unclosed
    assert G.vl_rethinker_validity("1", finished=True, require_box=False).valid
    five = "Wait. " * 5 + boxed
    six = "Wait. " * 6 + boxed
    assert G.vl_rethinker_validity(five, finished=True).valid
    assert G.vl_rethinker_validity(six, finished=True).reason == "too_many_waits"
    assert G.vl_rethinker_validity("awaiting " * 9 + boxed, finished=True).valid
