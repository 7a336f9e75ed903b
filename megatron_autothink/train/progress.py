"""What ``autothink train`` prints while it works (rank 0, stdout).

Set-up takes a minute or more before the first step on CPU (imports, process groups, the model,
the loader workers, vLLM for RL stages): each phase is announced as it starts, with the seconds
since the command began, so a user sees where the time goes::

    autothink train [   9.8s] 1 rank (tp 1, pp 1), 2 torch threads
    autothink train [  10.1s] building the model (tiny: 4 layers, hidden 128)
    autothink train [  12.6s] stage sft (sft, 300 steps): optimizer and data loader (data/x)
    autothink train [  14.0s] stage sft: training steps 1-300

The per-step progress lines (step/total, tokens/s, ETA) are
:class:`~megatron_autothink.train.callbacks.ConsoleLogger`'s.
"""

from __future__ import annotations

import os
import time

_T0 = time.perf_counter()


def reset_clock() -> None:
    """Count phase times from now (``autothink train`` calls it when it starts)."""
    global _T0
    _T0 = time.perf_counter()


def phase(text: str, *, rank: int | None = None) -> None:
    """Print one set-up phase on rank 0 (``rank`` default: ``$RANK``, i.e. before the process
    groups exist)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"autothink train [{time.perf_counter() - _T0:6.1f}s] {text}", flush=True)


def format_duration(seconds: float) -> str:
    """``3725.2`` -> ``'1:02:05'``; ``65`` -> ``'1:05'``.

    >>> format_duration(3725.2), format_duration(65), format_duration(0.4)
    ('1:02:05', '1:05', '0:00')
    """
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
