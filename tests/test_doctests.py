"""Every worked example in a package docstring runs: each module with a ``>>>`` example is
doctested here, so none can go stale unnoticed (per-package tests may run some again)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import megatron_autothink

PACKAGE = Path(megatron_autothink.__file__).parent
MODULES = sorted(
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
    for p in PACKAGE.rglob("*.py")
    if ">>>" in p.read_text()
)


def test_modules_found() -> None:
    assert "megatron_autothink.models.varlen" in MODULES and len(MODULES) > 20


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
