"""Callbacks in isolation (no training)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_autothink.train.callbacks import WandbLogger


def test_wandb_stays_silent_off_the_logging_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other ranks neither import wandb nor create a run or any file."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would now fail
    state: object = SimpleNamespace(
        ctx=SimpleNamespace(is_logging_rank=False), stage="sft", global_step=1
    )
    cb = WandbLogger("p", "offline", tmp_path / "run", {})
    cb.on_train_start(state)  # type: ignore[arg-type]
    cb.on_step_end(state, {"loss": 1.0})  # type: ignore[arg-type]
    cb.on_train_end(state)  # type: ignore[arg-type]
    assert cb.run is None
    assert not (tmp_path / "run").exists()


def test_wandb_run_id_is_kept_per_run_dir(tmp_path: Path) -> None:
    """Stages and resumed jobs of one run dir continue one W&B run; another run dir gets its
    own."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = WandbLogger("p", "offline", tmp_path / "a", {})._run_id()
    assert WandbLogger("p", "offline", tmp_path / "a", {})._run_id() == first
    assert (tmp_path / "a" / WandbLogger.ID_FILE).read_text().strip() == first
    assert WandbLogger("p", "offline", tmp_path / "b", {})._run_id() != first
    assert re.fullmatch(r"[a-z0-9]{8}", first), first
