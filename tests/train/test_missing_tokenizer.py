"""Training on own data without a tokenizer: one clear error naming the key and the command,
before any process group or model exists (not a rank traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_missing_tokenizer_says_what_to_run(tmp_path: Path) -> None:
    data = tmp_path / "mydata"
    data.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_autothink.cli",
            "train",
            f"data.train_path={data}",
            f"logging.run_dir={tmp_path / 'run'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    assert "data.tokenizer_path" in res.stderr and str(data / "tokenizer") in res.stderr
    assert "autothink prep tokenizer --out" in res.stderr
    assert not (tmp_path / "run").exists()  # nothing set up yet
