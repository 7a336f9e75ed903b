"""Fixtures for the launcher tests: a real single-machine SLURM cluster, started once per module."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import ClusterUnavailable, SlurmCluster


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    """munged + slurmctld + 2 slurmd on 127.0.0.1 with private ports, config and state.

    Skips (with the exact reason) when SLURM is not installed or a daemon cannot start here.
    A short /tmp path keeps the munge socket under the 108-byte unix-socket limit.
    """
    root = Path(tempfile.mkdtemp(prefix="atslurm-"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
    except ClusterUnavailable as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"real SLURM cluster unavailable: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
