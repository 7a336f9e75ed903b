"""End-to-end smoke of ``autothink demo --smoke`` (real megatron training and vLLM rollouts on
CPU; several minutes on 2 shared cores, hence ``slow``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_autothink.demo import EVAL_PHASES, PHASES, TRAIN_PHASES


@pytest.mark.vllm  # ~1.5-3 min: the CI smoke of the whole pipeline (issue #9)
def test_demo_smoke(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "megatron_autothink.cli", "demo", "--smoke", "--out", str(out)]
    cmd += ["--seed", "7", "rollout.top_p=0.99"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "total wall time" in proc.stdout
    for phase in PHASES:
        assert (out / ".done" / phase).is_file(), phase
    assert list((out / "data" / "digits").glob("train-*.tar"))
    assert list((out / "data" / "digits").glob("test-*.tar"))
    for stage in TRAIN_PHASES:
        assert list((out / "run" / "checkpoints" / stage).glob("iter_*")), stage
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").open()]
    assert {r["stage"] for r in rows} == set(TRAIN_PHASES)
    # --seed and the override reached the run; the SSR stage kept a replay buffer
    run_cfg = yaml.safe_load((out / "run" / "config.yaml").read_text())
    assert run_cfg["train"]["seed"] == 7 and run_cfg["rollout"]["top_p"] == 0.99
    assert any("ssr/buffer_size" in r for r in rows if r["stage"] == "ssr")
    assert not any("ssr/buffer_size" in r for r in rows if r["stage"] == "grpo")
    for name in EVAL_PHASES:
        summary = json.loads((out / name / "summary.json").read_text())
        assert set(summary["modes"]) == {"auto", "long", "short"} and summary["temperature"] == 0
        lines = (out / name / "samples.jsonl").read_text().splitlines()
        assert len(lines) == 3 * summary["num_samples"]
        sampled = json.loads((out / name / "sampled" / "summary.json").read_text())
        assert set(sampled["modes"]) == {"auto"} and sampled["temperature"] == 1.0
    answer = json.loads((out / "hf_answer.json").read_text())
    assert answer["answer"]
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(str(out / "hf_model"))
    report = (out / "report.md").read_text()
    for png in (
        "accuracy.png",
        "think_rate.png",
        "fig5.png",
        "tokens.png",
        "rl.png",
        "advantages.png",
    ):
        assert (out / png).stat().st_size > 1000, png
        assert png in report
    assert "## Goals (issue #19)" in report
    # A rerun skips every finished phase.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert again.stdout.count("skipped") == len(PHASES)
    # ... and refuses to resume the folder with other settings
    other = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=600)
    assert other.returncode != 0 and "other settings" in other.stderr
