"""Everything but the weights of a Hugging Face model directory.

``config.json`` and ``generation_config.json`` from our model config, the tokenizer and processor
files (copied from the tokenizer directory), ``preprocessor_config.json`` for the image processor,
and ``chat_template.jinja`` (:data:`~megatron_autothink.modes.CHAT_TEMPLATE`, thinking modes auto
/ long / short). Written by export (``autothink convert mcore-to-hf``) and by the RL stage for
the directory its vLLM engine starts from, so both load the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from megatron_autothink.config import ModelConfig
from megatron_autothink.data.image_processing import (
    ImageProcessingConfig,
    write_preprocessor_config,
    write_video_preprocessor_config,
)
from megatron_autothink.modes import CHAT_TEMPLATE
from megatron_autothink.weights.hf_config import hf_config_from_model
from megatron_autothink.weights.hf_io import copy_hf_assets

__all__ = ["write_hf_assets"]


def write_hf_assets(
    out_dir: Path,
    model_cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    hf_base: dict[str, Any] | None,
    tokenizer_dir: Path | None,
    chat_template: Literal["thinking", "keep"] = "thinking",
    image: ImageProcessingConfig | None = None,
    config: Any = None,
) -> None:
    """config.json, generation_config.json, tokenizer/processor files and the chat template.

    ``image`` writes ``preprocessor_config.json`` (else it is copied from ``tokenizer_dir``, or
    written from the model's patch sizes when there is none: without it no image processor
    loads). ``config``: an already validated ``hf_config_from_model`` result.
    """
    from transformers import GenerationConfig

    if config is None:
        config = hf_config_from_model(
            model_cfg, base=hf_base, dtype=str(dtype).removeprefix("torch.")
        )
    config.save_pretrained(out_dir)
    skip = ("chat_template.json", "chat_template.jinja") if chat_template == "thinking" else ()
    copied = copy_hf_assets(tokenizer_dir, out_dir, skip=skip) if tokenizer_dir else []
    if "generation_config.json" not in copied:
        GenerationConfig.from_model_config(config.text_config).save_pretrained(out_dir)
    v = model_cfg.vision
    geometry = image or ImageProcessingConfig(
        patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size,
        merge_size=v.spatial_merge_size,
    )
    if image is not None or "preprocessor_config.json" not in copied:
        write_preprocessor_config(out_dir, geometry)
    if "video_preprocessor_config.json" not in copied:  # for stock AutoProcessor (torchvision)
        write_video_preprocessor_config(out_dir, geometry)
    if chat_template == "thinking":
        (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        # One source of truth: a template embedded in these files would shadow the .jinja file
        # in some loaders.
        for name in ("tokenizer_config.json", "processor_config.json"):
            path = out_dir / name
            if path.is_file():
                data = json.loads(path.read_text())
                if data.pop("chat_template", None) is not None:
                    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
