"""atomic_write_text: the worked example, and no temporary file left behind."""

from __future__ import annotations

import doctest
import json
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


def test_drop_steps_after_keeps_one_row_per_step(tmp_path: Path) -> None:
    """Rows of the resumed stage after its step go (a torn last line too); other stages' rows
    and rows without a stage (a per-stage file) before it stay."""
    from megatron_autothink.fileio import drop_steps_after

    log = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 1, "stage": "anneal"},
        {"step": 2, "stage": "anneal"},
        {"step": 1, "stage": "rl"},
        {"step": 2, "stage": "rl"},
        {"step": 3, "stage": "rl"},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "sta')
    assert drop_steps_after(log, "rl", 1) == 3
    assert [json.loads(x) for x in log.read_text().splitlines()] == rows[:3]
    per_stage = tmp_path / "rollouts.jsonl"
    per_stage.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 1, 2, 2)))
    assert drop_steps_after(per_stage, "rl", 1) == 2 and per_stage.read_text().count("\n") == 2
    assert drop_steps_after(tmp_path / "absent.jsonl", "rl", 0) == 0
