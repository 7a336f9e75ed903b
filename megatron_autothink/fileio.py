"""Small file helpers shared by the trainer, its callbacks and the launcher protocol."""

from __future__ import annotations

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
