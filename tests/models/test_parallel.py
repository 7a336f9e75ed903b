"""TP / PP / DP on 2 gloo ranks give the same numbers as one rank.

A reference run (1 rank) builds the tiny VLM, saves it with megatron dist-checkpointing and
records logits and three optimizer steps; every parallel run loads that checkpoint (resharding
it to its own TP/PP layout) and must reproduce them.
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_autothink.config import load_config
from tests.dist_utils import run_distributed
from tests.models.model_utils import IMAGE_TOKEN, synthetic_batch

pytestmark = pytest.mark.dist

VOCAB = 1000
SEQ = 64
STEPS = 3


def _micro_batches(n: int, seed: int = 0) -> list:
    return [synthetic_batch(2, SEQ, VOCAB, seed + i) for i in range(n)]


def _worker(overrides: list[str], ckpt: str, save: bool, n_micro: int) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_autothink.models.masks import packed_causal_mask
    from megatron_autothink.parallel import init_distributed, seed_everything
    from megatron_autothink.train import setup
    from megatron_autothink.train.setup import build_model_chunks, build_optimizer, wrap_ddp
    from megatron_autothink.train.step import train_step

    cfg = load_config("tiny_cpu", ["data.micro_batch_size=2", *overrides])
    ctx = init_distributed(cfg)
    seed_everything(cfg.train.seed, ctx)
    chunks = build_model_chunks(cfg, ctx, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN)
    model = chunks[0]
    if save:
        dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
    out: dict = {}
    batch = _micro_batches(1, seed=100)[0]
    if ctx.pp == 1:
        with torch.no_grad():
            logits = model(
                batch.tokens,
                batch.position_ids,
                packed_causal_mask(batch.segment_ids),
                pixel_values=batch.pixel_values,
                image_grid_thw=batch.image_grid_thw,
            )
            # vocab-parallel -> full vocabulary
            out["logits"] = gather_from_tensor_model_parallel_region(logits)[..., :VOCAB]
    chunks = wrap_ddp(cfg, chunks, ctx)
    # DP=1 skips the distributed optimizer's identity param all-gather (train.setup); DP=2 runs it.
    out["param_gather_skipped"] = chunks[0].start_param_sync is setup._no_param_sync
    # ... and the grad reduce-scatter over one rank, keeping the rest of megatron's grad sync.
    out["grad_reduce_skipped"] = [
        getattr(g.start_grad_sync, "func", None) is setup._local_grad_sync
        for g in chunks[0].bucket_groups
    ]
    out["gloo_loops"] = _gloo_loop_threads()
    opt = build_optimizer(cfg, chunks, ctx, total_steps=STEPS)
    out["fused_adam"] = [
        g["fused"] for o in setup.inner_optimizers(opt.optimizer) for g in o.optimizer.param_groups
    ]
    all_mbs = _micro_batches(n_micro)
    # Each DP rank takes its contiguous share of the global batch's micro-batches.
    per_rank = n_micro // ctx.dp
    mine = all_mbs[ctx.dp_rank * per_rank : (ctx.dp_rank + 1) * per_rank]
    results = [train_step(chunks, opt, mine, ctx, seq_length=SEQ) for _ in range(STEPS)]
    out["loss"] = [r.loss for r in results]
    out["loss_thinking"] = [r.loss_thinking for r in results]
    out["grad_norm"] = [r.grad_norm for r in results]
    out["tokens"] = [r.tokens for r in results]
    return out


def _gloo_loop_threads() -> int:
    """Threads gloo's transport runs for its devices (Linux names them ``gloo_tcp_loop``)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            names.append(f.read().strip())
    return names.count("gloo_tcp_loop")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    ckpt = str(tmp_path_factory.mktemp("ref_ckpt"))
    (ref,) = run_distributed(_worker, 1, [], ckpt, True, 2)
    assert ref["param_gather_skipped"]
    assert ref["grad_reduce_skipped"] and all(ref["grad_reduce_skipped"])
    assert ref["fused_adam"] and all(ref["fused_adam"])  # torch's fused AdamW (train.setup)
    # megatron's ~20 gloo groups share one transport device, so one loop thread wakes every
    # 10 ms instead of one per group (parallel.one_gloo_device).
    assert ref["gloo_loops"] == 1
    return ckpt, ref


def _assert_same_training(ref: dict, got: dict, atol: float = 1e-5) -> None:
    assert got["tokens"] == ref["tokens"]
    torch.testing.assert_close(
        torch.tensor(got["loss"]), torch.tensor(ref["loss"]), atol=atol, rtol=0
    )
    torch.testing.assert_close(
        torch.tensor(got["grad_norm"]), torch.tensor(ref["grad_norm"]), atol=atol, rtol=1e-5
    )
    # The steps must actually train: loss moves between step 1 and 3.
    assert abs(ref["loss"][0] - ref["loss"][-1]) > 1e-3


def test_tp2_matches_tp1_logits_and_training_with_image(reference: tuple[str, dict]) -> None:
    ckpt, ref = reference
    ranks = run_distributed(_worker, 2, ["parallel.tp=2"], ckpt, False, 2)
    for got in ranks:
        torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-5, rtol=0)
        _assert_same_training(ref, got)


def test_pp2_matches_pp1_loss(reference: tuple[str, dict]) -> None:
    ckpt, ref = reference
    ranks = run_distributed(_worker, 2, ["parallel.pp=2"], ckpt, False, 2)
    for got in ranks:  # losses are broadcast from the last stage to every rank
        _assert_same_training(ref, got)


def test_dp2_matches_dp1_on_doubled_batch(reference: tuple[str, dict]) -> None:
    """Two DP ranks with one micro-batch each == one rank with both (gradients reduce-scattered
    by the distributed optimizer; equal grad norms and losses after every update)."""
    ckpt, ref = reference
    ranks = run_distributed(_worker, 2, ["data.global_batch_size=4"], ckpt, False, 2)
    for got in ranks:
        # The reference (DP=1) skipped the identity param all-gather and grad reduce-scatter;
        # DP=2 needs them, and the updates still match: the skips lose nothing.
        assert not got["param_gather_skipped"]
        assert not any(got["grad_reduce_skipped"])
        assert got["gloo_loops"] == 1  # two ranks' groups also share one device per process
        _assert_same_training(ref, got)


def test_dp_without_distributed_optimizer_matches(reference: tuple[str, dict]) -> None:
    """Plain megatron DDP (all-reduce, no optimizer sharding): one rank skips the identity
    all-reduce, two ranks run it, and both train exactly like the reference."""
    ckpt, ref = reference
    off = "parallel.distributed_optimizer=false"
    (one,) = run_distributed(_worker, 1, [off], ckpt, False, 2)
    assert one["grad_reduce_skipped"] and all(one["grad_reduce_skipped"])
    _assert_same_training(ref, one)
    for got in run_distributed(_worker, 2, [off, "data.global_batch_size=4"], ckpt, False, 2):
        assert not any(got["grad_reduce_skipped"])
        _assert_same_training(ref, got)
