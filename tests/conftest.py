"""Suite-wide test ordering.

vLLM's CPU platform rebinds kernels by scanning module attributes with ``hasattr``; once moto's
S3 server (tests/data, tests/launch) has imported Flask, its ``current_app`` proxy raises
RuntimeError on that scan and an in-process engine cannot start. The rollout tests share one
session-scoped engine, so they run first, before anything imports Flask.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    items.sort(key=lambda item: 0 if "tests/rollout/" in item.nodeid else 1)
