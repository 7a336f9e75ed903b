"""Stream HF-named full tensors out of a live, TP/PP-sharded megatron model.

:func:`iter_hf_weights` is the one exporter: ``mcore-to-hf`` writes what it yields to safetensors,
and the rollout weight sync hands it to vLLM (``Iterable[(hf_name, Tensor)]``). It never holds
more than one full parameter (plus its TP shards) at a time, so the model is not materialised
twice.

How ownership works, per parameter of the mapping table, in table order:

1. The pipeline stage that owns it (found once, from a manifest every stage sends over the PP
   group) all-gathers the TP shards over ``ctx.pg.tp`` and re-assembles the full tensor
   (:func:`~megatron_autothink.weights.mapping.unshard_from_tp`; the gated ``linear_fc1`` is
   not a plain concatenation).
2. With PP > 1 the owner broadcasts the full tensor over ``ctx.pg.pp``, so **every rank yields
   every tensor**, in the same order. The collectives require every rank of the TP and PP groups
   to iterate to the end together; a caller that only needs one rank's output (say, global rank
   0 writing files) still drives the iterator on all ranks and drops what it does not use.
3. The full megatron tensor is turned into its HF tensor(s) (fused QKV split into q/k/v, gate/up
   split, patch embedding reshaped to Conv3d, vocabulary padding dropped) and yielded.

With tied embeddings and PP > 1 the last stage's copy of the embedding is skipped (HF has one
tensor). Data-parallel replicas each run their own groups and yield the same tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron_autothink.config import ModelConfig
from megatron_autothink.parallel import ParallelContext
from megatron_autothink.weights.live import (
    TIED_OUTPUT,
    check_tp_attributes,
    global_parameters,
    specs_for,
    unwrap,
)
from megatron_autothink.weights.mapping import (
    ConversionError,
    WeightSpec,
    checkpoint_hf_name,
    spec_to_hf,
    unshard_from_tp,
)

__all__ = ["iter_hf_weights"]

_Manifest = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _full_shape(spec: WeightSpec, local: Tensor, tp: int) -> tuple[int, ...]:
    shape = list(local.shape)
    if spec.tp_axis is not None:
        shape[spec.tp_axis] *= tp
    return tuple(shape)


def _owners(local: _Manifest, ctx: ParallelContext) -> tuple[dict[str, int], _Manifest]:
    """Which PP stage holds each parameter, and every parameter's full shape and dtype."""
    if ctx.pp == 1:
        return dict.fromkeys(local, 0), local
    manifests: list[_Manifest | None] = [None] * ctx.pp
    dist.all_gather_object(manifests, local, group=ctx.pg.pp)
    owner: dict[str, int] = {}
    merged: _Manifest = {}
    for stage, manifest in enumerate(manifests):
        assert manifest is not None
        for name, meta in manifest.items():
            if name in owner:
                raise ConversionError(
                    f"{name} is held by pipeline stages {owner[name]} and {stage}"
                )
            owner[name] = stage
            merged[name] = meta
    return owner, merged


def iter_hf_weights(
    model_chunks: Sequence[nn.Module],
    model_cfg: ModelConfig,
    ctx: ParallelContext,
    *,
    dtype: torch.dtype | None = None,
    names: Literal["canonical", "checkpoint"] = "canonical",
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(hf_name, full tensor)`` for the whole model, one tensor at a time, on every rank.

    Args:
        model_chunks: this rank's model chunks (one per virtual pipeline stage), optionally
            wrapped in megatron DDP / Float16Module.
        model_cfg: the architecture the chunks were built with.
        ctx: this rank's parallel context; ``ctx.pg.tp`` / ``ctx.pg.pp`` carry the collectives.
        dtype: cast each yielded tensor (e.g. ``torch.bfloat16`` for the rollout engine);
            ``None`` keeps the parameter dtype. Collectives run in the parameter dtype.
        names: ``canonical`` transformers module names (``model.language_model.layers.0...``,
            ``model.visual...``, ``lm_head.weight``), or ``checkpoint`` names as the Hub files
            store them (``model.layers.0...``, ``visual...``). vLLM accepts both.

    Yields:
        HF names and tensors on the parameters' device. Tensors may be views sharing storage
        with each other (q/k/v of one fused parameter) or with the live parameters (TP=1
        replicated tensors); copy before modifying them.

    Every rank of the TP and PP groups must call this and exhaust the iterator together.
    """
    if not model_cfg.add_qkv_bias:
        # HF / vLLM Qwen2.5-VL always have q/k/v biases; without ours they would keep stale ones.
        raise ConversionError("model.add_qkv_bias=false cannot be exported as Qwen2.5-VL")
    specs = specs_for(model_cfg, model_chunks)
    mine: dict[str, Tensor] = {}
    for chunk in model_chunks:
        for name, param in global_parameters(unwrap(chunk)).items():
            if name == TIED_OUTPUT and model_cfg.tie_word_embeddings:
                continue  # the last stage's copy of the embedding
            if name not in specs:
                raise ConversionError(
                    f"model parameter {name} has no HF counterpart in the mapping"
                )
            check_tp_attributes(specs[name], param)
            mine[name] = param.detach()
    local: _Manifest = {n: (_full_shape(specs[n], t, ctx.tp), t.dtype) for n, t in mine.items()}
    owner, meta = _owners(local, ctx)
    missing = [n for n in specs if n not in owner]
    if missing:
        raise ConversionError(
            f"{len(missing)} parameter(s) of the mapping are on no pipeline stage, e.g. "
            f"{missing[:3]}; were all chunks of this rank passed?"
        )
    for name, spec in specs.items():
        stage = owner[name]
        full: Tensor
        if stage == ctx.pp_rank:
            shard = mine[name].contiguous()
            if spec.tp_axis is not None and ctx.tp > 1:
                shards = [torch.empty_like(shard) for _ in range(ctx.tp)]
                dist.all_gather(shards, shard, group=ctx.pg.tp)
                full = unshard_from_tp(spec, shards)
            else:
                full = shard
        else:
            shape, dt = meta[name]
            full = torch.empty(shape, dtype=dt, device=ctx.device)
        if ctx.pp > 1:
            src = dist.get_global_rank(ctx.pg.pp, stage)
            dist.broadcast(full, src=src, group=ctx.pg.pp)
        for hf_name, tensor in spec_to_hf(spec, full):
            if dtype is not None:
                tensor = tensor.to(dtype)
            yield (checkpoint_hf_name(hf_name) if names == "checkpoint" else hf_name), tensor
