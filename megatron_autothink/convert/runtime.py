"""Process-group set-up for the offline conversions, and the checkpoint's side-car metadata.

Conversions build the real model, so they need torch.distributed and megatron's parallel state
even in one process. :func:`conversion_context` creates them (a 1-rank gloo world, or whatever
``torchrun`` launched) unless the caller already has, and tears down only what it created.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_autothink.checkpoint_io import manifest
from megatron_autothink.config import (
    AutothinkConfig,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
)
from megatron_autothink.convert import source
from megatron_autothink.convert.mapping import ConversionError
from megatron_autothink.parallel import ParallelContext, destroy_distributed, init_distributed

__all__ = ["META_NAME", "conversion_context", "read_meta", "write_meta"]

META_NAME = source.META_NAME
"""Side-car file in converted megatron checkpoints: model config, vocab, dtype, source HF config."""
META_FORMAT = "megatron-autothink/qwen2.5-vl"
META_VERSION = 1
TOKENIZER_SUBDIR = source.TOKENIZER_SUBDIR
"""Tokenizer / processor / chat-template files of a converted checkpoint live here."""


@contextmanager
def conversion_context(
    model_cfg: ModelConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    precision: Literal["fp32", "bf16"] = "fp32",
) -> Iterator[tuple[AutothinkConfig, ParallelContext]]:
    """A run config and parallel context for building ``model_cfg`` at TP=``tp``, PP=``pp``
    (``vpp`` virtual stages per rank).

    World size 1 unless launched by torchrun/srun (``WORLD_SIZE``); extra ranks are data
    parallel. If megatron's groups already exist (a caller inside a training process), they are
    reused and must match ``tp``/``pp``.
    """
    world = (
        dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    )
    if world % (tp * pp):
        raise ConversionError(f"world size {world} is not a multiple of tp*pp={tp * pp}")
    dp = world // (tp * pp)
    backend = "auto" if torch.cuda.is_available() else "gloo"
    cfg = AutothinkConfig(
        model=model_cfg,
        parallel=ParallelConfig(
            tp=tp, pp=pp, vpp=vpp, backend=backend, distributed_optimizer=False
        ),
        data=DataConfig(micro_batch_size=1, global_batch_size=dp),
        train=TrainConfig(precision=precision),
    )
    created_dist = not dist.is_initialized()
    created_groups = created_dist or not parallel_state.model_parallel_is_initialized()
    ctx = init_distributed(cfg)
    try:
        if ctx.pg.tp.size() != tp or ctx.pg.pp.size() != pp:
            raise ConversionError(
                f"megatron is already initialised with tp={ctx.pg.tp.size()}, "
                f"pp={ctx.pg.pp.size()}; this conversion needs tp={tp}, pp={pp}"
            )
        yield cfg, ctx
    finally:
        # Undo exactly what we set up, so conversions can run one after another in one job.
        if created_dist:
            destroy_distributed()
        elif created_groups:
            parallel_state.destroy_model_parallel()


def write_meta(
    out_dir: Path,
    model_cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    hf_config: dict[str, Any] | None,
    source: str,
) -> None:
    """Write the side-car, with a manifest of the dist-checkpoint files beside it (sizes and
    CRCs, checked by ``checkpoint_io.verify_dist_dir`` before every load)."""
    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "model": model_cfg.model_dump(mode="json"),
        "dtype": str(dtype).removeprefix("torch."),
        "source": source,
        "hf_config": hf_config,
        "manifest": manifest(out_dir, exclude=(META_NAME, TOKENIZER_SUBDIR)),
    }
    (out_dir / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(ckpt_dir: Path) -> dict[str, Any] | None:
    """The side-car of a converted checkpoint, or None for a checkpoint without one."""
    path = ckpt_dir / META_NAME
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != META_FORMAT or int(meta.get("version", 0)) > META_VERSION:
        raise ConversionError(
            f"{path}: format {meta.get('format')!r} v{meta.get('version')} is not one this "
            f"version reads ({META_FORMAT!r} <= v{META_VERSION})"
        )
    return meta
