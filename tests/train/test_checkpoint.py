"""Checkpoints: exact resume, atomic saves, corrupted checkpoints rejected with a fall-back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.models.model_utils import IMAGE_TOKEN

VOCAB, SEQ = 512, 48


def _train(ckpt_dir: str, steps: int, save_every: int, overrides: list[str]) -> dict:
    from megatron_autothink.config import load_config
    from megatron_autothink.parallel import init_distributed, seed_everything
    from megatron_autothink.train.callbacks import CheckpointCallback
    from megatron_autothink.train.checkpoint import CheckpointManager
    from megatron_autothink.train.loop import LoopState, run_sft
    from megatron_autothink.train.setup import build_model_chunks, build_optimizer, wrap_ddp
    from tests.train.sources import SyntheticSource

    cfg = load_config(
        "tiny_cpu",
        [
            "data.micro_batch_size=2",
            "data.global_batch_size=4",
            "optim.warmup_fraction=0.25",
            *overrides,
        ],
    )
    ctx = init_distributed(cfg)
    seed_everything(cfg.train.seed, ctx)
    chunks = wrap_ddp(
        cfg, build_model_chunks(cfg, ctx, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN), ctx
    )
    total = 6
    opt = build_optimizer(cfg, chunks, ctx, total_steps=total)
    data = SyntheticSource(VOCAB, SEQ, rank=ctx.dp_rank)
    mgr = CheckpointManager(ckpt_dir, ctx, keep_last=3)
    state = LoopState(
        cfg=cfg,
        ctx=ctx,
        chunks=chunks,
        opt=opt,
        data=data,
        ckpt=mgr,
        stage="sft",
        total_steps=steps,
    )
    loaded = mgr.load_latest(chunks, opt)
    if loaded is not None:
        state.step = loaded.step
        data.load_state_dict(loaded.rank_state["data"])
    losses: list[float] = []

    class Record(CheckpointCallback):
        def on_step_end(self, st, metrics):  # type: ignore[no-untyped-def]
            losses.append(metrics["loss"])
            super().on_step_end(st, metrics)

    run_sft(state, [Record(save_every)], num_micro_batches=2 // ctx.dp)
    return {
        "losses": losses,
        "resumed_from": None if loaded is None else loaded.step,
        "lr": opt.optimizer.param_groups[0]["lr"],
    }


@pytest.mark.dist
def test_resume_is_exact(tmp_path: Path) -> None:
    (full,) = run_distributed(_train, 1, str(tmp_path / "a"), 6, 0, [])
    (first,) = run_distributed(_train, 1, str(tmp_path / "b"), 3, 3, [])
    (second,) = run_distributed(_train, 1, str(tmp_path / "b"), 6, 3, [])
    assert second["resumed_from"] == 3
    assert first["losses"] + second["losses"] == full["losses"]  # bit-exact on CPU fp32
    assert second["lr"] == full["lr"]


@pytest.mark.dist
@pytest.mark.slow
def test_resume_with_dp2_and_reshard_to_tp2(tmp_path: Path) -> None:
    """Save at DP=2 (distributed optimizer sharded over 2 ranks), continue at DP=2 exactly, and
    load the same checkpoint at TP=2 (model and optimizer resharded)."""
    full = run_distributed(_train, 2, str(tmp_path / "a"), 4, 0, [])
    run_distributed(_train, 2, str(tmp_path / "b"), 2, 2, [])
    second = run_distributed(_train, 2, str(tmp_path / "b"), 4, 2, [])
    torch.testing.assert_close(
        torch.tensor(second[0]["losses"]), torch.tensor(full[0]["losses"][2:]), atol=1e-6, rtol=0
    )
    resharded = run_distributed(_train, 2, str(tmp_path / "b"), 5, 0, ["parallel.tp=2"])
    assert resharded[0]["resumed_from"] == 4
    assert len(resharded[0]["losses"]) == 1


@pytest.mark.dist
def test_corrupted_latest_falls_back_to_previous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "c"
    run_distributed(_train, 1, str(root), 4, 2, [])
    latest = root / "iter_00000004"
    assert (root / "latest").read_text() == latest.name
    # Flip bytes in one data file of the newest checkpoint.
    victim = next(p for p in sorted((latest / "dist").iterdir()) if p.suffix == ".distcp")
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    # And leave a half-written save behind, as a crash would.
    (root / "iter_00000006.tmp" / "dist").mkdir(parents=True)
    (out,) = run_distributed(_train, 1, str(root), 5, 0, [])
    assert out["resumed_from"] == 2


def test_verify_names_the_bad_file(tmp_path: Path) -> None:
    from megatron_autothink.train.checkpoint import CheckpointError, CheckpointManager

    ck = tmp_path / "iter_00000001"
    ck.mkdir()
    (ck / "rank_00000.pt").write_bytes(b"abc")
    (ck / "meta.json").write_text(json.dumps({"manifest": {"rank_00000.pt": [5, 0]}}))
    mgr = CheckpointManager.__new__(CheckpointManager)
    with pytest.raises(CheckpointError, match=r"rank_00000\.pt: size 3 != 5"):
        mgr.verify(ck)
    (ck / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"no meta\.json"):
        mgr.verify(ck)
