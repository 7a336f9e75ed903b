r"""Rule-based rewards for the three recipes, as plain ``(response, ground_truth, **meta)`` functions.

Sources:
    * R-4B (arXiv 2508.21113): bi-mode answer format ``<think>\n...\n</think>\n\nanswer`` and the
      empty-think non-thinking form; "thinking trigger rate" uses :func:`is_thinking`.
    * VL-Rethinker (arXiv 2504.08837): math-verify on the last ``\boxed{}`` (else ``<answer>``,
      else ``Answer:``), multiple choice by letter, and the invalid-response rules.
    * LMM-R1 (arXiv 2503.07536): 0.5 format + 1.0 accuracy; unparseable ground truth scores 1.

Deviations from the released code, on purpose:
    * "wait" is counted as a case-insensitive *word* (``\bwait\b``); VL-Rethinker's code counts the
      substring, so "awaiting" would count there and not here.
    * Answer extraction takes the last ``\boxed{}`` whose braces balance, so a response cut off
      inside a box falls back to the previous complete box instead of returning garbage.

Time limits: math-verify's own ``parsing_timeout``/``timeout_seconds`` use ``signal.alarm``,
which only works on the main thread of the main interpreter and cannot interrupt a long C call
(e.g. a huge integer power inside sympy). :class:`MathVerifier` therefore runs math-verify in a
dedicated *spawned* worker process, where it is the main thread so its own timeouts work, and the
parent enforces a hard wall-clock limit with ``Connection.poll``; a worker that overruns is
killed and lazily restarted. No signals are used in the caller, so this works from any thread.
Model text is only ever handled as a string; nothing is ``eval``-ed.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal

ThinkModeOrInvalid = Literal["thinking", "non_thinking", "invalid"]

# ---------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# "Answer: 5", "Final answer: 5", "**Answer:** 5"; the rest of that line is the answer.
_ANSWER_LINE_RE = re.compile(r"(?i:answer)\s*\**\s*[:：]\s*\**\s*([^\n]*\S)")
_WAIT_RE = re.compile(r"\bwait\b", re.IGNORECASE)


def _balanced_brace_content(text: str, open_idx: int) -> str | None:
    r"""Return the text inside the brace group opening at ``open_idx``, or None if unclosed.

    ``\{`` and ``\}`` are escaped literals in LaTeX (set braces), so they must not count toward
    nesting; skipping the character after every backslash handles that.
    """
    depth = 0
    i = open_idx
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
        i += 1
    return None


def extract_boxed(response: str) -> str | None:
    r"""Content of the last complete ``\boxed{...}`` in ``response`` (balanced braces).

    VL-Rethinker (arXiv 2504.08837) grades the last box. An unclosed box (a response cut at the
    length limit) is skipped in favour of the previous complete one.

    Args:
        response: Model output.

    Returns:
        The box content, or None when there is no complete box.

    Example:
        >>> extract_boxed(r"first \boxed{1}, then \boxed{\frac{1}{2}}")
        '\\frac{1}{2}'
        >>> extract_boxed(r"set \boxed{\{1, 2\}} and a cut-off \boxed{3")
        '\\{1, 2\\}'
        >>> extract_boxed("no box") is None
        True
    """
    end = len(response)
    while True:
        idx = response.rfind("\\boxed", 0, end)
        if idx < 0:
            return None
        j = idx + len("\\boxed")
        while j < len(response) and response[j] == " ":
            j += 1
        if j < len(response) and response[j] == "{":
            content = _balanced_brace_content(response, j)
            if content is not None:
                return content
        end = idx


def extract_answer(response: str) -> str | None:
    r"""Extract the final answer: last ``\boxed{}``, else last ``<answer>``, else ``Answer:`` line.

    This is VL-Rethinker's indicator order (arXiv 2504.08837); LMM-R1 (arXiv 2503.07536) also
    grades the boxed answer first.

    Args:
        response: Model output.

    Returns:
        The stripped answer string, or None when no indicator is present.

    Example:
        >>> extract_answer(r"<answer>so \boxed{42}</answer>")
        '42'
        >>> extract_answer("<think>x</think><answer> 7 </answer>")
        '7'
        >>> extract_answer("...\nFinal Answer: $x = 3$")
        '$x = 3$'
        >>> extract_answer("I give up") is None
        True
    """
    boxed = extract_boxed(response)
    if boxed is not None:
        return boxed.strip()
    tags = _ANSWER_TAG_RE.findall(response)
    if tags:
        return str(tags[-1]).strip()
    lines = _ANSWER_LINE_RE.findall(response)
    if lines:
        return str(lines[-1]).strip()
    return None


def count_waits(text: str) -> int:
    """Number of case-insensitive occurrences of the word "wait".

    Example:
        >>> count_waits("Wait, no. wait... Awaiting? WAIT")
        3
    """
    return len(_WAIT_RE.findall(text))


# ---------------------------------------------------------------------------------------------
# math-verify with a hard time limit
# ---------------------------------------------------------------------------------------------

VerdictStatus = Literal[
    "ok", "no_answer", "gold_unparseable", "pred_unparseable", "timeout", "error"
]


@dataclass(frozen=True, slots=True)
class MathVerdict:
    """Result of one math comparison.

    Attributes:
        correct: math-verify's verdict (False for timeouts and errors).
        status: Why: ``ok``; ``no_answer`` (nothing extracted); ``gold_unparseable`` /
            ``pred_unparseable`` (math-verify produced no sympy expression; ``correct`` then comes
            from its string comparison); ``timeout`` (hard limit hit, worker restarted);
            ``error`` (exception in the worker).
    """

    correct: bool
    status: VerdictStatus


def _as_latex(answer: str) -> str:
    # math-verify extracts from LaTeX environments; a bare "1/2" or "\\frac12" needs a wrapper.
    # Strings that already carry delimiters are passed through so we do not double-wrap.
    if "\\boxed" in answer or "$" in answer or "\\(" in answer or "\\[" in answer:
        return answer
    return "\\boxed{" + answer + "}"


def _math_verify_target(pred: str, gold: str, inner_timeout_s: int) -> tuple[str, bool]:
    """Runs inside the worker process: parse both (already LaTeX-wrapped) sides and compare."""
    from math_verify import parse, verify  # imported in the worker only
    from sympy import Basic, MatrixBase

    def has_expr(parsed: list[Any]) -> bool:
        return any(isinstance(p, (Basic, MatrixBase)) for p in parsed)

    gold_parsed = parse(gold, parsing_timeout=inner_timeout_s)
    pred_parsed = parse(pred, parsing_timeout=inner_timeout_s)
    correct = bool(
        gold_parsed
        and pred_parsed
        and verify(gold_parsed, pred_parsed, timeout_seconds=inner_timeout_s)
    )
    if not has_expr(gold_parsed):
        return "gold_unparseable", correct
    if not has_expr(pred_parsed):
        return "pred_unparseable", correct
    return "ok", correct


def _worker_main(
    conn: Connection,
    target: Callable[[str, str, int], tuple[str, bool]],
    inner_timeout_s: int,
    memory_limit_bytes: int | None,
) -> None:
    """Worker loop: warm up, report ready, then answer (pred, gold) requests until EOF."""
    import logging

    # math-verify logs a warning per timeout; the parent reports statuses instead.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    if memory_limit_bytes is not None:
        import resource

        # Cap the address space so e.g. 2^{2^{40}} raises MemoryError here instead of
        # swapping the training node; the parent sees status "error".
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    # One throw-away comparison imports sympy/math-verify before the first timed request, so
    # start-up cost is never charged against an answer's time limit.
    target("1", "1", inner_timeout_s)
    conn.send(("ready", True))
    while True:
        try:
            pred, gold = conn.recv()
        except (EOFError, OSError):
            return
        try:
            status, correct = target(pred, gold, inner_timeout_s)
            conn.send((status, bool(correct)))
        except BaseException:
            # Any failure on untrusted text is a verdict, not a crash. BaseException because
            # math-verify's TimeoutException derives from it directly.
            conn.send(("error", False))


class MathVerifier:
    """math-verify behind a hard per-answer wall-clock limit, safe to call from any thread.

    One persistent worker process (start method ``spawn`` by default: forking a trainer that
    holds CUDA/NCCL threads is unsafe) serves requests over a pipe. The worker applies
    math-verify's own signal-based timeouts (``inner_timeout_s``, whole seconds, per parse and per
    comparison); the parent waits at most ``timeout_s`` and kills and replaces the worker if it
    overruns, which also covers C-level loops that signals cannot interrupt.

    Args:
        timeout_s: Hard wall-clock limit per answer, seconds.
        inner_timeout_s: math-verify's own ``parsing_timeout``/``timeout_seconds``.
        memory_limit_bytes: ``RLIMIT_AS`` for the worker, or None for no limit.
        start_method: multiprocessing start method for the worker; keep "spawn" in trainers.
        target: Function run in the worker, ``(pred, gold, inner_timeout_s) -> (status,
            correct)``; it must be importable by name (spawn pickles it by reference). Tests use
            this to inject a hanging target.
        startup_timeout_s: Limit for a (re)started worker to import math-verify and report
            ready; not charged to any answer.

    Example:
        >>> with MathVerifier(timeout_s=10.0) as v:
        ...     v.verify("0.5", r"\\frac{1}{2}")
        MathVerdict(correct=True, status='ok')
    """

    def __init__(
        self,
        *,
        timeout_s: float = 5.0,
        inner_timeout_s: int = 2,
        memory_limit_bytes: int | None = 4 << 30,
        start_method: Literal["spawn", "forkserver", "fork"] = "spawn",
        target: Callable[[str, str, int], tuple[str, bool]] = _math_verify_target,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.timeout_s = timeout_s
        self.inner_timeout_s = max(1, int(inner_timeout_s))
        self.memory_limit_bytes = memory_limit_bytes
        self._ctx = mp.get_context(start_method)
        self._target = target
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Connection | None = None
        self.startup_timeout_s = startup_timeout_s
        self.num_restarts = 0
        """How many times a worker was killed for overrunning (for monitoring)."""

    def _start(self) -> Connection:
        parent, child = self._ctx.Pipe(duplex=True)
        # typeshed types get_context(str) as BaseContext, which lacks the Process attribute that
        # every concrete context has.
        proc = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker_main,
            args=(child, self._target, self.inner_timeout_s, self.memory_limit_bytes),
            daemon=True,  # never outlive the trainer
            name="math-verify-worker",
        )
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        # Wait for the ready handshake with a generous, separate start-up limit. A worker that
        # cannot start (e.g. math-verify missing) is a setup error: fail loudly rather than
        # score every answer 0.
        try:
            ready = parent.poll(self.startup_timeout_s) and parent.recv() == ("ready", True)
        except (EOFError, OSError):
            ready = False
        if not ready:
            self._kill()
            raise RuntimeError(
                "math-verify worker failed to start; is math-verify installed and the target "
                "importable by the worker?"
            )
        return parent

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(timeout=5.0)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None

    def verify(
        self, pred: str, gold: str, *, wrap_pred: bool = True, timeout_s: float | None = None
    ) -> MathVerdict:
        """Compare an extracted answer with the ground truth under the hard time limit.

        Args:
            pred: Extracted model answer (LaTeX or plain).
            gold: Ground-truth answer (LaTeX or plain).
            wrap_pred: Wrap a delimiter-free ``pred`` in ``\\boxed{}``; False when ``pred`` is a
                whole response that math-verify should search itself.
            timeout_s: Override of the per-answer limit.

        Returns:
            The verdict; ``timeout`` when the limit was hit.
        """
        limit = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            conn = self._conn
            if conn is None or self._proc is None or not self._proc.is_alive():
                self._kill()
                conn = self._start()
            try:
                conn.send((_as_latex(pred) if wrap_pred else pred, _as_latex(gold)))
                if conn.poll(limit):
                    status, correct = conn.recv()
                    return MathVerdict(correct=bool(correct), status=status)
            except (EOFError, OSError, BrokenPipeError):
                self._kill()
                return MathVerdict(correct=False, status="error")
            self._kill()
            self.num_restarts += 1
            return MathVerdict(correct=False, status="timeout")

    def warm_up(self) -> None:
        """Start the worker now rather than on the first answer (start-up takes ~1 s)."""
        with self._lock:
            if self._conn is None or self._proc is None or not self._proc.is_alive():
                self._kill()
                self._start()

    def close(self) -> None:
        """Stop the worker process."""
        with self._lock:
            self._kill()

    def __enter__(self) -> MathVerifier:
        self.warm_up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_DEFAULT_VERIFIER: MathVerifier | None = None
_DEFAULT_LOCK = threading.Lock()


def default_verifier() -> MathVerifier:
    """Process-wide lazily started :class:`MathVerifier` with default limits."""
    global _DEFAULT_VERIFIER
    with _DEFAULT_LOCK:
        if _DEFAULT_VERIFIER is None:
            _DEFAULT_VERIFIER = MathVerifier()
            _DEFAULT_VERIFIER.warm_up()
            atexit.register(_DEFAULT_VERIFIER.close)
        return _DEFAULT_VERIFIER


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s).strip("$.")


def verify_math_answer(
    pred: str | None,
    gold: str,
    *,
    verifier: MathVerifier | None = None,
    wrap_pred: bool = True,
) -> MathVerdict:
    r"""Check an extracted answer against the ground truth with math-verify (time limited).

    Identical strings (ignoring whitespace and surrounding ``$``/``.``) are accepted without
    calling math-verify, which skips the process round trip for the common exact case.

    Args:
        pred: Extracted answer, or None when the response had none.
        gold: Ground-truth answer.
        verifier: Worker to use; defaults to :func:`default_verifier`.
        wrap_pred: See :meth:`MathVerifier.verify`.

    Returns:
        The verdict.

    Example:
        >>> verify_math_answer(r"\dfrac{3}{6}", "0.5")
        MathVerdict(correct=True, status='ok')
        >>> verify_math_answer(None, "0.5")
        MathVerdict(correct=False, status='no_answer')
    """
    if pred is None or not pred.strip():
        return MathVerdict(correct=False, status="no_answer")
    if _squash(pred) == _squash(gold) and _squash(gold):
        return MathVerdict(correct=True, status="ok")
    return (verifier or default_verifier()).verify(pred, gold, wrap_pred=wrap_pred)


def math_accuracy_reward(
    response: str,
    ground_truth: str,
    *,
    verifier: MathVerifier | None = None,
    unparseable_gold_score: float | None = None,
    fallback_to_response: bool = True,
    **meta: Any,
) -> float:
    r"""1.0 if the extracted answer equals the ground truth under math-verify, else 0.0.

    VL-Rethinker (arXiv 2504.08837) and LMM-R1 (arXiv 2503.07536) both grade with math-verify on
    the last box. When no box/tag/``Answer:`` line exists, both released codes hand the whole
    response to math-verify, which searches it for the final expression
    (``fallback_to_response``). A ground truth that math-verify cannot turn into an expression is
    a data problem, not a model error; LMM-R1 gives accuracy 1 then
    (``unparseable_gold_score=1.0``). The default (None) keeps math-verify's string comparison,
    so text answers still grade.

    Args:
        response: Model output.
        ground_truth: Reference answer.
        verifier: Time-limited math-verify worker (default: process-wide one).
        unparseable_gold_score: Score when the ground truth does not parse; None = use
            math-verify's string comparison.
        fallback_to_response: Grade the whole response when nothing can be extracted.
        **meta: Ignored (lets a :class:`Rubric` pass shared metadata).

    Returns:
        The accuracy reward.

    Example:
        >>> math_accuracy_reward(r"so x = \boxed{\frac{1}{2}}", "0.5")
        1.0
        >>> math_accuracy_reward(r"\boxed{3}", "0.5")
        0.0
        >>> math_accuracy_reward("I think it is 3", "3")
        1.0
        >>> math_accuracy_reward("I think it is 3", "3", fallback_to_response=False)
        0.0
        >>> math_accuracy_reward(r"\boxed{3}", r"\sqrt{}", unparseable_gold_score=1.0)
        1.0
    """
    answer = extract_answer(response)
    wrap = True
    if answer is None and fallback_to_response:
        answer, wrap = response, False
    verdict = verify_math_answer(answer, ground_truth, verifier=verifier, wrap_pred=wrap)
    if verdict.status == "gold_unparseable" and unparseable_gold_score is not None:
        return float(unparseable_gold_score)
    return 1.0 if verdict.correct else 0.0


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------

DEFAULT_CHOICES = "ABCDE"
"""Letters accepted by default. Wider sets make pronoun "I" / article "A" misreads likelier."""
MC_DETECT_CHOICES = "ABCDEFGHIJK"
"""Letters that mark a ground truth as multiple choice (VL-Rethinker's set)."""

_LATEX_TEXT_RE = re.compile(r"\\(?:text|mathrm|textbf|mathbf|mathit)\s*\{([^{}]*)\}")
# "(B)", "B", "B.", "[C]", "D)", "E:" as a whole fragment, optionally followed by option text
# after a delimiter ("B. 42 cm").
_LETTER_FRAGMENT_RE = re.compile(
    r"^[\(\[\{]?\s*([A-Z])\s*(?:(?:[\)\]\}][\.:]?|[\.:])(?:\s+.*)?)?$", re.DOTALL
)
# "The answer is B", "Answer: (C)", "the correct option is D", "answer would be E."
_LETTER_PHRASE_RE = re.compile(
    r"(?i:answer|option|choice)(?:\s+(?i:is|would\s+be|should\s+be))?\s*[:：]?\s*"
    r"(?:(?i:option|choice)\s*)?[\(\[\{]?\s*([A-Z])(?![A-Za-z0-9])"
)


_BARE_LETTER_RE = re.compile(r"[\(\[]?\s*([A-Z])\s*[\)\]]?\.?")


def _letter_from_fragment(fragment: str, choices: str) -> str | None:
    frag = _LATEX_TEXT_RE.sub(r"\1", fragment).strip().strip("*$").strip()
    m = _LETTER_FRAGMENT_RE.match(frag)
    if m and m.group(1) in choices:
        return m.group(1)
    return None


def extract_choice(response: str, choices: str = DEFAULT_CHOICES) -> str | None:
    r"""Extract a multiple-choice letter from a response.

    Tries, in order: the extracted final answer as a letter fragment (``\boxed{B}``,
    ``\boxed{\text{(B)}}``, ``<answer>B. 42</answer>``); the last phrase like "the answer is B";
    the last non-empty line as a letter fragment.

    Args:
        response: Model output.
        choices: Allowed letters (uppercase).

    Returns:
        The letter, or None.

    Example:
        >>> extract_choice(r"... so \boxed{\text{(C)}}")
        'C'
        >>> extract_choice("Thus, the answer is B.")
        'B'
        >>> extract_choice("(D) 42 cm")
        'D'
        >>> extract_choice("Answer: Because of symmetry") is None
        True
    """
    answer = extract_answer(response)
    if answer is not None:
        letter = _letter_from_fragment(answer, choices)
        if letter is not None:
            return letter
    for m in reversed(list(_LETTER_PHRASE_RE.finditer(response))):
        if m.group(1) in choices:
            return m.group(1)
    lines = [ln for ln in response.strip().splitlines() if ln.strip()]
    if lines:
        return _letter_from_fragment(lines[-1], choices)
    return None


def multiple_choice_reward(
    response: str, ground_truth: str, *, choices: str | None = None, **meta: Any
) -> float:
    """1.0 if the chosen letter equals the ground-truth letter (VL-Rethinker, arXiv 2504.08837).

    Args:
        response: Model output.
        ground_truth: Correct letter, e.g. "B" or "(B)".
        choices: Allowed letters; default A-E, widened up to the ground-truth letter (so a
            gold "G" allows A-G).
        **meta: Ignored.

    Returns:
        The accuracy reward; 0.0 when either letter cannot be found.

    Example:
        >>> multiple_choice_reward("The answer is (B).", "B")
        1.0
        >>> multiple_choice_reward(r"\\boxed{A}", "(B)")
        0.0
    """
    gold = _letter_from_fragment(ground_truth, choices or MC_DETECT_CHOICES)
    if gold is None:
        return 0.0
    if choices is None:
        choices = MC_DETECT_CHOICES[: max(len(DEFAULT_CHOICES), ord(gold) - ord("A") + 1)]
    return 1.0 if extract_choice(response, choices) == gold else 0.0


def is_choice_letter(ground_truth: str, choices: str = MC_DETECT_CHOICES) -> bool:
    """Whether a ground truth is a bare option letter (routes to multiple-choice grading).

    Example:
        >>> is_choice_letter("(C)"), is_choice_letter("12"), is_choice_letter("B. 42 cm")
        (True, False, False)
    """
    m = _BARE_LETTER_RE.fullmatch(ground_truth.strip())
    return m is not None and m.group(1) in choices


# ---------------------------------------------------------------------------------------------
# R-4B think format
# ---------------------------------------------------------------------------------------------

_R4B_RE = re.compile(r"\A<think>\n(.*?)\n</think>\n\n(.*)\Z", re.DOTALL)
_THINK_OPEN_RE = re.compile(r"<think>(.*?)(?:</think>|\Z)", re.DOTALL)


def think_mode(response: str) -> ThinkModeOrInvalid:
    r"""Classify a full assistant turn in R-4B's bi-mode format (arXiv 2508.21113).

    Thinking is ``<think>\n{reasoning}\n</think>\n\n{answer}`` with non-blank reasoning;
    non-thinking is exactly ``<think>\n\n</think>\n\n{answer}``. Exactly one of each tag and a
    non-blank answer are required; a whitespace-only think block other than the canonical empty
    one is invalid (it is neither mode the template can produce). Pass the text *including*
    any forced prefill (``long``/``short`` modes put ``<think>\n`` in the prompt).

    Args:
        response: Full assistant turn.

    Returns:
        ``"thinking"``, ``"non_thinking"`` or ``"invalid"``.

    Example:
        >>> think_mode("<think>\n2+2=4\n</think>\n\n4")
        'thinking'
        >>> think_mode("<think>\n\n</think>\n\n4")
        'non_thinking'
        >>> think_mode("<think>\n\n</think>\n\n")
        'invalid'
        >>> think_mode("4")
        'invalid'
    """
    if response.count("<think>") != 1 or response.count("</think>") != 1:
        return "invalid"
    m = _R4B_RE.match(response)
    if m is None:
        return "invalid"
    thought, answer = m.group(1), m.group(2)
    if not answer.strip():
        return "invalid"
    if thought == "":
        return "non_thinking"
    if not thought.strip():
        return "invalid"
    return "thinking"


def is_thinking(response: str) -> bool:
    r"""Whether the response opened a non-empty think block (R-4B "thinking trigger rate").

    Deliberately lenient: a think block cut off by the length limit (no ``</think>``) still
    counts, because the metric asks whether the model *chose* to think, not whether it
    finished.

    Example:
        >>> is_thinking("<think>\nlet me see"), is_thinking("<think>\n\n</think>\n\n4")
        (True, False)
        >>> is_thinking("4")
        False
    """
    m = _THINK_OPEN_RE.search(response)
    return m is not None and bool(m.group(1).strip())


def think_format_reward(response: str, ground_truth: str = "", **meta: Any) -> float:
    r"""1.0 if the response is in either R-4B format, else 0.0 (arXiv 2508.21113).

    Example:
        >>> think_format_reward("<think>\n\n</think>\n\nB"), think_format_reward("B")
        (1.0, 0.0)
    """
    return 0.0 if think_mode(response) == "invalid" else 1.0


# ---------------------------------------------------------------------------------------------
# LMM-R1
# ---------------------------------------------------------------------------------------------

# LMM-R1's released pattern; content may not contain the closing tag.
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


def lmm_r1_reward(
    response: str,
    ground_truth: str,
    *,
    verifier: MathVerifier | None = None,
    format_weight: float = 0.5,
    accuracy_weight: float = 1.0,
    unparseable_gold_score: float | None = 1.0,
    **meta: Any,
) -> float:
    r"""LMM-R1 reward: 0.5 x format + 1.0 x math-verify accuracy (arXiv 2503.07536).

    Args:
        response: Model output.
        ground_truth: Reference answer.
        verifier: Time-limited math-verify worker.
        format_weight: Weight of :func:`lmm_r1_format_ok`.
        accuracy_weight: Weight of :func:`math_accuracy_reward`.
        unparseable_gold_score: Accuracy for an unparseable ground truth (LMM-R1: 1).
        **meta: Ignored.

    Returns:
        The reward in [0, 1.5].

    Example:
        >>> lmm_r1_reward(r"<think>1+1</think><answer>\boxed{2}</answer>", "2")
        1.5
        >>> lmm_r1_reward("2", "2")
        1.0
    """
    fmt = 1.0 if lmm_r1_format_ok(response) else 0.0
    acc = math_accuracy_reward(
        response, ground_truth, verifier=verifier, unparseable_gold_score=unparseable_gold_score
    )
    return format_weight * fmt + accuracy_weight * acc


# ---------------------------------------------------------------------------------------------
# VL-Rethinker
# ---------------------------------------------------------------------------------------------


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


def vl_rethinker_reward(
    response: str,
    ground_truth: str,
    *,
    finished: bool,
    require_box: bool = True,
    multiple_choice: bool | None = None,
    invalid_reward: float = -0.1,
    max_waits: int = 5,
    verifier: MathVerifier | None = None,
    **meta: Any,
) -> float:
    r"""VL-Rethinker reward: ``invalid_reward`` if invalid, else 1.0 correct / 0.0 wrong.

    The released code (arXiv 2504.08837) gives invalid responses -0.1 regardless of correctness
    so the model learns that a missing EOS or box is worse than a wrong answer. Multiple choice is
    graded by letter when the ground truth is a bare letter (or ``multiple_choice=True``).

    Args:
        response: Model output (EOS stripped).
        ground_truth: Reference answer or option letter.
        finished: Whether generation stopped on EOS.
        require_box: Whether a box is mandatory.
        multiple_choice: Force letter grading (True/False) or detect it (None).
        invalid_reward: Reward for invalid responses.
        max_waits: See :func:`vl_rethinker_validity`.
        verifier: Time-limited math-verify worker.
        **meta: Ignored.

    Returns:
        The reward.

    Example:
        >>> vl_rethinker_reward(r"\boxed{B}", "B", finished=True)
        1.0
        >>> vl_rethinker_reward(r"\boxed{B}", "B", finished=False)
        -0.1
    """
    if not vl_rethinker_validity(
        response, finished=finished, require_box=require_box, max_waits=max_waits
    ).valid:
        return invalid_reward
    mc = is_choice_letter(ground_truth) if multiple_choice is None else multiple_choice
    if mc:
        return multiple_choice_reward(response, ground_truth)
    return math_accuracy_reward(response, ground_truth, verifier=verifier)


# ---------------------------------------------------------------------------------------------
# Rubric
# ---------------------------------------------------------------------------------------------

RewardFn = Callable[..., float]
"""``(response: str, ground_truth: str, **meta) -> float``."""


@dataclass(frozen=True, slots=True)
class RubricEntry:
    """One weighted reward component."""

    name: str
    fn: RewardFn
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class RubricScore:
    """Unweighted per-component scores and their weighted total for one response."""

    components: dict[str, float]
    total: float


@dataclass(frozen=True, slots=True)
class RubricBatchScore:
    """Column-wise scores for a batch: ``components[name][i]`` and ``total[i]``."""

    components: dict[str, list[float]]
    total: list[float]


@dataclass(frozen=True)
class Rubric:
    r"""Weighted sum of reward functions (TRL / torchtitan style).

    Every entry receives the same ``(response, ground_truth, **meta)``; functions ignore meta
    they do not use. Components are reported unweighted so they can be logged as-is.

    Example:
        >>> r = Rubric((RubricEntry("format", think_format_reward, 0.5),
        ...             RubricEntry("mc", multiple_choice_reward, 1.0)))
        >>> r.score("<think>\n\n</think>\n\nThe answer is B", "B")
        RubricScore(components={'format': 1.0, 'mc': 1.0}, total=1.5)
        >>> r.score_batch(["<think>\n\n</think>\n\nA", "B"], ["B", "B"]).total
        [0.5, 1.0]
    """

    entries: tuple[RubricEntry, ...]
    _names: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = tuple(e.name for e in self.entries)
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate rubric names: {names}")
        object.__setattr__(self, "_names", names)

    def score(self, response: str, ground_truth: str, **meta: Any) -> RubricScore:
        """Score one response."""
        components = {e.name: float(e.fn(response, ground_truth, **meta)) for e in self.entries}
        total = sum(e.weight * components[e.name] for e in self.entries)
        return RubricScore(components=components, total=float(total))

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        metas: Sequence[Mapping[str, Any]] | None = None,
        **shared_meta: Any,
    ) -> RubricBatchScore:
        """Score a batch; ``metas[i]`` is per-item metadata, ``shared_meta`` goes to every item.

        Args:
            responses: Model outputs.
            ground_truths: One reference per response.
            metas: Optional per-item metadata (e.g. ``{"finished": True}``).
            **shared_meta: Metadata shared by all items.

        Returns:
            Column-wise component scores and totals.
        """
        if len(responses) != len(ground_truths):
            raise ValueError("responses and ground_truths differ in length")
        if metas is not None and len(metas) != len(responses):
            raise ValueError("metas must have one entry per response")
        components: dict[str, list[float]] = {name: [] for name in self._names}
        totals: list[float] = []
        for i, (resp, gt) in enumerate(zip(responses, ground_truths, strict=True)):
            item_meta = {**shared_meta, **(metas[i] if metas is not None else {})}
            s = self.score(resp, gt, **item_meta)
            for name in self._names:
                components[name].append(s.components[name])
            totals.append(s.total)
        return RubricBatchScore(components=components, total=totals)
