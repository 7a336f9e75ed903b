"""The soak of issue #21, short: ``benchmarks/soak.py`` with 3 kill -9s (of the process group
and of the trainer alone) across the anneal -> RL boundary with SSR and KL on; metrics, rollouts
and the final checkpoint must equal an uninterrupted run's, and no process may be left.

~8-12 min on 2 cores (a reference run plus four starts, each ~1 min of set-up): slow. The full
20-kill figures are in docs/benchmarks.md ("Soak").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import soak

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_soak_three_kills_is_exact_and_leaves_no_process(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    report_path = tmp_path / "report.json"
    args = ["--kills", "3", "--seed", "1", "--anneal-steps", "2", "--rl-steps", "3"]
    rc = soak.main([*args, "--out", str(out), "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["differences"] == []
    assert report["orphans"] == [], report["orphans"]
    assert rc == 0
    assert report["kills"] == 3 and report["kills_group"] >= 1 and report["kills_trainer"] >= 1
    assert report["tensors_compared"] > 0
