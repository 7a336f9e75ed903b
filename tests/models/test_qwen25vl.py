"""The VLM's masked LM head (``MaskedHeadGPTModel``) against megatron's full head."""

from __future__ import annotations

from typing import Any

import torch

from tests.dist_utils import run_distributed
from tests.models.model_utils import build_tiny_model, loss_and_grads, synthetic_batch


def _one_rank() -> dict[str, Any]:
    cfg, model = build_tiny_model(seed=3)
    batch = synthetic_batch(2, 64, cfg.model.vocab_size, seed=3)
    out: dict[str, Any] = {"mask": batch.loss_mask}
    out["full"] = loss_and_grads(model, batch)
    out["masked"] = loss_and_grads(model, batch, loss_mask=batch.loss_mask)
    ones = torch.ones_like(batch.loss_mask)
    out["ones"] = loss_and_grads(model, batch, loss_mask=ones)[0]
    out["zeros"] = loss_and_grads(model, batch, loss_mask=torch.zeros_like(batch.loss_mask))
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
    cfg, model = build_tiny_model(seed=4, overrides=["parallel.tp=2"])
    batch = synthetic_batch(2, 64, cfg.model.vocab_size, seed=4)
    return {
        "mask": batch.loss_mask,
        "full": loss_and_grads(model, batch),
        "masked": loss_and_grads(model, batch, loss_mask=batch.loss_mask),
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
