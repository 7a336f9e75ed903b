r"""math-verify behind a hard wall-clock limit, in a worker process.

math-verify's own ``parsing_timeout``/``timeout_seconds`` use ``signal.alarm``, which only works
on the main thread of the main interpreter and cannot interrupt a long C call (e.g. a huge
integer power inside sympy). :class:`MathVerifier` therefore runs math-verify in a dedicated
*spawned* worker process, where it is the main thread so its own timeouts work, and the parent
enforces a hard wall-clock limit with ``Connection.poll``; a worker that overruns is killed and
lazily restarted. No signals are used in the caller, so this works from any thread. Model text
is only ever handled as a string; nothing is ``eval``-ed.

Time budget of one sample (issue #21 item 7): answer extraction (:mod:`.extract`) runs in the
caller and is linear in the response length (milliseconds even for 8000 unclosed boxes), so the
only unbounded step, math-verify, is the one under this hard limit. Unpickling the worker's
target imports this package and ``config`` but not torch (``rubric`` imports ``PromptSample``
for typing only), so a restarted worker is ready in about a second.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

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
