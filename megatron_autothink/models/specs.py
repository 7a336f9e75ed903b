"""Layer specs: which megatron-core modules make up a transformer layer.

The model code never branches on the backend; it receives a ``ModuleSpec``. Two backends:

* ``local``: megatron-core's own column/row-parallel linears, ``torch.nn.RMSNorm`` (via
  megatron's ``WrappedTorchNorm``) and :class:`SDPAAttention`. Runs on CPU and GPU.
* ``transformer_engine``: TE's fused layernorm-linear, TE attention and FP8-capable linears
  (Hopper). Chosen by ``model.transformer_impl`` (``auto`` = TE when importable and CUDA is
  present). Not exercisable on CPU-only machines.
"""

from __future__ import annotations

import importlib.util

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_autothink.models.attention import SDPAAttention


def te_available() -> bool:
    """Transformer Engine importable and a GPU present."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_impl(impl: str) -> str:
    """``auto`` -> ``transformer_engine`` or ``local``; refuse TE where it cannot run."""
    if impl == "auto":
        return "transformer_engine" if te_available() else "local"
    if impl == "transformer_engine" and not te_available():
        raise RuntimeError(
            "model.transformer_impl=transformer_engine needs transformer_engine and a CUDA GPU; "
            "use model.transformer_impl=local (or auto)"
        )
    return impl


def local_layer_spec(causal: bool = True) -> ModuleSpec:
    """Local backend layer: RMSNorm -> SDPA self-attention -> RMSNorm -> gated MLP."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal if causal else AttnMaskType.padding},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPAAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=_bda(),
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                ),
            ),
            mlp_bda=_bda(),
        ),
    )


def _bda():  # type: ignore[no-untyped-def]
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    return get_bias_dropout_add


def te_layer_spec() -> ModuleSpec:
    """Transformer Engine layer (GPU): fused norm+linear, TE attention, FP8-capable GEMMs."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")


def language_layer_spec(impl: str) -> ModuleSpec:
    return te_layer_spec() if resolve_impl(impl) == "transformer_engine" else local_layer_spec()


def vision_layer_spec() -> ModuleSpec:
    # The vision tower is small and needs per-block masks (windows vs. whole image); the local
    # spec with SDPA serves it on every device.
    return local_layer_spec(causal=False)
