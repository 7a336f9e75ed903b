"""Attention over variable-length segments, batched by length, with no mask.

Qwen2.5-VL's vision tower attends inside windows of 4 x 4 merged tokens (64 patches at the 3B
config's 112-pixel window) in most blocks and inside each whole image in the rest. Written as a
block-diagonal mask over all N patches of a micro-batch, every layer computes (and stores the
mask for) N x N scores of which only the blocks survive: at the 3B recipe's largest image (5120
patches) in one micro-batch, 80 times the window layers' real work per image, and it grows with
the number of images packed together. Hugging Face's SDPA path instead loops over the segments
in Python, one small attention call per window.

Here the segments are grouped by length: all segments of one length ``L`` are one unmasked SDPA
call on ``[n_L, heads, L, head_dim]``. Windows of one image mostly share a length (only edge
windows differ), so a layer runs one to a few attention calls whatever the number of images, on
the CPU flash kernel or the CUDA flash kernel alike, and exactly equals the masked computation.
The grouping is built once per forward (:func:`segment_buckets`) and reused by every layer; it
travels to megatron's attention as :class:`SegmentBuckets`, a ``PackedSeqParams`` in ``sbhd``
format, which megatron's ``SelfAttention`` hands to its ``core_attention`` untouched (the
``thd`` format would restart rotary positions at every segment).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor


@dataclass
class SegmentBuckets(PackedSeqParams):
    """Segments of a flattened (batch-major) token sequence, grouped by length.

    ``buckets``: ``(length L, count n)`` per distinct length, in the order their tokens appear
    after ``perm``. ``perm``: ``[T]`` token indices that make each bucket contiguous (None when
    the tokens already are in that order); ``inverse``: its inverse permutation.
    """

    buckets: list[tuple[int, int]] = field(default_factory=list)
    perm: Tensor | None = None  # [T] long
    inverse: Tensor | None = None  # [T] long


def segment_buckets(cu_seqlens: Tensor, device: torch.device | str | None = None) -> SegmentBuckets:
    """Group the segments ``cu_seqlens`` delimits by length.

    Args:
        cu_seqlens: ``[K+1]`` cumulative segment lengths, starting at 0 (host tensor: the
            grouping reads it; building it once per forward keeps device syncs out of layers).
        device: where the permutation tensors go (the activations' device).

    >>> b = segment_buckets(torch.tensor([0, 2, 5, 7]))
    >>> b.buckets, b.perm.tolist(), b.inverse.tolist()
    ([(2, 2), (3, 1)], [0, 1, 5, 6, 2, 3, 4], [0, 1, 4, 5, 6, 2, 3])
    >>> segment_buckets(torch.tensor([0, 3, 6])).perm is None  # already grouped: no copies
    True
    """
    cu = cu_seqlens.detach().to("cpu", torch.long)
    lengths = cu[1:] - cu[:-1]
    if bool((lengths <= 0).any()):
        raise ValueError(f"segment lengths must be positive, got {lengths.tolist()}")
    total = int(cu[-1])
    buckets: list[tuple[int, int]] = []
    pieces: list[Tensor] = []
    for length in torch.unique(lengths).tolist():  # sorted
        starts = cu[:-1][lengths == length]
        buckets.append((int(length), len(starts)))
        pieces.append((starts[:, None] + torch.arange(length)).flatten())
    perm = torch.cat(pieces)
    params = SegmentBuckets(
        qkv_format="sbhd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=int(lengths.max()),
        max_seqlen_kv=int(lengths.max()),
        buckets=buckets,
    )
    if not torch.equal(perm, torch.arange(total)):
        params.perm = perm.to(device)
        params.inverse = torch.argsort(perm).to(device)
    return params


def packed_row_segments(segment_ids: Tensor) -> SegmentBuckets:
    """The language model's segments for packed rows, tokens flattened batch-major.

    Args:
        segment_ids: ``[B, S]``, 1..k for the k samples of a row, 0 for padding.

    Every packed sample is a segment; every padding token is a segment of its own (it attends to
    itself only, as in :func:`~megatron_autothink.models.masks.packed_causal_mask`). With causal
    attention inside each segment this equals that mask.

    >>> seg = packed_row_segments(torch.tensor([[1, 1, 2, 0], [1, 1, 1, 1]]))
    >>> seg.cu_seqlens_q.tolist(), seg.buckets
    ([0, 2, 3, 4, 8], [(1, 2), (2, 1), (4, 1)])
    """
    ids = segment_ids.detach().to("cpu")
    rows, seq = ids.shape
    flat = ids.flatten()
    starts = torch.ones_like(flat, dtype=torch.bool)
    # a new segment where the id changes, at every padding token and at every row start
    starts[1:] = (flat[1:] != flat[:-1]) | (flat[1:] == 0)
    starts[::seq] = True
    cu = torch.cat([starts.nonzero().flatten(), torch.tensor([rows * seq])])
    return segment_buckets(cu, segment_ids.device)


def bucketed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segments: SegmentBuckets,
    causal: bool,
    scale: float | None = None,
    dropout_p: float = 0.0,
    enable_gqa: bool = False,
) -> Tensor:
    """Attention inside each segment, one SDPA call per segment length.

    Args:
        q: ``[T, heads, d]``; k, v: ``[T, groups, d]``, tokens in the order ``segments`` was
            built for (T = total length).
        causal: causal attention inside each segment (else full).

    Returns ``[T, heads, d]``, equal to SDPA over the whole sequence with a block-diagonal
    (causal) mask.

    >>> x = torch.randn(5, 2, 4)
    >>> seg = segment_buckets(torch.tensor([0, 3, 4, 5]))  # lengths 3, 1, 1
    >>> out = bucketed_attention(x, x, x, seg, causal=False)
    >>> torch.allclose(out[3:], x[3:])  # a segment of one token attends to itself only
    True
    """
    if segments.perm is not None:
        q, k, v = (t.index_select(0, segments.perm) for t in (q, k, v))
    outs = []
    start = 0
    for length, count in segments.buckets:
        end = start + length * count
        # [n*L, h, d] -> [n, L, h, d] viewed as [n, h, L, d]: tokens stay contiguous per head
        # row, the layout the CPU flash kernel walks (no copy).
        qs, ks, vs = (t[start:end].unflatten(0, (count, length)).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(
            qs,
            ks,
            vs,
            dropout_p=dropout_p,
            is_causal=causal and length > 1,
            scale=scale,
            enable_gqa=enable_gqa,
        )
        outs.append(o.transpose(1, 2).flatten(0, 1))
        start = end
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if segments.inverse is not None:
        out = out.index_select(0, segments.inverse)
    return out
