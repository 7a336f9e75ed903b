"""models/varlen.py: attention within length-grouped segments equals SDPA with a block-diagonal
mask (values and gradients, causal or not, GQA, segments out of length order), also through
``SDPAAttention`` for a batch of packed rows; bad segment descriptions are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_autothink.models import varlen
from megatron_autothink.models.attention import SDPAAttention
from megatron_autothink.models.masks import block_diagonal_mask, packed_causal_mask
from megatron_autothink.models.varlen import bucketed_attention, segment_buckets


def _masked_reference(q, k, v, cu, causal):  # type: ignore[no-untyped-def]
    """SDPA over the whole sequence with a block-diagonal (causal) mask; [T, h, d] in and out."""
    total = q.shape[0]
    mask = block_diagonal_mask(cu, total)[0, 0]  # True = masked
    if causal:
        mask = mask | torch.ones(total, total, dtype=torch.bool).triu(1)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=~mask
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("groups", [4, 2])  # 4 heads: no GQA, and GQA 4/2
def test_equals_block_diagonal_masked_attention(causal: bool, groups: int) -> None:
    g = torch.Generator().manual_seed(0)
    # lengths 3, 5, 1, 3, 5, 2: three buckets, tokens out of bucket order (perm needed)
    cu = torch.tensor([0, 3, 8, 9, 12, 17, 19])
    total = int(cu[-1])
    q0 = torch.randn(total, 4, 8, generator=g, dtype=torch.float64)
    k0 = torch.randn(total, groups, 8, generator=g, dtype=torch.float64)
    v0 = torch.randn(total, groups, 8, generator=g, dtype=torch.float64)
    seg = segment_buckets(cu)
    assert seg.buckets == [(1, 1), (2, 1), (3, 2), (5, 2)] and seg.perm is not None
    ins = [[t.clone().requires_grad_(True) for t in (q0, k0, v0)] for _ in range(2)]
    ref = _masked_reference(*ins[0], cu, causal)
    got = bucketed_attention(*ins[1], seg, causal=causal, enable_gqa=groups != 4)
    torch.testing.assert_close(got, ref)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref.backward(grad)
    got.backward(grad)
    for a, b in zip(ins[0], ins[1], strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(b.grad, a.grad)


def test_sdpa_attention_takes_segments_for_packed_rows() -> None:
    """Two packed rows (lengths 3+5 and 6+2), causal: segments equal the packed causal mask."""
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2)
    attn = SDPAAttention(cfg, 1, AttnMaskType.causal, "self").eval()
    g = torch.Generator().manual_seed(1)
    s, b = 8, 2
    q = torch.randn(s, b, 4, 8, generator=g)
    k, v = (torch.randn(s, b, 2, 8, generator=g) for _ in range(2))
    seg_ids = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 2, 2]])
    ref = attn(q, k, v, packed_causal_mask(seg_ids))
    # batch-major token order: row 0's segments, then row 1's
    got = attn(q, k, v, None, packed_seq_params=segment_buckets(torch.tensor([0, 3, 8, 14, 16])))
    assert got.shape == ref.shape == (s, b, 32)
    torch.testing.assert_close(got, ref)


def test_bad_segments_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        segment_buckets(torch.tensor([0, 2, 2, 5]))
    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2)
    attn = SDPAAttention(cfg, 1, AttnMaskType.padding, "self")
    x = torch.randn(4, 1, 2, 8)
    with pytest.raises(ValueError, match="cover 5 tokens, the batch holds 1 x 4"):
        attn(x, x, x, None, packed_seq_params=segment_buckets(torch.tensor([0, 5])))
    from megatron.core.packed_seq_params import PackedSeqParams

    with pytest.raises(ValueError, match="SegmentBuckets"):
        attn(x, x, x, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))


def _model_mask_vs_segments() -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    from tests.models.model_utils import build_tiny_model, loss_and_grads, synthetic_batch

    cfg, model = build_tiny_model(3)
    # row 1 packs two samples and ends in padding; row 0 holds the image (vision segments)
    batch = synthetic_batch(2, 64, cfg.model.vocab_size, 3, with_image=True)
    assert batch.segment_ids[1].unique().tolist() == [0, 1, 2]
    mask = packed_causal_mask(batch.segment_ids)
    return {
        "mask": loss_and_grads(model, batch, mask),
        "segments": loss_and_grads(
            model, batch, packed_seq_params=varlen.packed_row_segments(batch.segment_ids)
        ),
    }


def test_tiny_vlm_segments_equal_the_packed_mask() -> None:
    """The training path (segments) computes what the block-diagonal mask computes."""
    from tests.dist_utils import run_distributed

    (got,) = run_distributed(_model_mask_vs_segments, 1)
    (loss_m, grads_m), (loss_s, grads_s) = got["mask"], got["segments"]
    torch.testing.assert_close(loss_s, loss_m, atol=1e-6, rtol=1e-6)
    assert grads_m.keys() == grads_s.keys() and any("vision" in n for n in grads_s)
    for name in grads_m:
        torch.testing.assert_close(grads_s[name], grads_m[name], atol=1e-5, rtol=1e-5)
