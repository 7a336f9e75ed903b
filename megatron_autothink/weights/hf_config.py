"""HF ``config.json`` <-> our :class:`~megatron_autothink.config.ModelConfig`.

Only the Qwen2.5-VL architecture is accepted, and only the variants our megatron model computes
exactly: features it does not implement (sliding-window attention, RoPE scaling, another
activation, a different vision RoPE base) are refused with the field that asks for them, rather
than converted into a model that silently computes something else.

``mrope_section`` is always read from the HF config (``text_config.rope_parameters`` in
transformers 5, ``rope_scaling`` in older files); a config without it is refused, because
transformers itself would fall back to a hard-coded ``[16, 24, 24]`` that only fits head_dim 128.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from megatron_autothink.config import ModelConfig, VisionConfig
from megatron_autothink.weights.mapping import ConversionError

__all__ = [
    "ARCHITECTURE",
    "MODEL_TYPE",
    "hf_config_from_model",
    "model_config_from_hf",
    "read_hf_config",
]

MODEL_TYPE = "qwen2_5_vl"
ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
_VISION_ROPE_THETA = 10000.0  # hard-coded in models/vision.py
_VISION_NORM_EPS = 1e-6  # hard-coded in HF's vision blocks and merger


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` of a local HF model directory."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: top level must be a JSON object")
    return raw


def _parse(raw: dict[str, Any]) -> Any:
    """transformers' own parsing (handles flat pre-v5 files and ``rope_scaling``)."""
    from transformers import Qwen2_5_VLConfig

    body = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return Qwen2_5_VLConfig(**body)
        except (TypeError, ValueError) as e:
            raise ConversionError(f"config.json is not a valid Qwen2.5-VL config: {e}") from e


def model_config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """Validate an HF Qwen2.5-VL config and translate it; refuse anything we would compute wrong."""
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or [ARCHITECTURE]
    if model_type != MODEL_TYPE or ARCHITECTURE not in archs:
        raise ConversionError(
            f"unknown architecture: model_type={model_type!r}, architectures={archs}; only "
            f"model_type={MODEL_TYPE!r} ({ARCHITECTURE}) is supported"
        )
    cfg = _parse(raw)
    t, v = cfg.text_config, cfg.vision_config
    rope = dict(t.rope_parameters or {})
    problems = []
    if t.hidden_act != "silu":
        problems.append(f"text_config.hidden_act={t.hidden_act!r} (only 'silu')")
    if v.hidden_act != "silu":
        problems.append(f"vision_config.hidden_act={v.hidden_act!r} (only 'silu')")
    if t.use_sliding_window:
        problems.append("text_config.use_sliding_window=true (sliding-window attention)")
    if rope.get("rope_type", "default") not in ("default", "mrope"):
        problems.append(f"rope_type={rope.get('rope_type')!r} (only plain multimodal RoPE)")
    if "mrope_section" not in rope:
        problems.append("no mrope_section in text_config.rope_parameters / rope_scaling")
    vrope = dict(v.rope_parameters or {})
    if float(vrope.get("rope_theta", _VISION_ROPE_THETA)) != _VISION_ROPE_THETA:
        problems.append(f"vision rope_theta={vrope.get('rope_theta')} (only {_VISION_ROPE_THETA})")
    if v.out_hidden_size != t.hidden_size:
        problems.append(
            f"vision_config.out_hidden_size={v.out_hidden_size} != text hidden_size={t.hidden_size}"
        )
    head_dim = getattr(t, "head_dim", None)
    if t.hidden_size % t.num_attention_heads or (
        head_dim is not None and head_dim != t.hidden_size // t.num_attention_heads
    ):
        problems.append("head_dim must equal hidden_size / num_attention_heads")
    if not all(isinstance(x, int) for x in (v.patch_size, v.temporal_patch_size)):
        problems.append("vision patch_size / temporal_patch_size must be integers")
    kv = t.num_key_value_heads or t.num_attention_heads
    if t.num_attention_heads % kv:
        problems.append(f"num_key_value_heads={kv} must divide num_attention_heads")
    if problems:
        raise ConversionError("unsupported Qwen2.5-VL config:\n  " + "\n  ".join(problems))
    mrope = [int(x) for x in rope["mrope_section"]]
    hd = t.hidden_size // t.num_attention_heads
    if sum(mrope) * 2 != hd:
        raise ConversionError(
            f"config contradicts itself: mrope_section {mrope} sums to {sum(mrope)}, "
            f"head_dim/2 is {hd // 2}"
        )
    return ModelConfig(
        name=str(raw.get("_name_or_path") or "qwen2.5-vl"),
        num_layers=t.num_hidden_layers,
        hidden_size=t.hidden_size,
        ffn_hidden_size=t.intermediate_size,
        num_attention_heads=t.num_attention_heads,
        num_query_groups=kv,
        vocab_size=t.vocab_size,
        max_position_embeddings=t.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", 1_000_000.0)),
        mrope_section=mrope,
        rms_norm_eps=float(t.rms_norm_eps),
        add_qkv_bias=True,  # Qwen2.5-VL's q/k/v projections always carry a bias
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
        image_token_id=int(cfg.image_token_id),
        vision=VisionConfig(
            depth=v.depth,
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_heads=v.num_heads,
            patch_size=int(v.patch_size),
            temporal_patch_size=int(v.temporal_patch_size),
            in_channels=v.in_channels,
            spatial_merge_size=v.spatial_merge_size,
            window_size=v.window_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes),
            rms_norm_eps=_VISION_NORM_EPS,
        ),
    )


def hf_config_from_model(
    cfg: ModelConfig, *, base: dict[str, Any] | None = None, dtype: str = "bfloat16"
) -> Any:
    """A ``Qwen2_5_VLConfig`` for ``cfg``.

    Shapes come from ``cfg``; everything our model does not describe (special token ids,
    ``tokens_per_second``, bos/eos) comes from ``base`` (the original HF config, kept next to
    converted checkpoints) or transformers' defaults. The result is re-read with
    :func:`model_config_from_hf` and must reproduce ``cfg``.
    """
    from transformers import Qwen2_5_VLConfig

    if cfg.vision.rms_norm_eps != _VISION_NORM_EPS:
        raise ConversionError(
            f"model.vision.rms_norm_eps={cfg.vision.rms_norm_eps}: HF's vision tower hard-codes "
            f"{_VISION_NORM_EPS}"
        )
    if not cfg.add_qkv_bias:
        raise ConversionError(
            "model.add_qkv_bias=false has no Qwen2.5-VL equivalent (its q/k/v projections always "
            "have a bias)"
        )
    if cfg.image_token_id < 0:
        raise ConversionError("model.image_token_id must be set (>= 0) to export a HF config")
    src = _parse(dict(base or {}, model_type=MODEL_TYPE)).to_dict() if base else {}
    text = dict(src.get("text_config") or {})
    vision = dict(src.get("vision_config") or {})
    for key in ("model_type", "transformers_version", "layer_types", "dtype", "torch_dtype"):
        text.pop(key, None)
        vision.pop(key, None)
    text.update(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        use_sliding_window=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": cfg.rope_theta,
            "mrope_section": list(cfg.mrope_section),
        },
    )
    v = cfg.vision
    vision.update(
        depth=v.depth,
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_heads=v.num_heads,
        hidden_act="silu",
        in_channels=v.in_channels,
        patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size,
        spatial_merge_size=v.spatial_merge_size,
        window_size=v.window_size,
        fullatt_block_indexes=list(v.fullatt_block_indexes),
        out_hidden_size=cfg.hidden_size,
        rope_parameters={"rope_type": "axial", "rope_theta": _VISION_ROPE_THETA},
    )
    top = {
        k: src[k]
        for k in ("video_token_id", "vision_start_token_id", "vision_end_token_id")
        if k in src
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=cfg.image_token_id,
            tie_word_embeddings=cfg.tie_word_embeddings,
            architectures=[ARCHITECTURE],
            dtype=dtype,
            **top,
        )
    again = model_config_from_hf(dict(out.to_dict(), model_type=MODEL_TYPE))
    mine = cfg.model_dump(
        exclude={"name", "transformer_impl", "fp8", "recompute", "init_method_std"}
    )
    theirs = again.model_dump(
        exclude={"name", "transformer_impl", "fp8", "recompute", "init_method_std"}
    )
    theirs["make_vocab_size_divisible_by"] = mine["make_vocab_size_divisible_by"]
    if mine != theirs:
        diff = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs.get(k)}
        raise ConversionError(f"HF config does not reproduce the model config: {diff}")
    return out
