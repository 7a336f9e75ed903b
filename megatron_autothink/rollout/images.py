"""Image inputs of Qwen2.5-VL requests: preprocessing and placeholder bookkeeping.

No vLLM import here, so the trainer side (and tests computing reference log-probs) can share the
exact preprocessing the rollout engine uses.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from megatron_autothink.rollout.types import PreprocessedImages


@functools.lru_cache(maxsize=8)
def load_image_processor(model_dir: str, **kwargs: Any) -> Any:
    """The model directory's Qwen2-VL image processor with the PIL backend (cached).

    The PIL backend (``Qwen2VLImageProcessorPil``) is what transformers itself falls back to
    without torchvision; using it explicitly keeps the choice independent of what is installed.

    Args:
        model_dir: Directory holding ``preprocessor_config.json``.
        **kwargs: Hashable overrides such as ``min_pixels``/``max_pixels``.

    Returns:
        A ``Qwen2VLImageProcessorPil``.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil.from_pretrained(model_dir, **kwargs)


def preprocess_images(model_dir: str, images: Sequence[Any]) -> PreprocessedImages:
    """Run the model directory's image processor on PIL images.

    Args:
        model_dir: Model directory with ``preprocessor_config.json``.
        images: PIL images, in prompt order.

    Returns:
        ``pixel_values`` FloatTensor[N_patches, 1176] and ``image_grid_thw`` LongTensor[M, 3].
    """
    out = load_image_processor(model_dir)(images=list(images), return_tensors="pt")
    return PreprocessedImages(out["pixel_values"], out["image_grid_thw"])


def collapse_image_pads(token_ids: Sequence[int], image_pad_id: int) -> tuple[list[int], int]:
    """Collapse every run of consecutive ``image_pad_id`` tokens to a single pad.

    vLLM expands each single ``<|image_pad|>`` of a token prompt to the image's token count; a
    prompt already expanded by the HF processor (the trainer's format) would be expanded twice.

    Example:
        >>> collapse_image_pads([1, 5, 5, 5, 2, 5, 3], image_pad_id=5)
        ([1, 5, 2, 5, 3], 2)

    Args:
        token_ids: Prompt tokens.
        image_pad_id: Id of ``<|image_pad|>``.

    Returns:
        The collapsed prompt and the number of pad runs (= images referenced).
    """
    out: list[int] = []
    runs = 0
    for tok in token_ids:
        if tok == image_pad_id:
            if out and out[-1] == image_pad_id:
                continue
            runs += 1
        out.append(tok)
    return out, runs


def expand_image_pads(
    token_ids: Sequence[int], image_pad_id: int, tokens_per_image: Sequence[int]
) -> list[int]:
    """Inverse of :func:`collapse_image_pads`: the i-th pad run becomes ``tokens_per_image[i]``
    pads, which is the sequence layout the HF/Megatron model consumes.

    Example:
        >>> expand_image_pads([1, 5, 2, 5, 5, 3], image_pad_id=5, tokens_per_image=[3, 1])
        [1, 5, 5, 5, 2, 5, 3]

    Raises:
        ValueError: The number of pad runs differs from ``len(tokens_per_image)``.
    """
    collapsed, runs = collapse_image_pads(token_ids, image_pad_id)
    if runs != len(tokens_per_image):
        raise ValueError(f"prompt has {runs} image pad runs but {len(tokens_per_image)} images")
    out: list[int] = []
    image = 0
    for tok in collapsed:
        if tok == image_pad_id:
            out.extend([image_pad_id] * tokens_per_image[image])
            image += 1
        else:
            out.append(tok)
    return out
