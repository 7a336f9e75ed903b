"""Fixtures shared by the RL tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from megatron_autothink.rl.rewards.verifier import MathVerifier


@pytest.fixture(scope="module")
def verifier() -> Iterator[MathVerifier]:
    """A warmed-up math-verify worker process (one per test module), closed afterwards."""
    v = MathVerifier(timeout_s=10.0, inner_timeout_s=2)
    v.warm_up()
    yield v
    v.close()
