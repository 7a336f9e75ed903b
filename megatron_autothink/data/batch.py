"""The typed hand-offs of the data path: what the trainer and the RL rollout receive."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from PIL import Image


@dataclass
class PackedBatch:
    """One micro-batch of packed SFT sequences (B rows of S tokens).

    Several samples are packed into each row; attention must stay within a segment and the
    multimodal RoPE positions restart at 0 for every packed sample.
    """

    tokens: torch.Tensor
    """LongTensor[B, S]: input ids, padded with the tokenizer's pad id."""
    labels: torch.Tensor
    """LongTensor[B, S]: ``labels[b, t] = tokens[b, t+1]`` within the same sample, else pad id."""
    loss_mask: torch.Tensor
    """FloatTensor[B, S]: 1.0 where ``labels[b, t]`` is an assistant token of the same sample."""
    position_ids: torch.Tensor
    """LongTensor[3, B, S]: Qwen2.5-VL mRoPE (t, h, w) positions, restarting per sample."""
    segment_ids: torch.Tensor
    """LongTensor[B, S]: 1..k for the k samples of a row, 0 for padding."""
    mode_ids: torch.Tensor
    """LongTensor[B, S]: 1 thinking, 0 non-thinking, -1 unknown / padding."""
    pixel_values: torch.Tensor | None = None
    """FloatTensor[N, 1176]: patches of all images of the micro-batch in order of appearance."""
    image_grid_thw: torch.Tensor | None = None
    """LongTensor[M, 3]: one (t, h, w) row per image, same order."""
    sample_ids: list[list[str]] = field(default_factory=list)
    """Per row, the ids of the packed samples (in row order)."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """Copy all tensors to ``device``."""
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=non_blocking)
            moved[f.name] = value
        return PackedBatch(**moved)

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens."""
        return int((self.segment_ids > 0).sum())


@dataclass
class PromptSample:
    """An RL prompt: the conversation up to (not including) the final assistant response.

    ``prompt`` ends with the generation prompt ``<|im_start|>assistant\\n`` (thinking mode
    ``auto``); append ``chat_template.PREFILLS["long" | "short"]`` to force a mode (BPO).
    """

    id: str
    prompt: str
    """Rendered prompt; each image expanded to its ``<|image_pad|>`` tokens (matches
    ``prompt_ids``)."""
    prompt_ids: list[int]
    """Token ids of ``prompt``."""
    vllm_prompt: str
    """The same prompt with ONE ``<|image_pad|>`` per image, as vLLM / HF processors expect."""
    images: list[Image.Image] = field(default_factory=list)
    """The stored RGB images (for vLLM's ``multi_modal_data``)."""
    image_bytes: list[bytes] = field(default_factory=list)
    """The same images encoded as stored in the shard (PNG/JPEG): what an SSR replay keeps and
    re-decodes, so the buffer never holds decoded pixels."""
    pixel_values: torch.Tensor | None = None
    """FloatTensor[N, 1176]: patches of this prompt's images (our preprocessing)."""
    image_grid_thw: torch.Tensor | None = None
    """LongTensor[M, 3]: grid per image."""
    answer: str | None = None
    """Ground truth for the reward."""
    answer_type: str | None = None
    """``number`` | ``expression`` | ``choice`` | ``text``."""
    difficulty: int | None = None
    source: str | None = None
