"""Shared fixtures for the data-path tests: one tiny tokenizer and one small digits dataset."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer_dir(digits_dir: str) -> str:
    """The tiny tokenizer that `prep digits` saves next to its shards."""
    return os.path.join(digits_dir, "tokenizer")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: str):
    from megatron_autothink.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """300 train / 60 test digits samples in ~40 KB shards (so there are many shards)."""
    from megatron_autothink.data.digits import prep_digits

    out = tmp_path_factory.mktemp("digits") / "ds"
    prep_digits(str(out), n_train=300, n_test=60, seed=0, max_shard_size=40_000, progress=False)
    return str(out)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
