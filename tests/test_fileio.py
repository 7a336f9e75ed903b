"""atomic_write_text: the worked example, and no temporary file left behind."""

from __future__ import annotations

import doctest
from pathlib import Path

from megatron_autothink import fileio


def test_doctests() -> None:
    result = doctest.testmod(fileio)
    assert result.attempted > 0 and result.failed == 0


def test_replaces_and_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "latest"
    fileio.atomic_write_text(target, "a")
    fileio.atomic_write_text(target, "b")
    assert target.read_text() == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
