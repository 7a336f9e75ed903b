"""Attention masks from packing metadata. Convention: ``True`` = masked out (megatron's).

The model's training paths do not build these: they pass packed samples and vision windows as
length-grouped segments (:mod:`~megatron_autothink.models.varlen`). The masks are the reference
those segments are tested against, and a mask argument for callers that want one.
"""

from __future__ import annotations

import torch
from torch import Tensor


def packed_causal_mask(segment_ids: Tensor) -> Tensor:
    """Block-diagonal causal mask for packed rows.

    Args:
        segment_ids: ``[B, S]``, 1..k for the k samples of a row, 0 for padding.

    Returns:
        ``[B, 1, S, S]`` bool, True where query ``i`` may NOT attend to key ``j``. A padding
        query attends to itself only, so no row of the softmax is empty (NaN-free).

    >>> packed_causal_mask(torch.tensor([[1, 1, 2, 0]]))[0, 0].int().tolist()
    [[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]]
    """
    s = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = same & causal & (segment_ids[:, :, None] > 0)
    eye = torch.eye(s, dtype=torch.bool, device=segment_ids.device)
    allowed = allowed | (eye & (segment_ids[:, :, None] == 0))
    return ~allowed[:, None]


def block_diagonal_mask(cu_seqlens: Tensor, total: int) -> Tensor:
    """Non-causal block-diagonal mask ``[1, 1, total, total]`` from cumulative lengths.

    >>> block_diagonal_mask(torch.tensor([0, 2, 3]), 3)[0, 0].int().tolist()
    [[0, 0, 1], [0, 0, 1], [1, 1, 0]]
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    same = ids[:, None] == ids[None, :]
    return ~same[None, None]
