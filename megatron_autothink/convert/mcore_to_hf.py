"""Megatron dist-checkpoint of our model (saved at any TP/PP) -> HF Qwen2.5-VL directory.

The checkpoint is loaded into freshly built model chunks (megatron reshards it to the layout we
build: TP=1/PP=1 in one process, or the ``torchrun`` layout), then
:func:`~megatron_autothink.convert.gather.iter_hf_weights` streams HF tensors, which global rank
0 writes into size-bounded safetensors shards. Output::

    model-0000k-of-0000n.safetensors, model.safetensors.index.json
    config.json             Qwen2_5_VLConfig from our ModelConfig (mrope_section etc.)
    generation_config.json  copied, or derived from config.json
    tokenizer / processor files, copied from the checkpoint's tokenizer/ (or --tokenizer-dir)
    chat_template.jinja     Qwen2.5-VL template + thinking_mode auto/long/short

Tensor names are written as the Hub checkpoints store them (``model.layers.*``, ``visual.*``,
``lm_head.weight``), which is also what transformers' own ``save_pretrained`` writes; every
transformers version and vLLM load that layout.
"""

from __future__ import annotations

import json
import warnings
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
from megatron_autothink.convert.chat_template import THINKING_CHAT_TEMPLATE
from megatron_autothink.convert.gather import iter_hf_weights
from megatron_autothink.convert.hf_config import hf_config_from_model
from megatron_autothink.convert.hf_io import (
    INDEX_NAME,
    ShardedSafetensorsWriter,
    copy_hf_assets,
    parse_size,
)
from megatron_autothink.convert.live import unwrap
from megatron_autothink.convert.mapping import ConversionError, expected_hf_names
from megatron_autothink.convert.runtime import TOKENIZER_SUBDIR, conversion_context, read_meta

__all__ = ["checkpoint_dtype", "mcore_to_hf", "write_hf_assets"]

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


def write_hf_assets(
    out_dir: Path,
    model_cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    hf_base: dict[str, Any] | None,
    tokenizer_dir: Path | None,
    chat_template: Literal["thinking", "keep"] = "thinking",
) -> None:
    """config.json, generation_config.json, tokenizer/processor files and the chat template."""
    from transformers import GenerationConfig

    config = hf_config_from_model(model_cfg, base=hf_base, dtype=str(dtype).removeprefix("torch."))
    config.save_pretrained(out_dir)
    skip = ("chat_template.json", "chat_template.jinja") if chat_template == "thinking" else ()
    copied = copy_hf_assets(tokenizer_dir, out_dir, skip=skip) if tokenizer_dir else []
    if "generation_config.json" not in copied:
        GenerationConfig.from_model_config(config.text_config).save_pretrained(out_dir)
    if chat_template == "thinking":
        (out_dir / "chat_template.jinja").write_text(THINKING_CHAT_TEMPLATE)
        # One source of truth: a template embedded in these files would shadow the .jinja file
        # in some loaders.
        for name in ("tokenizer_config.json", "processor_config.json"):
            path = out_dir / name
            if path.is_file():
                data = json.loads(path.read_text())
                if data.pop("chat_template", None) is not None:
                    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConversionError(f"{out_dir} is not empty (pass overwrite=True / --overwrite)")
        # Stale shards from a larger model would otherwise sit next to the new index.
        for p in [*out_dir.glob("*.safetensors"), out_dir / INDEX_NAME]:
            p.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def mcore_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    model_cfg: ModelConfig | None = None,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    chat_template: Literal["thinking", "keep"] = "thinking",
    tp: int = 1,
    pp: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Export a megatron dist-checkpoint to a HF Qwen2.5-VL directory; return ``out_dir``.

    Args:
        ckpt_dir: the dist-checkpoint (any TP/PP it was saved at).
        out_dir: HF directory to write (must be empty unless ``overwrite``).
        model_cfg: architecture; default: from the checkpoint's ``autothink_model.json``
            (required for checkpoints without one, e.g. from a training run's recipe).
        tokenizer_dir: where tokenizer/processor files come from; default ``ckpt_dir/tokenizer``.
        dtype: dtype of the written tensors; default: the checkpoint's.
        max_shard_size: bound on each safetensors file (``"5GB"``, ``"500MB"`` or bytes).
        chat_template: ``thinking`` writes our template with ``thinking_mode``; ``keep`` copies
            the tokenizer directory's template unchanged.
        tp, pp: layout to load at; must match the launched world (``torchrun``) if > 1.
        overwrite: write into a non-empty ``out_dir``.
        progress: tqdm progress bar on rank 0.
    """
    from megatron_autothink.train.setup import build_model_chunks

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    meta = read_meta(ckpt_dir)
    verify_dist_dir(ckpt_dir)  # before any byte of it is used: a flipped block keeps the size
    if model_cfg is None:
        if meta is None:
            raise ConversionError(
                f"{ckpt_dir} has no autothink_model.json; pass the model config (--config RECIPE)"
            )
        model_cfg = ModelConfig.model_validate(meta["model"])
    stored = checkpoint_dtype(ckpt_dir)
    out_dtype = dtype or stored
    # The HF config's checks (image_token_id set, no option HF lacks) before minutes of loading
    # and writing weights, not after; write_hf_assets builds the same config again.
    hf_config_from_model(
        model_cfg,
        base=meta.get("hf_config") if meta else None,
        dtype=str(out_dtype).removeprefix("torch."),
    )
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else ckpt_dir / TOKENIZER_SUBDIR
    # Load in the stored precision (bf16 stays bf16: no 2x memory); anything else in fp32.
    precision: Literal["fp32", "bf16"] = "bf16" if stored == torch.bfloat16 else "fp32"
    with conversion_context(model_cfg, tp=tp, pp=pp, precision=precision) as (cfg, ctx):
        writer_rank = ctx.rank == 0
        if writer_rank:
            _prepare_out_dir(out_dir, overwrite)
        chunks = build_model_chunks(
            cfg, ctx, vocab_size=model_cfg.vocab_size, image_token_id=model_cfg.image_token_id
        )
        sharded = {f"chunk{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}
        loaded = load_dist(sharded, ckpt_dir, verify=False)
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[f"chunk{i}"])
        del loaded, sharded
        writer = (
            ShardedSafetensorsWriter(out_dir, parse_size(max_shard_size)) if writer_rank else None
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
            if not tok_dir.is_dir():
                warnings.warn(
                    f"no tokenizer directory ({tok_dir}); {out_dir} gets config and weights but no "
                    "tokenizer/processor files (pass tokenizer_dir / --tokenizer-dir)",
                    stacklevel=2,
                )
            write_hf_assets(
                out_dir,
                model_cfg,
                dtype=out_dtype,
                hf_base=meta.get("hf_config") if meta else None,
                tokenizer_dir=tok_dir if tok_dir.is_dir() else None,
                chat_template=chat_template,
            )
        if dist.is_initialized() and ctx.world_size > 1:
            dist.barrier()
    return out_dir
