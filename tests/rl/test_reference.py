"""The KL reference checkpoint: saved once at an RL stage's start, reloaded on resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

SEQ, VOCAB = 48, 1024


def _round_trip(ckpt_dir: str) -> dict[str, bool]:
    from megatron_autothink.config import load_config
    from megatron_autothink.parallel import init_distributed, seed_everything
    from megatron_autothink.train.checkpoint import CheckpointError, CheckpointManager
    from megatron_autothink.train.setup import build_model_chunks, build_optimizer, wrap_ddp
    from megatron_autothink.train.step import train_step
    from tests.models.model_utils import synthetic_batch

    cfg = load_config("tiny_cpu", ["data.micro_batch_size=2", "data.global_batch_size=2"])
    ctx = init_distributed(cfg)
    seed_everything(cfg.train.seed, ctx)
    chunks = wrap_ddp(cfg, build_model_chunks(cfg, ctx, vocab_size=VOCAB, image_token_id=7), ctx)
    opt = build_optimizer(cfg, chunks, ctx, total_steps=4)
    mgr = CheckpointManager(ckpt_dir, ctx)
    missing = False
    try:
        mgr.load_reference(chunks)
    except CheckpointError:
        missing = True
    start = {
        k: v.clone()
        for k, v in chunks[0].module.state_dict().items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }
    mgr.save_reference(chunks)  # the stage's start
    train_step(chunks, opt, [synthetic_batch(2, SEQ, VOCAB, 0)], ctx, seq_length=SEQ)
    live = chunks[0].module.state_dict()
    moved = any(not torch.equal(start[k], live[k]) for k in start)
    # A "resumed" process: fresh chunks, the reference loaded from disk, not from the live ones.
    ref = build_model_chunks(cfg, ctx, vocab_size=VOCAB, image_token_id=7)
    mgr.load_reference(ref)
    loaded = ref[0].state_dict()
    exact = all(torch.equal(start[k], loaded[k]) for k in start)
    return {"missing_raises": missing, "moved": moved, "exact": exact}


@pytest.mark.dist
def test_reference_weights_round_trip(tmp_path: Path) -> None:
    (out,) = run_distributed(_round_trip, 1, str(tmp_path / "stage"))
    assert out == {"missing_raises": True, "moved": True, "exact": True}
    assert (tmp_path / "stage" / "reference" / "meta.json").is_file()
    assert not (tmp_path / "stage" / "reference.tmp").exists()
