"""Every CPU patch is needed: leaving one out makes the megatron-core call it covers fail.

Each case runs in a fresh spawned process (patches are process-global), builds the tiny VLM with
megatron DDP + distributed optimizer, runs one train step through megatron's schedule and saves
a dist-checkpoint; the case passes when that smoke run fails without the named patch.
"""

from __future__ import annotations

import tempfile

import pytest
import torch

from megatron_autothink.compat import cpu
from tests.dist_utils import run_distributed
from tests.models.model_utils import IMAGE_TOKEN, synthetic_batch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shim is inert with CUDA")


def _smoke(skip: tuple[str, ...]) -> str:
    from megatron.core import dist_checkpointing

    from megatron_autothink.config import load_config
    from megatron_autothink.parallel import init_distributed, seed_everything
    from megatron_autothink.train.setup import build_model_chunks, build_optimizer, wrap_ddp
    from megatron_autothink.train.step import train_step

    cpu.activate(skip=skip)
    stage = "init"
    try:
        cfg = load_config("tiny_cpu")
        ctx = init_distributed(cfg)
        stage = "seed"
        seed_everything(1, ctx)
        stage = "model"
        chunks = build_model_chunks(cfg, ctx, vocab_size=512, image_token_id=IMAGE_TOKEN)
        stage = "ddp+optimizer"
        chunks = wrap_ddp(cfg, chunks, ctx)
        opt = build_optimizer(cfg, chunks, ctx, total_steps=1)
        stage = "train_step"
        train_step(chunks, opt, [synthetic_batch(2, 32, 512, 0)], ctx, seq_length=32)
        stage = "checkpoint"
        with tempfile.TemporaryDirectory() as d:
            dist_checkpointing.save(chunks[0].module.sharded_state_dict(), d)
        return "ok"
    except Exception as e:  # the point of the test: report where it broke
        return f"failed at {stage}: {type(e).__name__}: {e}"


def test_all_patches_make_the_smoke_run_pass() -> None:
    assert run_distributed(_smoke, 1, ()) == ["ok"]


# Where the smoke run breaks without each patch (measured with megatron-core 0.16.1).
EXPECTED_STAGE = {
    "current_device": "model",
    "cuda_rng": "seed",
    "device_kwarg": "ddp+optimizer",
    "cuda_tensor_type": "ddp+optimizer",
    "sync_noops": "checkpoint",
}


def test_every_patch_has_a_case() -> None:
    assert set(EXPECTED_STAGE) == set(cpu.PATCHES)


@pytest.mark.slow  # ~10 s per patch (~50 s): run when megatron-core or torch is upgraded
@pytest.mark.parametrize("name", sorted(EXPECTED_STAGE))
def test_each_patch_is_needed(name: str) -> None:
    (result,) = run_distributed(_smoke, 1, (name,))
    assert result.startswith("failed"), (
        f"patch '{name}' ({cpu.PATCHES[name].covers}) seems unneeded"
    )
    assert result.startswith(f"failed at {EXPECTED_STAGE[name]}:"), result


def test_activate_is_noop_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu.activate() == []
    assert not cpu.cpu_mode_active()
