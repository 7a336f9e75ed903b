"""Live (possibly TP/PP-sharded, DDP-wrapped) megatron model chunks <-> the mapping table.

Shared by :mod:`~megatron_autothink.weights.load` (HF -> live model) and
:mod:`~megatron_autothink.weights.gather` (live model -> HF): unwrap DDP / ``Float16Module``,
name each local parameter by its *global* name (pipeline stages and virtual stages hold decoder
layers ``0..k`` locally; their global index comes from the layer's own ``layer_number``, which
megatron sets from the pipeline layout, so uneven or interleaved layouts need no arithmetic here),
and check the table's TP split axis against the parameter's own megatron attributes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from megatron_autothink.config import ModelConfig
from megatron_autothink.models.qwen25vl import Qwen25VLModel
from megatron_autothink.weights.mapping import ConversionError, WeightSpec, weight_specs

__all__ = ["TIED_OUTPUT", "global_parameters", "specs_for", "unwrap", "uses_fused_norms"]

TIED_OUTPUT = "language_model.output_layer.weight"
"""With tied embeddings and PP > 1 the last stage keeps its own copy of the embedding under this
name (megatron keeps the copies equal by all-reducing their gradients). It is loaded from the HF
embedding and never exported: the first stage's embedding is the one HF tensor."""

_DECODER_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.+)$")


def unwrap(chunk: nn.Module) -> Qwen25VLModel:
    """Strip megatron DDP / Float16Module wrappers (``.module``) down to our model."""
    model = chunk
    while not isinstance(model, Qwen25VLModel) and isinstance(
        getattr(model, "module", None), nn.Module
    ):
        model = model.module  # type: ignore[assignment]
    if not isinstance(model, Qwen25VLModel):
        raise TypeError(f"expected a Qwen25VLModel chunk (optionally wrapped), got {type(chunk)}")
    return model


def global_parameters(model: Qwen25VLModel) -> dict[str, nn.Parameter]:
    """Local parameters of one chunk under their global (PP=1) megatron names."""
    layers = model.language_model.decoder.layers
    out: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        m = _DECODER_LAYER.match(name)
        if m:
            layer = layers[int(m.group(1))]
            name = f"language_model.decoder.layers.{layer.layer_number - 1}.{m.group(2)}"
        out[name] = param
    return out


def uses_fused_norms(chunks: Sequence[nn.Module]) -> bool:
    """Transformer Engine layers keep the RMSNorm weights inside linear_qkv / linear_fc1."""
    return any(
        n.endswith("linear_qkv.layer_norm_weight")
        for c in chunks
        for n, _ in unwrap(c).named_parameters()
    )


def specs_for(model_cfg: ModelConfig, chunks: Sequence[nn.Module]) -> dict[str, WeightSpec]:
    """The table keyed by megatron name, for the layer spec the chunks were built with."""
    return {s.mcore: s for s in weight_specs(model_cfg, fused_norms=uses_fused_norms(chunks))}


def check_tp_attributes(spec: WeightSpec, param: torch.Tensor) -> None:
    """The table's TP axis must be the one megatron shards this parameter along."""
    parallel = bool(getattr(param, "tensor_model_parallel", False))
    axis = getattr(param, "partition_dim", None) if parallel else None
    if axis != spec.tp_axis:
        raise ConversionError(
            f"mapping table says {spec.mcore} is split along {spec.tp_axis}, the model's parameter "
            f"along {axis}: update weights/mapping.py"
        )
