"""The RL prompt hand-off: one prompt with its images and ground truth (no packing)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image


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
    """Token ids of ``prompt`` (the trainer's layout)."""
    vllm_prompt: str
    """The same prompt with ONE ``<|image_pad|>`` per image, as vLLM / HF processors expect."""
    images: list[Image.Image] = field(default_factory=list)
    """The stored RGB images (for vLLM's ``multi_modal_data``)."""
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
