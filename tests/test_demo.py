"""End-to-end smoke of ``autothink demo --smoke`` (real megatron training and vLLM rollouts on
CPU; several minutes on 2 shared cores, hence ``slow``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_autothink.demo import PHASES


@pytest.mark.vllm  # ~1.5-3 min: the CI smoke of the whole pipeline (issue #9)
def test_demo_smoke(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "megatron_autothink.cli", "demo", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "total wall time" in proc.stdout
    for phase in PHASES:
        assert (out / ".done" / phase).is_file(), phase
    for name in ("digits", "digits_text"):
        assert list((out / "data" / name).glob("train-*.tar")), name
        assert list((out / "data" / name).glob("test-*.tar")), name
    for stage in ("anneal", "fre", "bpo"):
        assert list((out / "run" / "checkpoints" / stage).glob("iter_*")), stage
    stages = {json.loads(line)["stage"] for line in (out / "run" / "metrics.jsonl").open()}
    assert stages == {"anneal", "fre", "bpo"}
    for name in ("eval_before", "eval_after"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert set(summary["modes"]) == {"auto", "long", "short"}
        lines = (out / name / "samples.jsonl").read_text().splitlines()
        assert len(lines) == 3 * summary["num_samples"]
        assert (out / name / "summary.md").is_file()
    answer = json.loads((out / "hf_answer.json").read_text())
    assert answer["answer"]
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(str(out / "hf_model"))
    report = (out / "report.md").read_text()
    for png in ("accuracy.png", "think_rate.png", "tokens.png", "training.png"):
        assert (out / png).stat().st_size > 1000, png
        assert png in report
    # A rerun skips every finished phase.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert again.stdout.count("skipped") == len(PHASES)
