"""Qwen2.5-VL image preprocessing in numpy + PIL (no torchvision).

Reproduces HF ``Qwen2VLImageProcessorPil`` (the processor Qwen2.5-VL uses for still images):

1. convert to RGB;
2. :func:`smart_resize` to multiples of ``patch_size * merge_size`` (28) with the pixel count in
   ``[min_pixels, max_pixels]``, resized with PIL bicubic on uint8;
3. rescale by 1/255 and normalise with the CLIP mean/std;
4. patchify: the frame is repeated ``temporal_patch_size`` (2) times and cut into 14x14 patches
   ordered by 2x2 merge windows (so the vision tower's patch merger sees 4 neighbours in a row),
   each flattened as ``(channel, temporal, 14, 14)`` -> 3*2*14*14 = 1176 values.

The output is ``(pixel_values [h*w, 1176], grid_thw=(1, h, w))`` with ``h, w`` in patches; the
language model sees ``t*h*w // merge_size**2`` image tokens.

:func:`cap_image` is the prep-time step: it bounds the stored pixel count so shards stay small
and decoding stays cheap; the loader's ``max_pixels`` then decides the model resolution.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from megatron_autothink.config import AutothinkConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageProcessingConfig:
    """Settings of the Qwen2.5-VL image processor (HF defaults)."""

    min_pixels: int = 56 * 56
    """Lower bound on the resized pixel count."""
    max_pixels: int = 28 * 28 * 1280
    """Upper bound on the resized pixel count (1280 image tokens after merging)."""
    patch_size: int = 14
    """Spatial patch size of the vision tower."""
    temporal_patch_size: int = 2
    """Frames per temporal patch; a still image is repeated to fill it."""
    merge_size: int = 2
    """Spatial merge of the patch merger (2x2 patches -> one LM token)."""

    @property
    def factor(self) -> int:
        """Resize granularity in pixels."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch (3*2*14*14 = 1176 by default)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """Target size: multiples of ``factor``, pixel count in range, aspect ratio nearly kept.

    Same arithmetic as HF's ``smart_resize`` (round to the nearest multiple, then shrink or grow
    by the square root of the pixel ratio, flooring / ceiling to multiples).

    Example:
        >>> smart_resize(28, 84)  # 2352 px < 3136 -> grown
        (56, 112)
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_image(
    image: Image.Image, config: ImageProcessingConfig | None = None
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Turn one PIL image into Qwen2.5-VL patches.

    Args:
        image: Any PIL image (converted to RGB).
        config: Processor settings (HF defaults when ``None``).

    Returns:
        ``pixel_values`` float32 ``[t*h*w, 3*2*14*14]`` and ``grid_thw = (1, h, w)`` in patches.
    """
    cfg = config or ImageProcessingConfig()
    if image.mode != "RGB":
        image = image.convert("RGB")
    rh, rw = smart_resize(
        image.height, image.width, cfg.factor, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels
    )
    if (rh, rw) != (image.height, image.width):
        image = image.resize((rw, rh), resample=Image.Resampling.BICUBIC)
    # HF rescales in float64 and downcasts, then normalises in float32; same order here.
    arr = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32)
    std = np.asarray(OPENAI_CLIP_STD, dtype=np.float32)
    arr = ((arr - mean) / std).transpose(2, 0, 1)  # (C, H, W)

    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = rh // p, rw // p
    # (C, gh/m, m, p, gw/m, m, p) -> (gh/m, gw/m, m, m, C, p, p): merge windows outermost so the
    # 2x2 patches of one LM token are consecutive rows.
    patches = arr.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], tp, p, p))
    flat = np.ascontiguousarray(patches).reshape(gh * gw, 3 * tp * p * p)
    return torch.from_numpy(flat), (1, gh, gw)


def image_patches(
    images: list[Image.Image], config: ImageProcessingConfig
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[int]]:
    """All images of one sample: ``pixel_values [N, 1176]`` (rows of every image in order),
    ``image_grid_thw [M, 3]`` and the LM token count per image; ``(None, None, [])`` without
    images. The one path from decoded images to model inputs (the loaders and SSR replays,
    which re-decode the shard's bytes, share it, so a replay sees bit-identical pixels).
    """
    if not images:
        return None, None, []
    from megatron_autothink.data.packing import concat_rows

    pixels, grids = [], []
    for img in images:
        pv, grid = preprocess_image(img, config)
        pixels.append(pv)
        grids.append(grid)
    counts = [num_image_tokens(g, config.merge_size) for g in grids]
    return concat_rows(pixels), torch.tensor(grids, dtype=torch.long), counts


def num_image_tokens(grid_thw: tuple[int, int, int] | torch.Tensor, merge_size: int = 2) -> int:
    """LM tokens for one image grid: ``t*h*w // merge_size**2``.

    Example:
        >>> num_image_tokens((1, 4, 10))
        10
    """
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // (merge_size * merge_size)


def cap_image(image: Image.Image, max_pixels: int) -> Image.Image:
    """Downscale (never upscale) an image to at most ``max_pixels`` pixels, as RGB.

    Keeps the aspect ratio; both sides stay >= 1. Lanczos because this is a one-off quality
    downscale at prep time, not the model's resize.

    Example:
        >>> cap_image(Image.new("RGB", (400, 100)), 10_000).size
        (200, 50)
    """
    img = image if image.mode == "RGB" else image.convert("RGB")
    pixels = img.width * img.height
    if pixels <= max_pixels:
        return img
    scale = math.sqrt(max_pixels / pixels)
    w = max(1, math.floor(img.width * scale))
    h = max(1, math.floor(img.height * scale))
    return img.resize((w, h), resample=Image.Resampling.LANCZOS)


def encode_image(image: Image.Image, fmt: str = "png") -> bytes:
    """Encode an image for a shard (``png`` lossless, or ``jpeg`` at quality 95)."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", optimize=False)
    elif fmt in ("jpg", "jpeg"):
        image.save(buf, format="JPEG", quality=95)
    else:
        raise ValueError(f"unsupported image format {fmt!r}")
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (so truncated files fail here, not later) as RGB."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def write_preprocessor_config(out_dir: str | os.PathLike[str], cfg: ImageProcessingConfig) -> None:
    """``preprocessor_config.json`` of an HF Qwen2.5-VL directory matching ``cfg`` (what vLLM and
    transformers' ``Qwen2VLImageProcessor`` read)."""
    conf = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "min_pixels": cfg.min_pixels,
        "max_pixels": cfg.max_pixels,
        "size": {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
        "patch_size": cfg.patch_size,
        "temporal_patch_size": cfg.temporal_patch_size,
        "merge_size": cfg.merge_size,
        "processor_class": "Qwen2_5_VLProcessor",
    }
    path = os.path.join(os.fspath(out_dir), "preprocessor_config.json")
    with open(path, "w") as f:
        json.dump(conf, f, indent=2)


def write_video_preprocessor_config(
    out_dir: str | os.PathLike[str], cfg: ImageProcessingConfig
) -> None:
    """``video_preprocessor_config.json``: the stock video processor (``Qwen2VLVideoProcessor``)
    with the model's patch geometry, its own frame-size defaults. Stock ``AutoProcessor`` and
    vLLM load a Qwen2.5-VL processor with a video part (which needs torchvision); naming it
    here means they need not infer it from the image processor's name. Nothing here trains on
    video, and without torchvision nothing reads this file."""
    conf = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "patch_size": cfg.patch_size,
        "temporal_patch_size": cfg.temporal_patch_size,
        "merge_size": cfg.merge_size,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "processor_class": "Qwen2_5_VLProcessor",
    }
    path = os.path.join(os.fspath(out_dir), "video_preprocessor_config.json")
    with open(path, "w") as f:
        json.dump(conf, f, indent=2)


def image_config(cfg: AutothinkConfig) -> ImageProcessingConfig:
    """The image preprocessing of a recipe (data.min_pixels / data.max_pixels, model patches);
    the loaders, the rollout engine and exported HF dirs all use this one."""
    v = cfg.model.vision
    return ImageProcessingConfig(
        min_pixels=cfg.data.min_pixels,
        max_pixels=cfg.data.max_pixels,
        patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size,
        merge_size=v.spatial_merge_size,
    )
