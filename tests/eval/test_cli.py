"""``autothink eval`` argument handling: missing flags refused at once, vLLM's repeated CPU
warning printed once."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_help_marks_required_flags_and_missing_ones_fail_fast() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "megatron_autothink.cli", "eval"]
    t0 = time.perf_counter()
    res = subprocess.run([*cmd, "--data", "d"], env=env, capture_output=True, text=True)
    assert res.returncode == 2
    assert "the following arguments are required: --model" in res.stderr
    assert time.perf_counter() - t0 < 30  # no engine / torch start-up before the refusal
    usage = subprocess.run([*cmd, "--help"], env=env, capture_output=True, text=True).stdout
    assert "--model MODEL --data DATA" in " ".join(usage.split())  # not shown as [--model ...]


def test_vllm_set_num_threads_warning_once(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("vllm")
    from vllm.logger import init_logger

    from megatron_autothink.eval.cli import quiet_vllm_cpu_warnings

    quiet_vllm_cpu_warnings()
    quiet_vllm_cpu_warnings()  # idempotent
    logger = init_logger("vllm.v1.worker.cpu_worker")  # how vLLM's CPU worker gets its logger
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        msg = "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding"
        for _ in range(5):
            logger.warning(msg)
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert seen == [msg, "something else"]
