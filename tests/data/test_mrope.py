"""mRoPE positions equal transformers' Qwen2.5-VL get_rope_index on unpacked samples."""

from __future__ import annotations

import pytest
import torch

from megatron_autothink.data.packing import mrope_position_ids

IMG = 7  # image pad id in these tests


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    text = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 64,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
    }
    vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": 16,
        "fullatt_block_indexes": [0],
    }
    cfg = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMG, bos_token_id=0, eos_token_id=1
    )
    return Qwen2_5_VLModel(cfg).eval()


def _sample(grids: list[tuple[int, int, int]], texts: list[int]) -> torch.Tensor:
    """texts[i] text tokens, then image i, ..., then texts[-1] tokens."""
    ids: list[int] = []
    for i, n in enumerate(texts):
        ids += list(range(10, 10 + n))
        if i < len(grids):
            t, h, w = grids[i]
            ids += [IMG] * (t * h * w // 4)
    return torch.tensor(ids)


@pytest.mark.parametrize(
    ("grids", "texts"),
    [
        ([], [9]),
        ([(1, 4, 6)], [3, 2]),
        ([(1, 2, 10), (1, 8, 4)], [5, 4, 6]),
        ([(1, 6, 6)], [0, 3]),  # image first
        ([(1, 4, 4)], [2, 0]),  # image last
    ],
)
def test_matches_transformers(hf_model, grids, texts) -> None:
    tokens = _sample(grids, texts)
    grid_t = torch.tensor(grids, dtype=torch.long) if grids else None
    ref, _ = hf_model.get_rope_index(
        tokens[None], mm_token_type_ids=(tokens[None] == IMG).int(), image_grid_thw=grid_t
    )
    ours = mrope_position_ids(tokens, grid_t, IMG, spatial_merge_size=2)
    assert torch.equal(ours, ref[:, 0])
    batched = mrope_position_ids(torch.stack([tokens, tokens]), (grids or []) * 2, IMG, 2)
    assert torch.equal(batched[:, 1], ref[:, 0])


def test_errors() -> None:
    with pytest.raises(ValueError, match="consecutive"):
        mrope_position_ids(torch.tensor([1, IMG, IMG, 2]), [(1, 4, 4)], IMG)
    with pytest.raises(ValueError, match="image grids"):
        mrope_position_ids(torch.tensor([1, 2]), [(1, 4, 4)], IMG)
    with pytest.raises(ValueError, match="more image"):
        mrope_position_ids(torch.tensor([IMG, IMG, IMG, IMG]), None, IMG)
