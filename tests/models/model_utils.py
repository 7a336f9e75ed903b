"""Synthetic packed batches for model tests (a real image-token layout, random ids)."""

from __future__ import annotations

import torch

from megatron_autothink.data.batch import PackedBatch

IMAGE_TOKEN = 7


def synthetic_batch(
    rows: int, seq: int, vocab: int, seed: int, with_image: bool = True
) -> PackedBatch:
    """Row 0 holds one 1x4x4-patch image (4 merged tokens); odd rows pack two samples."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, vocab, (rows, seq), generator=g)
    pos = torch.zeros(3, rows, seq, dtype=torch.long)
    seg = torch.ones(rows, seq, dtype=torch.long)
    for r in range(rows):
        bounds = [(0, seq)] if r % 2 == 0 else [(0, seq // 2), (seq // 2, seq - 3)]
        seg[r] = 0
        for k, (a, b) in enumerate(bounds):
            seg[r, a:b] = k + 1
            pos[:, r, a:b] = torch.arange(b - a)
    pixels = grid = None
    if with_image:
        start = 3
        tokens[0, start : start + 4] = IMAGE_TOKEN
        hw = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
        pos[0, 0, start : start + 4] = start
        pos[1:, 0, start : start + 4] = start + hw.t()
        pos[:, 0, start + 4 :] = torch.arange(start + 2, start + 2 + seq - start - 4)
        pixels = torch.randn(16, 1176, generator=g)
        grid = torch.tensor([[1, 4, 4]])
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = (seg > 0).float()
    loss_mask[:, -1] = 0
    loss_mask[tokens == IMAGE_TOKEN] = 0
    mode_ids = torch.where(seg > 0, (torch.arange(rows)[:, None] % 2).expand(rows, seq), -1)
    return PackedBatch(
        tokens, labels, loss_mask, pos, seg, mode_ids, pixels, grid, [[] for _ in range(rows)]
    )
