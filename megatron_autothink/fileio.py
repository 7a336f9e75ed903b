"""Small file helpers shared by the trainer, its callbacks and the launcher protocol."""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, never half.

    Written next to the target (same file system) under a per-process name, then renamed.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "latest"
        >>> atomic_write_text(p, "iter_00000002"); p.read_text()
        'iter_00000002'
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def current_umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def drop_steps_after(path: str | os.PathLike[str], stage: str, step: int) -> int:
    """Remove the rows of ``stage`` with ``"step"`` > ``step`` from a per-step JSONL log.

    A resumed stage replays the steps after its checkpoint and logs them again; dropping the
    first run's rows at resume keeps one row per step, so analysis never counts a step twice.
    A row without ``"stage"`` counts as the stage's own (a per-stage file such as
    ``rollouts/<stage>.jsonl``). A torn last line (the process died while writing) is dropped
    too. Rewritten atomically; returns the number of rows dropped (the file is untouched when
    it is 0).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and row.get("stage", stage) == stage and row.get("step", 0) > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped
