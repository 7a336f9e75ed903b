"""Megatron dist-checkpoint of our model (saved at any TP/PP) -> HF Qwen2.5-VL directory.

The checkpoint is loaded into freshly built model chunks (megatron reshards it to the layout we
build: TP=1/PP=1 in one process, or the ``torchrun`` layout), then
:func:`~megatron_autothink.weights.gather.iter_hf_weights` streams HF tensors, which global rank
0 writes into size-bounded safetensors shards. Output::

    model-0000k-of-0000n.safetensors, model.safetensors.index.json
    config.json             Qwen2_5_VLConfig from our ModelConfig (mrope_section etc.)
    generation_config.json  copied, or derived from config.json
    tokenizer / processor files, copied from the checkpoint's tokenizer/ (or --tokenizer-dir)
    preprocessor_config.json  copied, or from the training run's data.min/max_pixels
    video_preprocessor_config.json  copied, or the stock video processor (stock AutoProcessor)
    chat_template.jinja     modes.CHAT_TEMPLATE: ChatML turns + thinking_mode auto/long/short

The source may be a converted checkpoint or a training run (see :mod:`.source`). For a training
run the special-token ids (bos/eos/pad/image/vision) come from its tokenizer, eos being the chat
template's end of turn (``<|im_end|>``) so ``generate`` stops. Everything that can be checked
without the weights (config, tokenizer, ids, output dir) is checked before anything is written,
and the directory is assembled next to ``out_dir`` and moved into place only when complete.

Tensor names are written as the Hub checkpoints store them (``model.layers.*``, ``visual.*``,
``lm_head.weight``), which is also what transformers' own ``save_pretrained`` writes; every
transformers version and vLLM load that layout.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_autothink.checkpoint_io import (
    CheckpointError,
    load_dist,
    read_dist_metadata,
    verify_dist_dir,
)
from megatron_autothink.config import ModelConfig
from megatron_autothink.convert.runtime import conversion_context
from megatron_autothink.convert.source import resolve_source
from megatron_autothink.data.image_processing import (
    image_config,
)
from megatron_autothink.parallel import ParallelContext
from megatron_autothink.weights.assets import write_hf_assets
from megatron_autothink.weights.gather import iter_hf_weights
from megatron_autothink.weights.hf_config import hf_config_from_model
from megatron_autothink.weights.hf_io import (
    INDEX_NAME,
    ShardedSafetensorsWriter,
    parse_size,
)
from megatron_autothink.weights.live import unwrap
from megatron_autothink.weights.mapping import ConversionError, expected_hf_names

__all__ = ["checkpoint_dtype", "mcore_to_hf"]

_EMBEDDING_KEY = "language_model.embedding.word_embeddings.weight"


def checkpoint_dtype(ckpt_dir: str | Path) -> torch.dtype:
    """dtype the dist-checkpoint stores the word embedding in (read from its metadata only)."""
    try:
        md = read_dist_metadata(ckpt_dir)
    except CheckpointError:
        raise
    except Exception as e:  # a missing / foreign file: say which directory
        raise ConversionError(f"{ckpt_dir}: not a readable megatron dist-checkpoint ({e})") from e
    entry: Any = md.state_dict_metadata.get(_EMBEDDING_KEY)
    if entry is None:
        raise ConversionError(f"{ckpt_dir}: checkpoint has no {_EMBEDDING_KEY}")
    return entry.properties.dtype


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConversionError(f"{out_dir} is not empty (pass overwrite=True / --overwrite)")


def _staging_dir(out_dir: Path) -> Path:
    """Where the export is assembled: next to ``out_dir`` (same filesystem: moves are renames)."""
    return out_dir.parent / f".{out_dir.name}.partial"


def _move_into_place(staging: Path, out_dir: Path) -> None:
    if not out_dir.exists() or not any(out_dir.iterdir()):
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
        return
    # --overwrite into a used directory: stale shards from a larger model would otherwise sit
    # next to the new index; files we do not write are left alone.
    for p in [*out_dir.glob("*.safetensors"), out_dir / INDEX_NAME]:
        p.unlink(missing_ok=True)
    for p in staging.iterdir():
        os.replace(p, out_dir / p.name)
    staging.rmdir()


@contextmanager
def _staged_output(out_dir: Path, ctx: ParallelContext) -> Iterator[Path]:
    """A staging dir next to ``out_dir`` that rank 0 writes into; moved into place when the
    body finishes, removed when it fails (no partial ``out_dir``). Other ranks wait until the
    directory is complete."""
    staging = _staging_dir(out_dir)
    writer = ctx.rank == 0
    if writer:
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed export
        staging.mkdir(parents=True)
    try:
        yield staging
        if writer:
            _move_into_place(staging, out_dir)
    finally:
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
    if dist.is_initialized() and ctx.world_size > 1:
        dist.barrier()


def _token_ids(tokenizer_dir: Path, model_cfg: ModelConfig) -> dict[str, Any]:
    """Special ids of the run's tokenizer, checked against the model (before any writing)."""
    from megatron_autothink.data.tokenizer import hf_token_ids, load_tokenizer

    try:
        tok = load_tokenizer(str(tokenizer_dir))
        ids = hf_token_ids(tok)
    except Exception as e:  # unreadable files, a tokenizer without the Qwen control tokens
        raise ConversionError(f"{tokenizer_dir}: not a usable tokenizer ({e})") from None
    if len(tok) > model_cfg.vocab_size:
        raise ConversionError(
            f"{tokenizer_dir} has {len(tok)} tokens, more than model.vocab_size="
            f"{model_cfg.vocab_size}: not the tokenizer this model was trained with"
        )
    if model_cfg.image_token_id >= 0 and model_cfg.image_token_id != ids["image_token_id"]:
        raise ConversionError(
            f"model.image_token_id={model_cfg.image_token_id} but <|image_pad|> of "
            f"{tokenizer_dir} is {ids['image_token_id']}: not the run's tokenizer"
        )
    return ids


def mcore_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    model_cfg: ModelConfig | None = None,
    tokenizer_dir: str | Path | None = None,
    stage: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    chat_template: Literal["thinking", "keep"] = "thinking",
    tp: int = 1,
    pp: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    announce: Any = None,
) -> Path:
    """Export a checkpoint to a HF Qwen2.5-VL directory; return ``out_dir``.

    Args:
        ckpt_dir: a converted dist-checkpoint, or a training run dir / stage dir / ``iter_N``
            dir (see :mod:`megatron_autothink.convert.source`); any TP/PP it was saved at.
        out_dir: HF directory to write (must be empty unless ``overwrite``).
        model_cfg: architecture; default: from the checkpoint (``autothink_model.json``, or the
            training checkpoint's ``meta.json``). Required for a bare dist-checkpoint.
        tokenizer_dir: where tokenizer/processor files come from; default ``ckpt_dir/tokenizer``
            for a converted checkpoint, the run's tokenizer for a training checkpoint.
        stage: for a run dir, the stage to export (default: the last one with a checkpoint).
        dtype: dtype of the written tensors; default: the checkpoint's.
        max_shard_size: bound on each safetensors file (``"5GB"``, ``"500MB"`` or bytes).
        chat_template: ``thinking`` writes our template with ``thinking_mode``; ``keep`` copies
            the tokenizer directory's template unchanged.
        tp, pp: layout to load at; must match the launched world (``torchrun``) if > 1.
        overwrite: write into a non-empty ``out_dir``.
        progress: tqdm progress bar on rank 0.
        announce: called with a line saying which checkpoint was picked (e.g. ``print``).
    """
    from megatron_autothink.train.setup import build_model_chunks

    out_dir = Path(out_dir)
    src = resolve_source(ckpt_dir, stage=stage, tokenizer_dir=tokenizer_dir)
    model_cfg = model_cfg or src.model_cfg
    verify_dist_dir(src.dist_dir)  # before any byte of it is used: a flipped block keeps the size
    if model_cfg is None:
        raise ConversionError(
            f"{src.ckpt_dir} has no autothink_model.json; pass the model config (--config RECIPE)"
        )
    tok_dir = src.tokenizer_dir if src.tokenizer_dir and src.tokenizer_dir.is_dir() else None
    hf_base = src.hf_base
    image = None
    if src.run_cfg is not None:  # a training run: ids and image preprocessing from the run
        assert tok_dir is not None, src.tokenizer_dir
        hf_base = _token_ids(tok_dir, model_cfg)
        model_cfg = model_cfg.model_copy(update={"image_token_id": hf_base["image_token_id"]})
        image = image_config(src.run_cfg)
    elif tok_dir is None:
        warnings.warn(
            f"no tokenizer directory ({src.tokenizer_dir}); {out_dir} gets config and weights but "
            "no tokenizer/processor files (pass tokenizer_dir / --tokenizer-dir)",
            stacklevel=2,
        )
    stored = checkpoint_dtype(src.dist_dir)
    out_dtype = dtype or stored
    # Validate before anything is written (raises ConversionError naming the field).
    hf_config = hf_config_from_model(
        model_cfg, base=hf_base, dtype=str(out_dtype).removeprefix("torch.")
    )
    _check_out_dir(out_dir, overwrite)
    if announce is not None:
        announce(f"exporting {src.description}")
    # Load in the stored precision (bf16 stays bf16: no 2x memory); anything else in fp32.
    precision: Literal["fp32", "bf16"] = "bf16" if stored == torch.bfloat16 else "fp32"
    ckpt_dir = src.dist_dir
    with (
        conversion_context(model_cfg, tp=tp, pp=pp, precision=precision) as (cfg, ctx),
        _staged_output(out_dir, ctx) as staging,
    ):
        writer_rank = ctx.rank == 0
        chunks = build_model_chunks(
            cfg, ctx, vocab_size=model_cfg.vocab_size, image_token_id=model_cfg.image_token_id
        )
        # Tensors are matched by their own sharded keys, not by these top-level ones, so this
        # reads converted ("chunk0") and training ("model", + optimizer) checkpoints alike.
        sharded = {f"chunk{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}
        loaded = load_dist(sharded, ckpt_dir, verify=False)
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[f"chunk{i}"])
        del loaded, sharded
        writer = (
            ShardedSafetensorsWriter(staging, parse_size(max_shard_size)) if writer_rank else None
        )
        names = sorted(expected_hf_names(model_cfg))
        bar = tqdm(
            total=len(names),
            desc="export HF",
            unit="tensor",
            disable=not (progress and writer_rank),
        )
        written = 0
        with torch.no_grad():
            for name, tensor in iter_hf_weights(
                chunks, model_cfg, ctx, dtype=out_dtype, names="checkpoint"
            ):
                if writer is not None:
                    writer.add(name, tensor)
                written += 1
                bar.update()
        bar.close()
        if written != len(names):
            raise ConversionError(f"exported {written} tensors, the config expects {len(names)}")
        if writer is not None:
            writer.close()
            write_hf_assets(
                staging,
                model_cfg,
                dtype=out_dtype,
                hf_base=hf_base,
                tokenizer_dir=tok_dir,
                chat_template=chat_template,
                image=image,
                config=hf_config,
            )
            (staging / "autothink_source.json").write_text(
                json.dumps({"checkpoint": str(src.ckpt_dir.resolve())}, indent=1) + "\n"
            )
    return out_dir
