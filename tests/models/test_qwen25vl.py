"""The VLM's masked LM head (``MaskedHeadGPTModel``) against megatron's full head."""

from __future__ import annotations

from typing import Any

import torch

from tests.dist_utils import run_distributed
from tests.models.model_utils import IMAGE_TOKEN, synthetic_batch


def _loss_and_grads(model: torch.nn.Module, batch: Any, **kw: Any) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model(
        batch.tokens,
        batch.position_ids,
        None,
        labels=batch.labels,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        **kw,
    )
    (loss * batch.loss_mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _build(cfg: Any, ctx: Any, seed: int, parallel: Any = None) -> torch.nn.Module:
    from megatron_autothink.models.qwen25vl import Qwen25VLModel
    from megatron_autothink.parallel import seed_everything

    seed_everything(seed, ctx)
    return Qwen25VLModel(
        cfg.model,
        parallel or cfg.parallel,
        vocab_size=cfg.model.vocab_size,
        image_token_id=IMAGE_TOKEN,
        pg_collection=ctx.pg,
    )


def _one_rank() -> dict[str, Any]:
    from megatron_autothink.config import load_config
    from megatron_autothink.parallel import init_distributed

    cfg = load_config("tiny_cpu", [])
    ctx = init_distributed(cfg)
    model = _build(cfg, ctx, seed=3)
    batch = synthetic_batch(2, 64, cfg.model.vocab_size, seed=3)
    out: dict[str, Any] = {"mask": batch.loss_mask}
    out["full"] = _loss_and_grads(model, batch)
    out["masked"] = _loss_and_grads(model, batch, loss_mask=batch.loss_mask)
    ones = torch.ones_like(batch.loss_mask)
    out["ones"] = _loss_and_grads(model, batch, loss_mask=ones)[0]
    out["zeros"] = _loss_and_grads(model, batch, loss_mask=torch.zeros_like(batch.loss_mask))
    return out


def test_masked_head_matches_full_head_and_its_gradients() -> None:
    (got,) = run_distributed(_one_rank, 1)
    mask = got["mask"].bool()
    assert 0 < int(mask.sum()) < mask.numel()  # image, padding and last tokens are masked
    (full, g_full), (masked, g_masked) = got["full"], got["masked"]
    torch.testing.assert_close(masked[mask], full[mask], atol=1e-6, rtol=1e-6)
    assert torch.all(masked[~mask] == 0) and torch.all(full[~mask] != 0)
    assert g_full.keys() == g_masked.keys()
    assert any("word_embeddings" in n for n in g_full)  # the tied head's weight
    assert any("vision" in n for n in g_full)
    for name in g_full:
        torch.testing.assert_close(g_masked[name], g_full[name], atol=1e-5, rtol=1e-5)
    # An all-ones mask takes megatron's own path: bit-identical to no mask.
    assert torch.equal(got["ones"], full)
    # No loss token at all (a DP rank's empty RL micro-batch): zeros, and backward still runs.
    zeros, g_zeros = got["zeros"]
    assert torch.all(zeros == 0)
    assert all(torch.all(g == 0) for g in g_zeros.values())


def _two_ranks() -> dict[str, Any]:
    from megatron_autothink.config import load_config
    from megatron_autothink.parallel import init_distributed

    cfg = load_config("tiny_cpu", ["parallel.tp=2"])
    ctx = init_distributed(cfg)
    model = _build(cfg, ctx, seed=4)
    batch = synthetic_batch(2, 64, cfg.model.vocab_size, seed=4)
    return {
        "mask": batch.loss_mask,
        "full": _loss_and_grads(model, batch),
        "masked": _loss_and_grads(model, batch, loss_mask=batch.loss_mask),
    }


def test_masked_head_under_tensor_parallel() -> None:
    """TP=2: the vocab-parallel head and cross entropy on the picked rows give megatron's loss
    and each rank's gradient shards. (Sequence parallelism keeps megatron's full head; it needs
    Transformer Engine layers, so it is not exercised on CPU.)"""
    for got in run_distributed(_two_ranks, 2):
        mask = got["mask"].bool()
        (full, g_full), (masked, g_masked) = got["full"], got["masked"]
        torch.testing.assert_close(masked[mask], full[mask], atol=1e-6, rtol=1e-6)
        assert torch.all(masked[~mask] == 0)
        assert g_full.keys() == g_masked.keys()
        for name in g_full:
            torch.testing.assert_close(g_masked[name], g_full[name], atol=1e-5, rtol=1e-5)
