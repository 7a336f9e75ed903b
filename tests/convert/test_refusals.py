"""HF inputs we refuse, and the HF config translation (no process groups, no model build).

Each refusal must name the problem: a missing shard file, a pickle, a shape that contradicts
config.json, an unknown architecture, a config that contradicts the weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_autothink.convert.hf_to_mcore import inspect_hf_dir
from megatron_autothink.weights.hf_config import (
    hf_config_from_model,
    model_config_from_hf,
    read_hf_config,
)
from megatron_autothink.weights.hf_io import HFCheckpoint, ShardedSafetensorsWriter
from megatron_autothink.weights.mapping import ConversionError, hf_to_megatron_full
from tests.convert.hf_utils import TinySpec, save_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf")
    save_hf_model(TinySpec(tie=False), out)
    return out


@pytest.fixture
def copy(hf_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "hf"
    shutil.copytree(hf_dir, dst)
    return dst


def _edit_config(d: Path, **changes: Any) -> None:
    raw = json.loads((d / "config.json").read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    (d / "config.json").write_text(json.dumps(raw))


def _shard(d: Path) -> list[Path]:
    """Re-save the single file as several shards with an index."""
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    w = ShardedSafetensorsWriter(
        d, max_shard_bytes=sum(t.numel() * 4 for t in tensors.values()) // 2
    )
    for k, t in tensors.items():
        w.add(k, t)
    shards = w.close()
    assert len(shards) > 1
    return shards


def test_valid_dir_single_and_sharded(copy: Path) -> None:
    cfg, ckpt = inspect_hf_dir(copy)
    assert (cfg.num_query_groups, cfg.tie_word_embeddings, cfg.mrope_section) == (
        2,
        False,
        [2, 4, 6],
    )
    assert cfg.vision.fullatt_block_indexes == [1] and cfg.vision.window_size == 56
    _shard(copy)
    cfg2, ckpt2 = inspect_hf_dir(copy)
    assert cfg2 == cfg and set(ckpt2) == set(ckpt)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(ckpt2[name], ckpt[name])


def test_missing_shard_file_is_named(copy: Path) -> None:
    last = _shard(copy)[-1]
    last.unlink()
    with pytest.raises(ConversionError, match=f"missing: {last.name}"):
        HFCheckpoint(copy)


def test_index_listing_a_tensor_its_shard_lacks(copy: Path) -> None:
    first = _shard(copy)[0]
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first.name
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="lacks tensors its index lists"):
        HFCheckpoint(copy)


def test_pickles_are_refused(copy: Path) -> None:
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ConversionError, match="pickle-based weights"):
        HFCheckpoint(copy)


def test_shape_mismatch_vs_config(copy: Path) -> None:
    _edit_config(copy, text_config__intermediate_size=160)
    with pytest.raises(
        ConversionError, match=r"shape mismatch vs config: .*mlp\.(gate|up|down)_proj"
    ):
        inspect_hf_dir(copy)


def test_unknown_architecture(copy: Path) -> None:
    _edit_config(copy, model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"])
    with pytest.raises(ConversionError, match="unknown architecture: model_type='qwen2_vl'"):
        inspect_hf_dir(copy)


def test_config_contradicting_weights(copy: Path) -> None:
    _edit_config(copy, text_config__num_hidden_layers=1, text_config__layer_types=None)
    with pytest.raises(ConversionError, match="weights have 2 language layers"):
        inspect_hf_dir(copy)
    _edit_config(copy, text_config__num_hidden_layers=2, tie_word_embeddings=True)
    # untied weights (a distinct lm_head) under a config claiming tied embeddings
    tensors = dict(HFCheckpoint(copy))
    with pytest.raises(
        ConversionError, match=r"tie_word_embeddings=true but lm_head\.weight differs"
    ):
        hf_to_megatron_full(tensors, model_config_from_hf(read_hf_config(copy)))


def test_mrope_section_is_read_never_assumed(copy: Path) -> None:
    _edit_config(copy, text_config__rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    with pytest.raises(ConversionError, match="no mrope_section"):
        inspect_hf_dir(copy)
    _edit_config(copy, text_config__rope_parameters={"rope_theta": 1e6, "mrope_section": [4, 4, 4]})
    assert inspect_hf_dir(copy)[0].mrope_section == [4, 4, 4]
    _edit_config(copy, text_config__rope_parameters={"rope_theta": 1e6, "mrope_section": [4, 4, 2]})
    with pytest.raises(ConversionError, match=r"mrope_section .* sums to 10"):
        inspect_hf_dir(copy)


def test_unsupported_features_are_refused(copy: Path) -> None:
    _edit_config(copy, text_config__use_sliding_window=True)
    with pytest.raises(ConversionError, match="use_sliding_window"):
        inspect_hf_dir(copy)


def test_legacy_flat_config_with_rope_scaling(hf_dir: Path) -> None:
    """Pre-v5 Hub files: text fields at the top level, mrope_section under rope_scaling."""
    raw = read_hf_config(hf_dir)
    flat = {k: v for k, v in raw.items() if k != "text_config"}
    text = dict(raw["text_config"])
    rope = text.pop("rope_parameters")
    flat.update({k: v for k, v in text.items() if k not in ("model_type", "layer_types")})
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 4, 6]}
    assert model_config_from_hf(flat) == model_config_from_hf(raw)


def test_hf_config_roundtrip_keeps_token_ids(hf_dir: Path) -> None:
    raw = read_hf_config(hf_dir)
    cfg = model_config_from_hf(raw)
    out = hf_config_from_model(cfg, base=raw, dtype="float32").to_dict()
    assert model_config_from_hf(out) == cfg
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert out[key] == raw[key], key
    assert out["text_config"]["rope_parameters"]["mrope_section"] == [2, 4, 6]
    assert out["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]


def test_written_shards_and_index(tmp_path: Path) -> None:
    w = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=200)
    base = torch.arange(60, dtype=torch.float32)
    w.add("a", base[:20])  # views of one storage: the writer must copy them apart
    w.add("b", base[20:])
    w.add("c", torch.ones(3))  # fits next to b (160 + 12 <= 200 bytes)
    shards = w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert [p.name for p in shards] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert index["weight_map"] == {
        "a": shards[0].name,
        "b": shards[1].name,
        "c": shards[1].name,
    }
    assert torch.equal(HFCheckpoint(tmp_path)["b"], base[20:])
    save_file({"x": torch.ones(1)}, str(tmp_path / "stray.safetensors"))
    assert "x" not in HFCheckpoint(tmp_path)  # the index decides which files belong
