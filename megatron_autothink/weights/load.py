"""Load HF Qwen2.5-VL weights straight into live, TP/PP-sharded megatron model chunks.

Each rank builds, for each of *its* parameters, the full megatron tensor from the HF tensor(s)
(read lazily, so a pipeline stage only reads its own layers), cuts out its TP slice and copies it
in. No collective is needed, and no rank ever holds more than one full parameter beyond the model.
Used by ``hf-to-mcore`` (TP=1) and to start training from an HF directory at any TP/PP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

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
    Kind,
    canonical_view,
    check_hf_names,
    check_tied_lm_head,
    shard_for_tp,
    spec_to_megatron,
)

__all__ = ["load_hf_weights"]

_EMBEDDING = "language_model.embedding.word_embeddings.weight"


@torch.no_grad()
def load_hf_weights(
    model_chunks: Sequence[nn.Module],
    hf_state: Mapping[str, Tensor],
    model_cfg: ModelConfig,
    ctx: ParallelContext | None = None,
    *,
    progress: bool = False,
) -> int:
    """Copy HF weights into this rank's model chunks; return the number of parameters set.

    Args:
        model_chunks: this rank's chunks (DDP-wrapped or not), as from ``build_model_chunks``.
        hf_state: HF tensors under canonical or checkpoint names; may be lazy
            (:class:`~megatron_autothink.weights.hf_io.HFCheckpoint`).
        model_cfg: the architecture the chunks were built with.
        ctx: this rank's parallel context (its TP rank/size pick the slice); ``None``: TP=1.
        progress: show a tqdm bar.

    Every local parameter must have an HF source, and every HF tensor must be one the config
    expects (so a config that contradicts the checkpoint fails before anything is copied).
    """
    tp_rank, tp_size = (ctx.tp_rank, ctx.tp) if ctx is not None else (0, 1)
    state = canonical_view(hf_state)
    check_hf_names(list(state.keys()), model_cfg)
    specs = specs_for(model_cfg, model_chunks)
    todo: list[tuple[str, nn.Parameter]] = []
    for chunk in model_chunks:
        todo.extend(global_parameters(unwrap(chunk)).items())
    count = 0
    for name, param in tqdm(todo, desc="load HF weights", unit="param", disable=not progress):
        if name == TIED_OUTPUT and model_cfg.tie_word_embeddings:
            spec = specs[_EMBEDDING]
        elif name in specs:
            spec = specs[name]
        else:
            raise ConversionError(f"model parameter {name} has no HF counterpart in the mapping")
        check_tp_attributes(spec, param)
        hf_tensors = [state[n] for n in spec.hf]
        rows = param.shape[0] * tp_size if spec.kind is Kind.VOCAB else None
        full = spec_to_megatron(spec, hf_tensors, padded_vocab=rows)
        if spec.mcore == _EMBEDDING and model_cfg.tie_word_embeddings:
            check_tied_lm_head(state, hf_tensors[0])
        local = shard_for_tp(spec, full, tp_rank, tp_size)
        if local.shape != param.shape:
            raise ConversionError(
                f"{name}: HF gives a local shard of shape {tuple(local.shape)} at TP rank "
                f"{tp_rank}/{tp_size}, the model parameter is {tuple(param.shape)}"
            )
        param.copy_(local)
        count += 1
    return count
