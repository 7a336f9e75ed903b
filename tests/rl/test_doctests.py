"""Run every doctest in megatron_autothink.rl: the worked examples must stay true."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "types",
    "rewards.extract",
    "rewards.verifier",
    "rewards.graders",
    "rewards.rubric",
    "advantages",
    "bpo",
    "losses",
    "ssr",
    "rethinking",
    "comm",
]


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name: str) -> None:
    module = importlib.import_module(f"megatron_autothink.rl.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no doctests"
    assert result.failed == 0
