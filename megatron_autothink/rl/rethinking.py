r"""Forced Rethinking policy, VL-Rethinker (arXiv 2504.08837).

During rollouts some finished responses get a rethinking trigger appended (e.g.
"\n\nWait, does it seem right?") and generation continues from there; a continuation that
passes a rejection filter replaces the original response in its group. This teaches the model
to self-verify. This module only *decides* (pure functions + an explicit RNG); issuing the
continuation request to the engine and swapping the response are the rollout's job.

Decision order (all probabilities are arguments with the recipe defaults):

1. Eligible only if the response ended with EOS and leaves ``>= min_budget`` (1024) tokens.
2. A wrong response is skipped when its group's accuracy is above 0.7 (the group already knows
   the answer; rethinking there mostly adds noise).
3. Each remaining response is dropped with p = 0.35 (so not every response is rethought).
4. With p = 0.5 the response is first cut back: before its last "Wait", then before its last
   ``\boxed``, then before its last line mentioning "answer", then back to the previous
   paragraph break. The model must then redo the conclusion instead of only appending to it.
5. Trigger: with p = 0.5 a generic one ("\n\nWait" w.p. 0.4, else "\n\nWait, does it seem
   right?"); otherwise "\n\nWait, let's double check" after a correct answer or "\n\nWait,
   there might be a mistake" after a wrong one.
6. Continue at temperature 0.9; keep the continuation only if it is 30-1024 tokens, correct, has
   at most 4 "wait"s counting the trigger's own, and its prompt has fewer than 2 kept rethinks.

Deviations from the released code, on purpose: step 4's "answer" cut uses the *last* mention
(the released code uses ``str.find``, i.e. the first, which can discard almost the whole
response); if a cut would leave nothing, the response is kept whole. The released code counts
"wait," / "wait a" / "alternatively" substrings for step 6; we count the word "wait".
The RNG is a ``random.Random`` and draws happen in the fixed order drop -> truncate -> trigger
family -> trigger, one draw each, only when that step is reached, so plans are reproducible.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

from megatron_autothink.rl.rewards import count_waits

TRIGGER_WAIT = "\n\nWait"
TRIGGER_SEEM_RIGHT = "\n\nWait, does it seem right?"
TRIGGER_DOUBLE_CHECK = "\n\nWait, let's double check"
TRIGGER_MISTAKE = "\n\nWait, there might be a mistake"

PlanReason = Literal["eligible", "no_eos", "low_budget", "easy_group_incorrect", "dropped"]
VerdictReason = Literal[
    "accepted", "too_short", "too_long", "incorrect", "too_many_waits", "prompt_quota"
]

_ANSWER_LINE_RE = re.compile(r"[^\n]*answer[^\n]*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class RethinkPlan:
    """What to do with one response.

    Attributes:
        eligible: Whether to issue a rethinking continuation.
        reason: Why (``eligible`` or the first rule that rejected it).
        truncated: Whether ``prefix`` was cut back from the original text.
        prefix: Response text to continue from (the original text when not truncated).
        trigger: Trigger appended to ``prefix`` ("" when not eligible).
        temperature: Sampling temperature for the continuation.
        max_new_tokens: Generation cap for the continuation.
    """

    eligible: bool
    reason: PlanReason
    truncated: bool = False
    prefix: str = ""
    trigger: str = ""
    temperature: float = 0.9
    max_new_tokens: int = 0

    @property
    def continuation_prompt(self) -> str:
        """Response-side text the engine continues from: ``prefix + trigger``."""
        return self.prefix + self.trigger


def truncate_before_conclusion(text: str) -> str:
    r"""Cut a response back to before its conclusion (VL-Rethinker rethinking, step 4).

    Cuts before the last "Wait", then before the last ``\boxed``, then before the last line
    mentioning "answer", then back to the last paragraph break; trailing whitespace is removed.
    Returns ``text`` unchanged if that would leave nothing.

    Example:
        >>> truncate_before_conclusion("Step 1.\n\nStep 2: 6*7.\n\nSo the answer is \\boxed{42}.")
        'Step 1.\n\nStep 2: 6*7.'
        >>> truncate_before_conclusion("x = 2\n\ny = 3\n\nWait, check: ok.")
        'x = 2\n\ny = 3'
        >>> truncate_before_conclusion("\\boxed{1}")
        '\\boxed{1}'
    """
    cut = text
    idx = cut.rfind("Wait")
    if idx >= 0:
        cut = cut[:idx]
    idx = cut.rfind("\\boxed")
    if idx >= 0:
        cut = cut[:idx]
    matches = list(_ANSWER_LINE_RE.finditer(cut))
    if matches:
        cut = cut[: matches[-1].start()]
    idx = cut.rfind("\n\n")
    if idx >= 0:
        cut = cut[:idx]
    cut = cut.rstrip()
    return cut if cut else text


def plan_rethink(
    text: str,
    *,
    num_tokens: int,
    max_tokens: int,
    finished: bool,
    correct: bool,
    group_accuracy: float,
    rng: random.Random,
    min_budget: int = 1024,
    skip_incorrect_above: float = 0.7,
    drop_prob: float = 0.35,
    truncate_prob: float = 0.5,
    generic_trigger_prob: float = 0.5,
    plain_wait_prob: float = 0.4,
    temperature: float = 0.9,
    max_continuation_tokens: int = 1024,
) -> RethinkPlan:
    r"""Decide whether and how to force rethinking on one response (VL-Rethinker).

    Args:
        text: Response text, EOS stripped.
        num_tokens: Tokens in the response.
        max_tokens: Generation budget; the remaining budget is ``max_tokens - num_tokens``.
        finished: Whether the response ended with EOS.
        correct: Whether its answer was graded correct.
        group_accuracy: Accuracy of its rollout group (0..1).
        rng: Random source (see module docstring for the draw order).
        min_budget: Remaining budget required (1024).
        skip_incorrect_above: Skip wrong responses when group accuracy exceeds this (0.7).
        drop_prob: Probability of dropping an eligible response (0.35).
        truncate_prob: Probability of cutting back before the conclusion (0.5).
        generic_trigger_prob: Probability of a generic trigger (0.5).
        plain_wait_prob: Within generic triggers, probability of plain "\n\nWait" (0.4).
        temperature: Continuation temperature (0.9).
        max_continuation_tokens: Cap on continuation length; longer ones are rejected anyway.

    Returns:
        The plan.

    Example:
        >>> p = plan_rethink("So \\boxed{4}", num_tokens=10, max_tokens=4096, finished=True,
        ...                  correct=True, group_accuracy=0.5, rng=random.Random(0),
        ...                  drop_prob=0.0, truncate_prob=0.0, generic_trigger_prob=0.0)
        >>> p.eligible, p.continuation_prompt, p.max_new_tokens
        (True, "So \\boxed{4}\n\nWait, let's double check", 1024)
        >>> plan_rethink("x", num_tokens=3500, max_tokens=4096, finished=True, correct=True,
        ...              group_accuracy=0.5, rng=random.Random(0)).reason
        'low_budget'
    """
    remaining = max_tokens - num_tokens
    if not finished:
        return RethinkPlan(eligible=False, reason="no_eos", prefix=text)
    if remaining < min_budget:
        return RethinkPlan(eligible=False, reason="low_budget", prefix=text)
    if not correct and group_accuracy > skip_incorrect_above:
        return RethinkPlan(eligible=False, reason="easy_group_incorrect", prefix=text)
    if rng.random() < drop_prob:
        return RethinkPlan(eligible=False, reason="dropped", prefix=text)

    prefix, truncated = text, False
    if rng.random() < truncate_prob:
        prefix = truncate_before_conclusion(text)
        truncated = prefix != text

    if rng.random() < generic_trigger_prob:
        trigger = TRIGGER_WAIT if rng.random() < plain_wait_prob else TRIGGER_SEEM_RIGHT
    else:
        trigger = TRIGGER_DOUBLE_CHECK if correct else TRIGGER_MISTAKE

    return RethinkPlan(
        eligible=True,
        reason="eligible",
        truncated=truncated,
        prefix=prefix,
        trigger=trigger,
        temperature=temperature,
        max_new_tokens=min(remaining, max_continuation_tokens),
    )


@dataclass(frozen=True, slots=True)
class RethinkVerdict:
    """Whether to keep a rethinking continuation, and the first rule that failed."""

    accept: bool
    reason: VerdictReason


def accept_rethink(
    continuation_text: str,
    continuation_tokens: int,
    correct: bool,
    kept_for_prompt: int,
    *,
    min_tokens: int = 30,
    max_tokens: int = 1024,
    max_waits: int = 4,
    trigger_waits: int = 1,
    max_kept_per_prompt: int = 2,
) -> RethinkVerdict:
    """Rejection filter for rethinking continuations (VL-Rethinker, arXiv 2504.08837).

    Keep only continuations of ``min_tokens..max_tokens`` tokens (inclusive) that are correct,
    have at most ``max_waits`` "wait" words including the trigger's own (``trigger_waits``,
    since the trigger sits in the prompt, not in ``continuation_text``), and whose prompt has
    fewer than ``max_kept_per_prompt`` kept rethinks so far.

    Args:
        continuation_text: Generated text after the trigger.
        continuation_tokens: Its length in tokens.
        correct: Whether the full rethought response is graded correct.
        kept_for_prompt: Rethinks already kept for this prompt.
        min_tokens: Shortest kept continuation (30).
        max_tokens: Longest kept continuation (1024).
        max_waits: Most "wait" words allowed (4).
        trigger_waits: "wait" words in the trigger (1 for every recipe trigger).
        max_kept_per_prompt: Keep at most this many rethinks per prompt (2).

    Returns:
        The verdict.

    Example:
        >>> accept_rethink("Yes, 6*7 = 42, so the answer stays 42." * 3, 40, True, 0)
        RethinkVerdict(accept=True, reason='accepted')
        >>> accept_rethink("ok", 2, True, 0).reason
        'too_short'
        >>> accept_rethink("wait. wait. wait. wait.", 40, True, 0).reason  # 4 + trigger
        'too_many_waits'
        >>> accept_rethink("fine", 40, True, 2).reason
        'prompt_quota'
    """
    if continuation_tokens < min_tokens:
        return RethinkVerdict(False, "too_short")
    if continuation_tokens > max_tokens:
        return RethinkVerdict(False, "too_long")
    if not correct:
        return RethinkVerdict(False, "incorrect")
    if count_waits(continuation_text) + trigger_waits > max_waits:
        return RethinkVerdict(False, "too_many_waits")
    if kept_for_prompt >= max_kept_per_prompt:
        return RethinkVerdict(False, "prompt_quota")
    return RethinkVerdict(True, "accepted")
