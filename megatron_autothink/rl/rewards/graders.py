r"""Graders: is an extracted answer right, and is a response in a recipe's format.

Each grader answers one question about one response and returns a plain verdict; how verdicts
become a reward (weights, penalties, the EOS rule) is decided in :mod:`.rubric` only.

Sources:
    * Math: VL-Rethinker (arXiv 2504.08837) and LMM-R1 (arXiv 2503.07536) both grade with
      math-verify on the last ``\boxed{}`` (else ``<answer>``, else ``Answer:``).
    * Multiple choice by letter (VL-Rethinker).
    * Formats: R-4B's bi-mode turn (arXiv 2508.21113, :func:`megatron_autothink.modes.think_mode`), LMM-R1's
      ``<think>...</think><answer>...</answer>``, VL-Rethinker's invalid-response rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from megatron_autothink.rl.rewards.extract import (
    DEFAULT_CHOICES,
    MC_DETECT_CHOICES,
    count_waits,
    extract_answer,
    extract_boxed,
    extract_choice,
    letter_from_fragment,
)
from megatron_autothink.rl.rewards.verifier import MathVerdict, MathVerifier, verify_math_answer


def grade_math(
    response: str,
    ground_truth: str,
    *,
    verifier: MathVerifier | None = None,
    parse_whole_text: bool = False,
) -> MathVerdict:
    r"""math-verify's verdict on the answer extracted from ``response`` (time limited).

    When the response has no ``\boxed{}``, ``<answer>`` or ``Answer:`` line, the verdict is
    ``no_answer`` unless ``parse_whole_text``: then the whole response goes to math-verify, which
    searches it for a final LaTeX expression. The released LMM-R1 and VL-Rethinker code do that;
    it is off by default because any number in the reasoning can then match (``3+4=7`` scores for
    a gold 7), which rewards rambling.

    Args:
        response: Model output.
        ground_truth: Reference answer.
        verifier: Time-limited math-verify worker (default: the process-wide one).
        parse_whole_text: Grade the whole response when no answer marker is found.

    Returns:
        The verdict; ``status`` tells ``gold_unparseable`` apart for the LMM-R1 rule.

    Example:
        >>> grade_math(r"so x = \boxed{\frac{1}{2}}", "0.5")
        MathVerdict(correct=True, status='ok')
        >>> grade_math("I think it is $3$", "3")
        MathVerdict(correct=False, status='no_answer')
        >>> grade_math("I think it is $3$", "3", parse_whole_text=True)
        MathVerdict(correct=True, status='ok')
    """
    answer = extract_answer(response)
    if answer is None and parse_whole_text:
        return verify_math_answer(response, ground_truth, verifier=verifier, wrap_pred=False)
    return verify_math_answer(answer, ground_truth, verifier=verifier)


def grade_choice(response: str, ground_truth: str, *, choices: str | None = None) -> bool:
    """Whether the chosen letter equals the ground-truth letter (VL-Rethinker, arXiv 2504.08837).

    Args:
        response: Model output.
        ground_truth: Correct letter, e.g. "B" or "(B)".
        choices: Allowed letters; default A-E, widened up to the ground-truth letter (so a
            gold "G" allows A-G).

    Returns:
        False when either letter cannot be found.

    Example:
        >>> grade_choice("The answer is (B).", "B"), grade_choice(r"\\boxed{A}", "(B)")
        (True, False)
    """
    gold = letter_from_fragment(ground_truth, choices or MC_DETECT_CHOICES)
    if gold is None:
        return False
    if choices is None:
        choices = MC_DETECT_CHOICES[: max(len(DEFAULT_CHOICES), ord(gold) - ord("A") + 1)]
    return extract_choice(response, choices) == gold


# LMM-R1's released pattern; content may not contain the closing tag. Matched only after the
# tag counts are checked to be 1, so the tempered dots cannot backtrack: linear.
_LMM_R1_RE = re.compile(
    r"\A<think>(?:(?!</think>).)*</think>\s*<answer>(?:(?!</answer>).)*</answer>\Z", re.DOTALL
)


def lmm_r1_format_ok(response: str) -> bool:
    """Whether the whole response is ``<think>...</think><answer>...</answer>`` (LMM-R1).

    Exactly one of each tag (arXiv 2503.07536); surrounding whitespace is stripped first as the
    released reward server does, and whitespace between ``</think>`` and ``<answer>`` is allowed.

    Example:
        >>> lmm_r1_format_ok("<think>a</think>\\n<answer>1</answer>")
        True
        >>> lmm_r1_format_ok("<think>a</think><answer>1</answer><answer>2</answer>")
        False
    """
    text = response.strip()
    if any(text.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return False
    return _LMM_R1_RE.match(text) is not None


@dataclass(frozen=True, slots=True)
class Validity:
    """VL-Rethinker validity of a response; ``reason`` is "" when valid."""

    valid: bool
    reason: Literal["", "no_eos", "no_box", "too_many_waits"]


def vl_rethinker_validity(
    response: str, *, finished: bool, require_box: bool = True, max_waits: int = 5
) -> Validity:
    r"""VL-Rethinker invalid-response rules (arXiv 2504.08837).

    Invalid when generation did not end with EOS, when a box is required and missing, or when
    the word "wait" occurs more than ``max_waits`` times (a repetition guard).

    Args:
        response: Model output (EOS stripped).
        finished: Whether generation stopped on EOS.
        require_box: Whether a ``\boxed{}`` is mandatory.
        max_waits: Largest allowed number of "wait" words.

    Returns:
        The validity and the first failing rule.

    Example:
        >>> vl_rethinker_validity(r"\boxed{1}", finished=False)
        Validity(valid=False, reason='no_eos')
        >>> vl_rethinker_validity("wait " * 6 + r"\boxed{1}", finished=True).reason
        'too_many_waits'
        >>> vl_rethinker_validity(r"\boxed{1}", finished=True).valid
        True
    """
    if not finished:
        return Validity(False, "no_eos")
    if require_box and extract_boxed(response) is None:
        return Validity(False, "no_box")
    if count_waits(response) > max_waits:
        return Validity(False, "too_many_waits")
    return Validity(True, "")
