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
    from megatron_autothink.train.loop import run_loop
    from megatron_autothink.train.setup import build_model_chunks, build_optimizer, wrap_ddp
    from megatron_autothink.train.sft import SFTModule
    from megatron_autothink.train.state import LoopState
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

    run_loop(state, SFTModule(state, 2 // ctx.dp), [Record(save_every)])
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


def _init_from(src: str, iter_dir: str) -> dict:
    """Build a fresh model, apply ``train.init_from=src``; compare with ``iter_dir`` loaded by
    the resume path (model only)."""
    from megatron_autothink.config import load_config
    from megatron_autothink.parallel import init_distributed, seed_everything
    from megatron_autothink.pipeline import load_initial_weights
    from megatron_autothink.train.checkpoint import CheckpointError, CheckpointManager
    from megatron_autothink.train.setup import build_model_chunks

    cfg = load_config("tiny_cpu", [f"train.init_from={src}"])
    ctx = init_distributed(cfg)
    seed_everything(cfg.train.seed, ctx)
    chunks = build_model_chunks(cfg, ctx, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN)
    try:
        load_initial_weights(cfg, ctx, chunks)
    except CheckpointError as e:
        return {"error": str(e)}
    ref = build_model_chunks(cfg, ctx, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN)
    CheckpointManager(Path(iter_dir).parent, ctx).load(Path(iter_dir), ref, None)
    got, want = chunks[0].state_dict(), ref[0].state_dict()
    return {
        "same": all(torch.equal(got[k], v) for k, v in want.items() if isinstance(v, torch.Tensor))
    }


@pytest.mark.dist
def test_init_from_a_training_checkpoint_and_its_corruption(tmp_path: Path) -> None:
    """``train.init_from`` takes a training checkpoint's iter dir, its dist/ (the model part;
    it used to fail on the optimizer's keys) or the folder holding ``latest`` (a stage's
    checkpoints: it used to be refused), and refuses it once a .distcp is corrupted."""
    root = tmp_path / "r"
    run_distributed(_train, 1, str(root), 2, 2, [])
    it = root / "iter_00000002"
    assert (root / "latest").read_text().strip() == it.name
    for src in (it / "dist", it, root):
        (out,) = run_distributed(_init_from, 1, str(src), str(it))
        assert out == {"same": True}, src
    victim = max((it / "dist").glob("*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[4096:8192] = bytes(4096)  # same size: only the CRC can tell
    victim.write_bytes(bytes(raw))
    (out,) = run_distributed(_init_from, 1, str(it / "dist"), str(it))
    assert f"{victim}: checksum mismatch (corrupted)" in out["error"]


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


def _threads() -> set[str]:
    return {t.name for t in Path("/proc/self/task").iterdir()}


def _save_load_threads(ckpt_dir: str, guarded: bool) -> dict:
    """Thread ids that appear while saving and loading a checkpoint (model + optimizer) after
    a train step, in a one-rank world."""
    import contextlib

    from megatron_autothink.config import load_config
    from megatron_autothink.parallel import init_distributed, seed_everything
    from megatron_autothink.train import checkpoint
    from megatron_autothink.train.setup import build_model_chunks, build_optimizer, wrap_ddp
    from megatron_autothink.train.step import train_step
    from tests.models.model_utils import synthetic_batch

    if not guarded:
        checkpoint.serial_gloo_workers = contextlib.nullcontext  # type: ignore[assignment]
    torch.set_num_threads(2)
    cfg = load_config("tiny_cpu", ["data.micro_batch_size=2", "data.global_batch_size=2"])
    ctx = init_distributed(cfg)
    seed_everything(cfg.train.seed, ctx)
    chunks = wrap_ddp(cfg, build_model_chunks(cfg, ctx, vocab_size=1024, image_token_id=7), ctx)
    opt = build_optimizer(cfg, chunks, ctx, total_steps=4)
    batch = synthetic_batch(2, SEQ, 1024, 0)
    train_step(chunks, opt, [batch], ctx, seq_length=SEQ)
    before = _threads()
    mgr = checkpoint.CheckpointManager(ckpt_dir, ctx)
    mgr.save(1, chunks, opt, rank_state={}, meta={})
    assert mgr.load_latest(chunks, opt) is not None
    train_step(chunks, opt, [batch], ctx, seq_length=SEQ)
    return {"new": sorted(_threads() - before)}


@pytest.mark.dist
@pytest.mark.skipif(
    torch.cuda.is_available() or not Path("/proc/self/task").is_dir(), reason="CPU/Linux only"
)
def test_checkpoint_io_starts_no_openmp_team(tmp_path: Path) -> None:
    """dist-checkpointing gathers its save/load plans (~40 kB) with gloo; unguarded, a gloo
    thread then starts its own OpenMP worker, and libgomp throttles the trainer's threads for
    the rest of the run (parallel.serial_gloo_workers). Guarded, no thread appears."""
    (unguarded,) = run_distributed(_save_load_threads, 1, str(tmp_path / "u"), False)
    assert unguarded["new"], "expected the unguarded plan exchange to start an OpenMP worker"
    (guarded,) = run_distributed(_save_load_threads, 1, str(tmp_path / "g"), True)
    assert guarded["new"] == []


def test_resume_rules_classify_changed_settings(tmp_path: Path) -> None:
    """Per key: free, stage length (schedule re-derived), fixed, or refused unless allowed."""
    from megatron_autothink.config import dump_config, load_config
    from megatron_autothink.train.resume import Decision, ResumeRefused, decide

    saved = dump_config(load_config("tiny_cpu"))

    def check(*overrides: str, total: int = 100, saved_total: int | None = 100) -> Decision:
        cfg = load_config("tiny_cpu", list(overrides))
        return decide(saved, cfg, total_steps=total, saved_total_steps=saved_total, where=tmp_path)

    free = check("logging.run_dir=elsewhere", "train.log_every=5", "parallel.tp=2")
    assert free.free == ["logging.run_dir", "parallel.tp", "train.log_every"]
    assert not free.reapply_schedule
    longer = check("train.steps=200", total=200)
    assert longer.reapply_schedule and "train.steps" in longer.accepted
    with pytest.raises(ResumeRefused, match=r"train.seed: 1234 -> 7.*train.init_from"):
        check("train.seed=7", "checkpoint.allow_changes=[train]")  # never, even when listed
    with pytest.raises(ResumeRefused, match=r"data.seq_length: .* -> 64.*allow_changes=\[data"):
        check("data.seq_length=64")
    allowed = check("optim.lr=5e-4", "checkpoint.allow_changes=[optim]")
    assert allowed.accepted == ["optim.lr"] and allowed.reapply_schedule
