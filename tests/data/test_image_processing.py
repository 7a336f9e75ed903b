"""Our numpy/PIL Qwen2.5-VL preprocessing equals HF's PIL image processor."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from megatron_autothink.data.image_processing import (
    ImageProcessingConfig,
    cap_image,
    decode_image,
    encode_image,
    num_image_tokens,
    preprocess_image,
    smart_resize,
)


def _hf_processor(cfg: ImageProcessingConfig):
    # The slow/PIL processor: importable without torchvision (the fast one needs it).
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)


def _image(h: int, w: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    img = Image.fromarray(arr, mode="RGBA")
    return img if mode == "RGBA" else img.convert(mode)


@pytest.mark.parametrize(
    ("h", "w", "mode"),
    [
        (28, 84, "RGB"),
        (100, 37, "RGB"),
        (333, 517, "RGB"),
        (30, 900, "L"),
        (64, 64, "RGBA"),
        (50, 60, "P"),
        (1200, 1600, "RGB"),
    ],
)
def test_matches_transformers(h: int, w: int, mode: str) -> None:
    cfg = ImageProcessingConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 256)
    img = _image(h, w, mode, seed=h * w)
    ref = _hf_processor(cfg)(images=[img], return_tensors="np")
    pixels, grid = preprocess_image(img, cfg)
    assert tuple(ref["image_grid_thw"][0]) == grid
    assert pixels.shape == (grid[1] * grid[2], cfg.patch_dim) == ref["pixel_values"].shape
    assert np.abs(ref["pixel_values"] - pixels.numpy()).max() <= 1e-5


def test_default_config_matches_transformers_defaults() -> None:
    cfg = ImageProcessingConfig()
    img = _image(480, 640, "RGB", seed=1)
    ref = _hf_processor(cfg)(images=[img], return_tensors="np")
    pixels, grid = preprocess_image(img)
    assert tuple(ref["image_grid_thw"][0]) == grid
    assert np.abs(ref["pixel_values"] - pixels.numpy()).max() <= 1e-5
    assert num_image_tokens(grid) == grid[1] * grid[2] // 4


def test_smart_resize_bounds() -> None:
    for h, w in [(10, 10), (28, 28 * 50), (4000, 3000), (77, 13)]:
        rh, rw = smart_resize(h, w, 28, 56 * 56, 28 * 28 * 64)
        assert rh % 28 == 0 and rw % 28 == 0
        assert 56 * 56 <= rh * rw <= 28 * 28 * 64
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 300)


def test_cap_and_codec() -> None:
    img = _image(300, 400, "RGBA", seed=2)
    capped = cap_image(img, 30_000)
    assert capped.mode == "RGB" and capped.width * capped.height <= 30_000
    assert abs(capped.width / capped.height - 4 / 3) < 0.02
    small = cap_image(_image(10, 10, "RGB", seed=3), 30_000)
    assert small.size == (10, 10)  # never upscaled
    for fmt in ("png", "jpeg"):
        back = decode_image(encode_image(capped, fmt))
        assert back.size == capped.size and back.mode == "RGB"
    assert np.array_equal(np.asarray(decode_image(encode_image(capped))), np.asarray(capped))
    with pytest.raises(OSError):
        decode_image(encode_image(capped)[:100])  # truncated PNG fails at decode time
