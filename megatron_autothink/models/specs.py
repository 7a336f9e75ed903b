"""Layer specs: which megatron-core modules make up a transformer layer.

The model code never branches on the backend; it receives a ``ModuleSpec``. Two backends:

* ``local``: megatron-core's column/row-parallel linears (subclassed to use torch's linear
  where they communicate nothing, :mod:`~megatron_autothink.models.linear`),
  :class:`RMSNorm` (``torch.nn.RMSNorm`` with a one-node backward), :class:`SDPAAttention` in
  :class:`LocalSelfAttention` and :class:`SwiGLU`. Runs on CPU and GPU.
* ``transformer_engine``: TE's fused layernorm-linear and FP8-capable linears (Hopper), with
  :class:`SDPAAttention` for packed rows (see :func:`te_layer_spec`). Chosen by
  ``model.transformer_impl`` (``auto`` = TE when importable and CUDA is present). Not
  exercisable on CPU-only machines.
"""

from __future__ import annotations

import importlib.util

import torch
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_autothink.config import ConfigError, ModelConfig
from megatron_autothink.models.attention import LocalSelfAttention, SDPAAttention
from megatron_autothink.models.linear import LocalColumnParallelLinear, LocalRowParallelLinear
from megatron_autothink.models.norm import RMSNorm
from megatron_autothink.models.swiglu import SwiGLU

FP8_MIN_CAPABILITY = (8, 9)
"""Transformer Engine runs FP8 GEMMs on compute capability 8.9 (Ada) and newer (Hopper: 9.0)."""


def te_importable() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def te_available() -> bool:
    """Transformer Engine importable and a GPU present."""
    return torch.cuda.is_available() and te_importable()


def resolve_impl(impl: str) -> str:
    """``auto`` -> ``transformer_engine`` or ``local``; refuse TE where it cannot run."""
    if impl == "auto":
        return "transformer_engine" if te_available() else "local"
    if impl == "transformer_engine" and not te_available():
        raise ConfigError(
            "model.transformer_impl=transformer_engine needs transformer_engine and a CUDA GPU; "
            "use model.transformer_impl=local (or auto)"
        )
    return impl


def resolve_backend(m: ModelConfig) -> str:
    """``model.transformer_impl`` resolved on this machine, with ``model.fp8`` checked against
    it. Called before any work starts (``autothink train``) and again when a model is built, so
    FP8 without Transformer Engine or without an FP8-capable GPU fails with a
    :class:`ConfigError` naming the field, never silently (``auto`` picks local layers on such
    a machine, which would quietly train without FP8)."""
    impl = resolve_impl(m.transformer_impl)
    if m.fp8 == "none":
        return impl
    need = (
        f"model.fp8={m.fp8} needs Transformer Engine layers on a GPU with compute capability >= "
        f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} (Hopper, Ada)"
    )
    if impl != "transformer_engine":
        missing = [
            what
            for what, ok in (
                ("transformer_engine is not installed", te_importable()),
                ("no CUDA GPU is available", torch.cuda.is_available()),
            )
            if not ok
        ] or [f"model.transformer_impl={m.transformer_impl}"]
        raise ConfigError(f"{need}, but {' and '.join(missing)}; set model.fp8=none")
    capability = torch.cuda.get_device_capability()
    if capability < FP8_MIN_CAPABILITY:
        raise ConfigError(
            f"{need}, but {torch.cuda.get_device_name()} has compute capability "
            f"{capability[0]}.{capability[1]}; set model.fp8=none"
        )
    return impl


# Checkpoint keys of the local layer's norms under Transformer Engine's names (TE fuses each norm
# into the following linear): a language model checkpointed with either backend loads into the
# other. megatron-core's own local GPT spec maps them the same way.
TE_NORM_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def local_layer_spec(causal: bool = True, te_checkpoint_keys: bool = True) -> ModuleSpec:
    """Local backend layer: RMSNorm -> SDPA self-attention -> RMSNorm -> gated MLP.

    The MLP's activation is :class:`SwiGLU` on the fused fc1 output. megatron's MLP builds a
    spec'd ``activation_func`` only when ``TransformerConfig.use_te_activation_func`` is set
    (named for TE, which supplies one there), and otherwise runs its unfused chunk-and-multiply;
    configs for this spec must set it (:func:`uses_spec_activation`).

    ``te_checkpoint_keys`` saves the norms under TE's names (:data:`TE_NORM_KEYS`); the vision
    tower, local with either backend, keeps its own names.
    """
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=LocalSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal if causal else AttnMaskType.padding},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=LocalColumnParallelLinear,
                    core_attention=SDPAAttention,
                    linear_proj=LocalRowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=_bda(),
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=LocalColumnParallelLinear,
                    activation_func=SwiGLU,  # used with config.use_te_activation_func (below)
                    linear_fc2=LocalRowParallelLinear,
                ),
            ),
            mlp_bda=_bda(),
            sharded_state_dict_keys_map=dict(TE_NORM_KEYS) if te_checkpoint_keys else {},
        ),
    )


def uses_spec_activation(impl: str) -> bool:
    """``TransformerConfig.use_te_activation_func`` for layers built with ``impl``'s spec.

    True for the local spec, whose MLP carries :class:`SwiGLU`. False for the TE spec: it has no
    activation submodule, and the flag would then make megatron apply plain ``silu`` to the
    whole fused tensor instead of gating.
    """
    return resolve_impl(impl) == "local"


def _bda():  # type: ignore[no-untyped-def]
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    return get_bias_dropout_add


def te_layer_spec() -> ModuleSpec:
    """Transformer Engine layer (GPU): fused norm+linear and FP8-capable GEMMs, with
    :class:`SDPAAttention` as the core attention.

    Why not TE's ``DotProductAttention``: our rows pack several samples, and megatron's TE spec
    builds it with ``attn_mask_type=causal``, under which TE ignores the ``attention_mask``
    argument (TE's docs: the mask "is only used when attn_mask_type includes padding or is
    arbitrary"), so packed samples would attend to each other. ``arbitrary`` masks run TE's
    unfused path (``S x S`` scores), and its ``thd`` packing restarts rotary positions per
    sample, which breaks mRoPE. SDPAAttention takes the packed samples as length-grouped
    segments (:mod:`~megatron_autothink.models.varlen`) and runs each group through torch's
    flash kernel on CUDA, exactly as tested on CPU.
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    spec = get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAAttention
    return spec


def language_layer_spec(impl: str) -> ModuleSpec:
    return te_layer_spec() if resolve_impl(impl) == "transformer_engine" else local_layer_spec()


def language_block_spec(impl: str, num_layers: int) -> ModuleSpec | TransformerBlockSubmodules:
    """The decoder: ``num_layers`` layers (this pipeline stage's) and, with the local backend,
    :class:`RMSNorm` as the final norm (megatron would pick ``torch.nn.RMSNorm`` itself)."""
    layer = language_layer_spec(impl)
    if resolve_impl(impl) == "transformer_engine":
        return layer
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=RMSNorm)


def vision_layer_spec() -> ModuleSpec:
    # The vision tower is small and needs per-block masks (windows vs. whole image); the local
    # spec with SDPA serves it on every device.
    return local_layer_spec(causal=False, te_checkpoint_keys=False)
