r"""The recipe reward: one object, built from ``config.RewardWeights``, that RL rollouts and
``autothink eval`` both call, so training and evaluation cannot disagree on what is correct.

Per response (text including any forced prefill, ground truth, whether generation ended on EOS):

* **accuracy** (weight ``accuracy``): multiple-choice ground truths (``answer_type ==
  "choice"``) by letter, everything else by math-verify on the extracted answer, in the
  time-limited worker. Two per-recipe options from the released code: ``parse_whole_text``
  (no answer marker: math-verify searches the whole response; LMM-R1 and VL-Rethinker) and
  ``unparseable_gold_accuracy`` (LMM-R1 gives accuracy 1 when math-verify cannot parse the
  ground truth, i.e. skips a broken example).
* **The EOS rule, every recipe**: a response that did not end with EOS (cut at the token limit)
  gets accuracy 0 and ``correct=False`` without being graded. Otherwise a rollout cut mid-thought
  ("...3+4=7") could score, which favours long thinking in BPO and inflates eval accuracy.
* **think_format** (R-4B bi-mode turn) and **lmm_r1_format** (LMM-R1 ``<think><answer>``), each
  added with its weight when the weight is non-zero.
* **length_cost** (ours, for BPO's mode choice): applied by the RL loop once token counts are
  known (:func:`length_cost`), not by :class:`Rubric`, which sees text only.
* **invalid_penalty** (VL-Rethinker): an invalid response (no EOS, no box, more than 5 "wait")
  scores ``-invalid_penalty`` whatever else it earned.

``correct`` is the grader's verdict (what eval accuracy, SSR and forced rethinking read); the
unparseable-ground-truth rule changes the accuracy *reward* only, so eval does not count broken
examples as solved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_autothink.config import RewardWeights
from megatron_autothink.modes import think_mode
from megatron_autothink.rl.rewards.graders import (
    grade_choice,
    grade_math,
    lmm_r1_format_ok,
    vl_rethinker_validity,
)
from megatron_autothink.rl.rewards.verifier import MathVerifier

if TYPE_CHECKING:  # the math-verify worker imports this package: keep torch out of it
    from megatron_autothink.data.batch import PromptSample


@dataclass(frozen=True, slots=True)
class Score:
    """The reward of one response, whether it is correct, and the unweighted components."""

    reward: float
    correct: bool
    components: dict[str, float]


class Rubric:
    r"""The configured rule-based reward; an instance is the rollout's ``ScoreFn``.

    Args:
        weights: The recipe's ``rl.rewards``.
        verifier: math-verify worker; None uses the process-wide one (started on first use).

    Example:
        >>> r4b = Rubric(RewardWeights(think_format=0.5))
        >>> r4b.score("<think>\n\n</think>\n\nThe answer is B", answer="B", answer_type="choice",
        ...           finished=True)
        Score(reward=1.5, correct=True, components={'accuracy': 1.0, 'think_format': 1.0})
        >>> r4b.score("<think>\nthe answer is B", answer="B", answer_type="choice",
        ...           finished=False)  # cut at the token limit: no accuracy
        Score(reward=0.0, correct=False, components={'accuracy': 0.0, 'think_format': 0.0})
        >>> vlr = Rubric(RewardWeights(invalid_penalty=0.1))
        >>> vlr.score("The answer is B", answer="B", answer_type="choice", finished=True)
        Score(reward=-0.1, correct=True, components={'accuracy': 1.0, 'valid': 0.0})
    """

    def __init__(self, weights: RewardWeights, *, verifier: MathVerifier | None = None) -> None:
        self.weights = weights
        self.verifier = verifier

    def _accuracy(
        self, text: str, answer: str, answer_type: str | None, finished: bool
    ) -> tuple[float, bool]:
        if not finished:
            return 0.0, False
        if answer_type == "choice":
            ok = grade_choice(text, answer)
            return float(ok), ok
        w = self.weights
        verdict = grade_math(
            text, answer, verifier=self.verifier, parse_whole_text=w.parse_whole_text
        )
        if verdict.status == "gold_unparseable" and w.unparseable_gold_accuracy is not None:
            return w.unparseable_gold_accuracy, verdict.correct
        return float(verdict.correct), verdict.correct

    def score(
        self, text: str, *, answer: str | None, answer_type: str | None, finished: bool
    ) -> Score:
        """Score one response.

        Args:
            text: Prefill + generated text (EOS stripped).
            answer: Ground truth (None is graded as an empty one).
            answer_type: ``choice`` grades by letter; anything else by math-verify.
            finished: Whether generation stopped on EOS.

        Returns:
            Total reward, correctness and the unweighted components.
        """
        w = self.weights
        acc, correct = self._accuracy(text, answer or "", answer_type, finished)
        comps = {"accuracy": acc}
        total = w.accuracy * acc
        if w.think_format:
            comps["think_format"] = 0.0 if think_mode(text) == "invalid" else 1.0
            total += w.think_format * comps["think_format"]
        if w.lmm_r1_format:
            comps["lmm_r1_format"] = float(lmm_r1_format_ok(text))
            total += w.lmm_r1_format * comps["lmm_r1_format"]
        if w.invalid_penalty:
            valid = vl_rethinker_validity(text, finished=finished).valid
            comps["valid"] = float(valid)
            if not valid:
                total = -w.invalid_penalty
        return Score(reward=float(total), correct=correct, components=comps)

    def __call__(
        self, text: str, prompt: PromptSample, finished: bool
    ) -> tuple[float, bool, dict[str, float]]:
        """The rollout's ``ScoreFn`` shape: ``(text, prompt, finished) -> (reward, correct,
        components)``."""
        s = self.score(
            text, answer=prompt.answer, answer_type=prompt.answer_type, finished=finished
        )
        return s.reward, s.correct, s.components


def length_cost(correct: bool, num_tokens: int, budget: int, weight: float) -> float:
    """What a response loses for its length: ``weight * num_tokens / budget`` when correct, else 0.

    Only correct answers pay, so a wrong short answer never beats a right long one (with
    ``weight < 1`` and ``num_tokens <= budget`` a correct answer keeps a reward > 0); among
    right answers the shorter wins, which is what lets BPO prefer the direct answer where both
    modes are right. ``num_tokens`` is the whole assistant turn (prefill included).

    Example (a 96-token budget, weight 0.2: a 10-token direct answer vs a 60-token trace):
        >>> round(1.0 - length_cost(True, 10, 96, 0.2), 3), round(1.0 - length_cost(True, 60, 96, 0.2), 3)
        (0.979, 0.875)
        >>> length_cost(False, 10, 96, 0.2)
        0.0
    """
    if not correct or weight == 0.0:
        return 0.0
    return weight * min(num_tokens, budget) / max(budget, 1)
