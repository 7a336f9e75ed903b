"""Decoder attention masks: the block-diagonal mask of one-sample rows gives the logits of SDPA's
fused causal kernel (no mask)."""

from __future__ import annotations

import doctest

import torch

from megatron_autothink.models import masks
from tests.dist_utils import run_distributed
from tests.models.model_utils import IMAGE_TOKEN


def test_doctests() -> None:
    result = doctest.testmod(masks)
    assert result.attempted > 0 and result.failed == 0


def _logits_both_ways() -> tuple[torch.Tensor, torch.Tensor]:
    from megatron_autothink.config import load_config
    from megatron_autothink.parallel import init_distributed, seed_everything
    from megatron_autothink.train.setup import build_model_chunks

    cfg = load_config("tiny_cpu")
    ctx = init_distributed(cfg)
    seed_everything(0, ctx)
    (model,) = build_model_chunks(cfg, ctx, vocab_size=512, image_token_id=IMAGE_TOKEN)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, 500, (2, 64), generator=g)
    pos = torch.arange(64).expand(3, 2, 64).contiguous()
    seg = torch.ones(2, 64, dtype=torch.long)
    with torch.no_grad():
        explicit = model(tokens, pos, masks.packed_causal_mask(seg))
        fused = model(tokens, pos, None)  # SDPA's is_causal kernel
    return explicit, fused


def test_causal_kernel_matches_the_explicit_mask() -> None:
    ((explicit, fused),) = run_distributed(_logits_both_ways, 1)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)
