"""The name/layout table and its transforms, on random full tensors (no process groups).

The layout checks do not trust the mapping's own inverse: fused QKV is split the way megatron's
``SelfAttention.get_query_key_value_tensors`` splits it, and gate/up the way megatron's ``MLP``
``glu`` does on each TP rank.
"""

from __future__ import annotations

import doctest
import types

import pytest
import torch

from megatron_autothink.config import ModelConfig, VisionConfig
from megatron_autothink.weights import hf_io, mapping
from megatron_autothink.weights.mapping import (
    ConversionError,
    Kind,
    canonical_hf_name,
    checkpoint_hf_name,
    hf_to_megatron_full,
    megatron_full_to_hf,
    shard_for_tp,
    unshard_from_tp,
    weight_specs,
)


def _cfg(heads: int = 4, kv: int = 2, head_dim: int = 24, tie: bool = True) -> ModelConfig:
    return ModelConfig(
        num_layers=2,
        hidden_size=heads * head_dim,
        ffn_hidden_size=152,
        num_attention_heads=heads,
        num_query_groups=kv,
        vocab_size=1100,
        mrope_section=[2, 4, head_dim // 2 - 6],
        tie_word_embeddings=tie,
        vision=VisionConfig(hidden_size=48, intermediate_size=88, num_heads=4),
    )


def _random_hf(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=g)
        for spec in weight_specs(cfg)
        for name, shape in zip(spec.hf, spec.hf_shapes, strict=True)
    }


@pytest.mark.parametrize("module", [mapping, hf_io])
def test_doctests(module: types.ModuleType) -> None:
    assert doctest.testmod(module, raise_on_error=True).attempted >= 0


@pytest.mark.parametrize(("heads", "kv", "tie"), [(4, 2, True), (4, 1, False), (4, 4, True)])
def test_roundtrip_is_bit_exact(heads: int, kv: int, tie: bool) -> None:
    cfg = _cfg(heads, kv, tie=tie)
    hf = _random_hf(cfg)
    mc = hf_to_megatron_full(hf, cfg)
    assert mc["language_model.embedding.word_embeddings.weight"].shape[0] == 1152  # TP=1 padding
    assert ("language_model.output_layer.weight" in mc) is not tie
    back = dict(megatron_full_to_hf(mc, cfg))
    assert back.keys() == hf.keys()
    for name, t in hf.items():
        assert torch.equal(back[name], t), name


def test_checkpoint_names_are_accepted() -> None:
    cfg = _cfg()
    hf = {checkpoint_hf_name(k): v for k, v in _random_hf(cfg).items()}
    assert (
        "model.layers.0.self_attn.q_proj.weight" in hf and "visual.blocks.0.attn.qkv.weight" in hf
    )
    mc = hf_to_megatron_full(hf, cfg)
    back = dict(megatron_full_to_hf(mc, cfg))
    assert all(torch.equal(back[canonical_hf_name(k)], v) for k, v in hf.items())


def _megatron_split_qkv(fused: torch.Tensor, nh: int, ng: int) -> tuple[torch.Tensor, ...]:
    """megatron's SelfAttention.get_query_key_value_tensors on weight rows (TP=1)."""
    hd = fused.shape[0] // (nh + 2 * ng)
    g = fused.view(ng, (nh // ng + 2) * hd, -1)
    q, k, v = torch.split(g, [nh // ng * hd, hd, hd], dim=1)
    return q.reshape(nh * hd, -1), k.reshape(ng * hd, -1), v.reshape(ng * hd, -1)


@pytest.mark.parametrize(("heads", "kv"), [(4, 2), (4, 1), (4, 4), (6, 3)])
def test_fused_qkv_matches_megatron_split(heads: int, kv: int) -> None:
    cfg = _cfg(heads, kv)
    spec = next(s for s in weight_specs(cfg) if s.kind is Kind.QKV and s.mcore.endswith("weight"))
    q, k, v = (torch.randn(s) for s in spec.hf_shapes)
    fused = mapping.spec_to_megatron(spec, [q, k, v])
    mq, mk, mv = _megatron_split_qkv(fused, heads, kv)
    assert torch.equal(mq, q) and torch.equal(mk, k) and torch.equal(mv, v)


def test_vision_qkv_is_per_head_interleaved() -> None:
    cfg = _cfg()
    spec = next(s for s in weight_specs(cfg) if s.kind is Kind.VISION_QKV and "weight" in s.mcore)
    hf_qkv = torch.randn(spec.hf_shapes[0])  # HF: [q; k; v], all heads each
    q, k, v = hf_qkv.chunk(3)
    mq, mk, mv = _megatron_split_qkv(mapping.spec_to_megatron(spec, [hf_qkv]), 4, 4)
    assert torch.equal(mq, q) and torch.equal(mk, k) and torch.equal(mv, v)


def test_gate_up_tp_shards_match_megatron_glu() -> None:
    """Each TP rank's fc1 output is chunked in two by megatron's glu: [gate_r | up_r]."""
    cfg = _cfg()
    spec = next(s for s in weight_specs(cfg) if s.kind is Kind.GATE_UP and "language" in s.mcore)
    gate, up = (torch.randn(s) for s in spec.hf_shapes)
    full = mapping.spec_to_megatron(spec, [gate, up])
    for rank in range(2):
        local = shard_for_tp(spec, full, rank, 2)
        g_r, u_r = torch.chunk(local, 2, dim=0)
        assert torch.equal(g_r, gate.chunk(2)[rank]) and torch.equal(u_r, up.chunk(2)[rank])


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_shard_unshard_roundtrip(tp: int) -> None:
    cfg = _cfg(4, 4)
    mc = hf_to_megatron_full(_random_hf(cfg), cfg, padded_vocab=1280)
    for spec in weight_specs(cfg):
        full = mc[spec.mcore]
        shards = [shard_for_tp(spec, full, r, tp) for r in range(tp)]
        if spec.tp_axis is not None:
            assert shards[0].shape[spec.tp_axis] * tp == full.shape[spec.tp_axis]
        assert torch.equal(unshard_from_tp(spec, shards), full), spec.mcore


def test_conv3d_is_flattened_patch_linear() -> None:
    """Conv3d with kernel=stride over one pre-cut patch == our Linear on the flattened patch."""
    cfg = _cfg()
    spec = weight_specs(cfg)[0]
    conv = torch.nn.Conv3d(3, 48, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=False)
    patches = torch.randn(5, 3 * 2 * 14 * 14)
    ref = conv(patches.view(-1, 3, 2, 14, 14)).view(5, -1)
    w = mapping.spec_to_megatron(spec, [conv.weight.detach()])
    torch.testing.assert_close(patches @ w.t(), ref, atol=1e-5, rtol=1e-5)


def test_shape_mismatch_names_the_tensor() -> None:
    cfg = _cfg()
    hf = _random_hf(cfg)
    hf["model.language_model.layers.1.mlp.up_proj.weight"] = torch.randn(150, 96)
    with pytest.raises(
        ConversionError, match=r"shape mismatch vs config: .*layers\.1\.mlp\.up_proj"
    ):
        hf_to_megatron_full(hf, cfg)


def test_names_contradicting_config() -> None:
    cfg = _cfg(tie=False)
    hf = _random_hf(cfg)
    del hf["lm_head.weight"]
    with pytest.raises(ConversionError, match="tie_word_embeddings=false but there is no lm_head"):
        hf_to_megatron_full(hf, cfg)
    hf = _random_hf(_cfg().model_copy(update={"num_layers": 3}))
    with pytest.raises(ConversionError, match="weights have 3 language layers, config"):
        hf_to_megatron_full(hf, _cfg())


def test_tied_lm_head_must_equal_embedding() -> None:
    cfg = _cfg(tie=True)
    hf = _random_hf(cfg)
    hf["lm_head.weight"] = hf["model.language_model.embed_tokens.weight"].clone()
    hf_to_megatron_full(hf, cfg)  # an equal copy is fine
    hf["lm_head.weight"] += 1
    with pytest.raises(ConversionError, match=r"lm_head\.weight differs"):
        hf_to_megatron_full(hf, cfg)


def test_fused_norm_names_for_transformer_engine() -> None:
    names = {s.mcore for s in weight_specs(_cfg(), fused_norms=True)}
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "language_model.decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in names
    assert not any("input_layernorm" in n and n.startswith("language_model") for n in names)
    assert "vision.layers.0.input_layernorm.weight" in names  # the ViT always uses the local spec
