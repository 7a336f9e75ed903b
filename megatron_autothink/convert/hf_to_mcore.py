"""HF Qwen2.5-VL directory -> megatron dist-checkpoint of our model.

Output layout (``out_dir``)::

    metadata.json, .metadata, common.pt, __*.distcp   megatron dist-checkpoint (torch_dist)
    autothink_model.json                               ModelConfig, dtype, original HF config
    tokenizer/                                         tokenizer, processor, chat template,
                                                       generation config (copied as-is)

The checkpoint is written from a TP=1/PP=1 model (or, under ``torchrun``, from the layout asked
for); megatron's dist-checkpointing reshards it on load to any TP/PP the model allows (the vocabulary padding, which depends on TP, is re-padded by
megatron: the embedding and output layer are saved with ``allow_shape_mismatch``).

Everything that can be checked from file headers (architecture, names, shapes, index/shard
consistency) is checked before the model is built; tensors are then read one at a time.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from megatron_autothink.config import ModelConfig
from megatron_autothink.convert.runtime import conversion_context
from megatron_autothink.convert.source import META_NAME, TOKENIZER_SUBDIR, write_meta
from megatron_autothink.weights.hf_config import model_config_from_hf, read_hf_config
from megatron_autothink.weights.hf_io import HFCheckpoint, copy_hf_assets
from megatron_autothink.weights.live import unwrap
from megatron_autothink.weights.load import load_hf_weights
from megatron_autothink.weights.mapping import (
    ConversionError,
    canonical_hf_name,
    check_hf_names,
    weight_specs,
)

__all__ = ["hf_to_mcore", "inspect_hf_dir"]


def inspect_hf_dir(hf_dir: str | Path) -> tuple[ModelConfig, HFCheckpoint]:
    """Validate a HF directory without reading any tensor: config, weight files, names, shapes.

    Raises :class:`~megatron_autothink.weights.mapping.ConversionError` naming the problem.
    """
    raw = read_hf_config(hf_dir)
    model_cfg = model_config_from_hf(raw)
    ckpt = HFCheckpoint(hf_dir)
    raw_of = {canonical_hf_name(n): n for n in ckpt}
    check_hf_names(list(raw_of), model_cfg)
    for spec in weight_specs(model_cfg):
        for name, want in zip(spec.hf, spec.hf_shapes, strict=True):
            got = ckpt.shape(raw_of[name])
            if got != want:
                raise ConversionError(
                    f"shape mismatch vs config: {raw_of[name]} has shape {got} in "
                    f"{hf_dir}, config.json implies {want}"
                )
            if not ckpt.dtype(raw_of[name]).is_floating_point:
                raise ConversionError(
                    f"{raw_of[name]}: dtype {ckpt.dtype(raw_of[name])} is not float"
                )
    return model_cfg, ckpt


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        # Megatron's files (also those of an interrupted save) or our side-car.
        markers = (META_NAME, "metadata.json", ".metadata", "common.pt")
        looks_ours = any((out_dir / m).exists() for m in markers) or any(out_dir.glob("*.distcp"))
        if not overwrite:
            raise ConversionError(f"{out_dir} is not empty (pass overwrite=True / --overwrite)")
        if not looks_ours:
            raise ConversionError(
                f"{out_dir} is not empty and does not look like a megatron checkpoint; refusing "
                "to delete it even with --overwrite"
            )
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    tp: int = 1,
    pp: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a local HF Qwen2.5-VL directory into a megatron dist-checkpoint; return ``out_dir``.

    Args:
        hf_dir: directory with ``config.json`` and safetensors weights (single or sharded).
        out_dir: checkpoint directory to create (must be empty unless ``overwrite``).
        dtype: ``torch.float32`` or ``torch.bfloat16``; default: bf16 if the HF weights are bf16,
            else fp32 (fp16 weights are widened, losslessly).
        tp, pp: layout to build at. 1/1 in one process; under ``torchrun`` each rank builds and
            reads only its shard, so a model larger than one process's memory can be converted.
            The checkpoint loads at any layout either way.
        overwrite: replace an existing checkpoint in ``out_dir``.
        progress: tqdm progress bar (rank 0).
    """
    from megatron_autothink.checkpoint_io import save_dist
    from megatron_autothink.train.setup import build_model_chunks

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    model_cfg, ckpt = inspect_hf_dir(hf_dir)
    if dtype is None:
        embed = next(n for n in ckpt if canonical_hf_name(n).endswith("embed_tokens.weight"))
        dtype = torch.bfloat16 if ckpt.dtype(embed) == torch.bfloat16 else torch.float32
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConversionError(f"unsupported checkpoint dtype {dtype}; use float32 or bfloat16")
    precision: Literal["fp32", "bf16"] = "bf16" if dtype == torch.bfloat16 else "fp32"
    with conversion_context(model_cfg, tp=tp, pp=pp, precision=precision) as (cfg, ctx):
        if ctx.rank == 0:
            _prepare_out_dir(out_dir, overwrite)
        if ctx.world_size > 1:
            dist.barrier()
        chunks = build_model_chunks(
            cfg, ctx, vocab_size=model_cfg.vocab_size, image_token_id=model_cfg.image_token_id
        )
        load_hf_weights(chunks, ckpt, model_cfg, ctx, progress=progress and ctx.rank == 0)
        ckpt.close()
        sharded = {f"chunk{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}
        save_dist(sharded, out_dir)
        del chunks, sharded
        if ctx.rank == 0:
            raw = read_hf_config(hf_dir)
            write_meta(out_dir, model_cfg, dtype=dtype, hf_config=raw, source=str(hf_dir))
            if not copy_hf_assets(hf_dir, out_dir / TOKENIZER_SUBDIR):
                (out_dir / TOKENIZER_SUBDIR).rmdir()
        if ctx.world_size > 1:
            dist.barrier()
    return out_dir
