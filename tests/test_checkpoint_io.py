"""Untrusted dist-checkpoints: manifest checks, and unpickling that cannot run code.

Each crafted file carries a payload that would create a marker file if it ran; the load must
be refused with an error naming the file, and the marker must not exist.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_autothink.checkpoint_io import (
    CheckpointError,
    manifest,
    read_dist_metadata,
    verify_dist_dir,
)
from tests.dist_utils import run_distributed


class _Payload:
    """Unpickling this creates ``path``: stands for any code a crafted checkpoint would run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.path!r}, 'w').close()",))


def _sharded(obj: Any) -> dict[str, Any]:
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    return {
        "w": ShardedTensor.from_rank_offsets("w", torch.arange(6.0).reshape(2, 3), replica_id=0),
        "obj": ShardedObject("obj", obj, (1,), (0,), replica_id=0),
    }


def _save_and_load(ckpt: str, saved_obj: Any, payload_marker: str = "") -> dict[str, Any]:
    """Save a tensor and a sharded object (as megatron's optimizer state is stored; a payload
    if ``payload_marker``, made here: the spawn would unpickle it), then load them back
    through :func:`load_dist`; returns what loaded or the refusal's text."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_autothink.checkpoint_io import load_dist
    from megatron_autothink.compat import cpu as cpu_compat
    from megatron_autothink.parallel import serial_gloo_workers

    cpu_compat.activate()  # megatron's writer calls torch.cuda.synchronize
    dist.init_process_group("gloo")
    if payload_marker:
        saved_obj = _Payload(payload_marker)
    if saved_obj is not None:
        Path(ckpt).mkdir(parents=True, exist_ok=True)
        with serial_gloo_workers():
            dist_checkpointing.save(_sharded(saved_obj), ckpt)
    try:
        loaded = load_dist(_sharded(None), ckpt)
    except CheckpointError as e:
        return {"error": str(e)}
    return {"w": loaded["w"], "obj": loaded["obj"]}


@pytest.mark.dist
def test_genuine_checkpoint_loads_and_crafted_ones_run_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ck"
    (ok,) = run_distributed(_save_and_load, 1, str(ckpt), {"lr": 0.1, "betas": (0.9, 0.99)})
    assert torch.equal(ok["w"], torch.arange(6.0).reshape(2, 3))
    assert ok["obj"] == {"lr": 0.1, "betas": (0.9, 0.99)}
    assert read_dist_metadata(ckpt).state_dict_metadata["w"].size == torch.Size([2, 3])

    # A sharded object (non-tensor item) whose pickle runs code: torch loads those with
    # weights_only=False by default.
    (bad_item,) = run_distributed(_save_and_load, 1, str(tmp_path / "ck2"), None, str(marker))
    assert "obj" in bad_item["error"] and "refused to unpickle" in bad_item["error"]
    assert not marker.exists()

    # A crafted .metadata (torch reads it with plain pickle.load).
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    (bad_md,) = run_distributed(_save_and_load, 1, str(ckpt), None)
    assert f"{ckpt / '.metadata'}: refused to unpickle builtins.exec" in bad_md["error"]
    with pytest.raises(CheckpointError, match=r"\.metadata: refused to unpickle builtins\.exec"):
        read_dist_metadata(ckpt)
    assert not marker.exists()


def test_verify_dist_dir_finds_a_same_size_corruption(tmp_path: Path) -> None:
    """Training layout: iter_N/meta.json's manifest covers iter_N/dist (a flipped 4 KB block
    keeps the size, so only the CRC can tell)."""
    it = tmp_path / "iter_00000002"
    (it / "dist").mkdir(parents=True)
    victim = it / "dist" / "__0_0.distcp"
    victim.write_bytes(bytes(range(256)) * 64)
    (it / "rank_00000.pt").write_bytes(b"rank state")
    (it / "meta.json").write_text(json.dumps({"manifest": manifest(it)}))
    verify_dist_dir(it / "dist")
    (it / "rank_00000.pt").write_bytes(b"not needed to read dist/")
    verify_dist_dir(it / "dist")
    raw = bytearray(victim.read_bytes())
    raw[4096:8192] = b"\xff" * 4096
    victim.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{victim}: checksum mismatch"):
        verify_dist_dir(it / "dist")
