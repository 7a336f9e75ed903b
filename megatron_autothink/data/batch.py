"""The micro-batch contract between the data loader, the model and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class PackedBatch:
    tokens: Tensor  # [B, S] long, input ids; pad = tokenizer pad id
    labels: Tensor  # [B, S] long; labels[b, t] = tokens[b, t+1] within a sample, else ignored
    loss_mask: Tensor  # [B, S] float; 1.0 where labels[b, t] is an assistant token of that sample
    position_ids: Tensor  # [3, B, S] long; multimodal RoPE (t, h, w), restarting per sample
    segment_ids: Tensor  # [B, S] long; 1..k per packed sample, 0 = padding
    mode_ids: Tensor  # [B, S] long; 1 thinking, 0 non-thinking, -1 unknown/padding
    pixel_values: Tensor | None = None  # [N, 1176] float; all images' patches, in order
    image_grid_thw: Tensor | None = None  # [M, 3] long; one row per image, same order
    sample_ids: list[list[str]] = field(default_factory=list)  # per row, the packed sample ids

    def to(self, device: torch.device | str) -> PackedBatch:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return replace(
            self,
            tokens=self.tokens.to(device),
            labels=self.labels.to(device),
            loss_mask=self.loss_mask.to(device),
            position_ids=self.position_ids.to(device),
            segment_ids=self.segment_ids.to(device),
            mode_ids=self.mode_ids.to(device),
            pixel_values=mv(self.pixel_values),
            image_grid_thw=mv(self.image_grid_thw),
        )

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens (for throughput figures)."""
        return int((self.segment_ids > 0).sum())
