"""The one table of names and layouts between our megatron model and HF Qwen2.5-VL.

Every other converter module (checkpoint conversion both ways, loading HF weights into a live
TP/PP-sharded model, gathering a live model for the rollout weight sync) works from
:func:`weight_specs`: one :class:`WeightSpec` per megatron parameter of a *full* model (TP=1,
PP=1, global layer indices), naming the HF tensor(s) it comes from, the layout transform between
them and the axis megatron splits it along for tensor parallelism.

Names:

* megatron names are those of :class:`~megatron_autothink.models.qwen25vl.Qwen25VLModel`'s state
  dict, e.g. ``language_model.decoder.layers.3.self_attention.linear_qkv.weight``,
  ``vision.layers.0.mlp.linear_fc1.bias``, ``vision.patch_embed.weight``.
* HF names are *canonical* transformers (>= 4.52, 5.x) module names of
  ``Qwen2_5_VLForConditionalGeneration``: ``model.language_model.layers.3.self_attn.q_proj.weight``,
  ``model.visual.blocks.0.attn.qkv.weight``, ``lm_head.weight``. Checkpoints on disk (the Hub's
  Qwen2.5-VL repos, and what ``save_pretrained`` of transformers 5.19 still writes) use the
  original names ``model.layers.*`` / ``visual.*``; :func:`canonical_hf_name` and
  :func:`checkpoint_hf_name` translate. vLLM accepts both.

Layouts (why each transform exists):

* ``QKV`` (language model): HF has separate q/k/v projections. Megatron fuses them into one
  column-parallel ``linear_qkv`` whose output rows are grouped *per query group*: for each of the
  ``g`` KV heads, the ``h/g`` query heads of that group, then its key head, then its value head.
  That grouping is what lets TP split the fused matrix into contiguous row blocks.
* ``VISION_QKV``: HF's vision attention has one fused ``qkv`` laid out ``[q; k; v]`` (all query
  heads, then all keys, then all values); megatron wants the same per-group interleave as above
  with one group per head (no GQA in the ViT).
* ``GATE_UP``: megatron's gated ``linear_fc1`` is ``[gate; up]`` on the full model, but each TP
  rank holds ``[gate_r; up_r]`` (its slice of each half), so sharding splits each half separately.
* ``CONV3D``: HF's patch embedding is a ``Conv3d`` with kernel = stride = (T, P, P) over pre-cut
  patches, i.e. a linear map of the flattened ``C*T*P*P`` patch; ours is that ``nn.Linear``.
* ``VOCAB``: megatron pads the vocabulary rows so each TP rank holds an equal slice
  (:func:`~megatron_autothink.models.qwen25vl.padded_vocab_size`); padding rows are zero on import
  and dropped on export. With tied embeddings there is no ``lm_head`` / ``output_layer`` entry.

Everything here is a pure function on tensors; nothing touches torch.distributed.

>>> from megatron_autothink.config import ModelConfig
>>> cfg = ModelConfig(num_layers=1)
>>> spec = [s for s in weight_specs(cfg) if s.kind is Kind.QKV][0]
>>> spec.mcore
'language_model.decoder.layers.0.self_attention.linear_qkv.weight'
>>> spec.hf
('model.language_model.layers.0.self_attn.q_proj.weight', \
'model.language_model.layers.0.self_attn.k_proj.weight', \
'model.language_model.layers.0.self_attn.v_proj.weight')
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_autothink.config import ModelConfig

__all__ = [
    "ConversionError",
    "Kind",
    "WeightSpec",
    "canonical_hf_name",
    "canonical_view",
    "check_hf_names",
    "check_tied_lm_head",
    "checkpoint_hf_name",
    "expected_hf_names",
    "hf_to_megatron_full",
    "megatron_full_to_hf",
    "shard_for_tp",
    "spec_to_hf",
    "spec_to_megatron",
    "unshard_from_tp",
    "weight_specs",
]


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message says what and where."""


class Kind(enum.Enum):
    """Layout transform between the HF tensor(s) and the megatron tensor of one parameter."""

    COPY = "copy"
    QKV = "qkv"
    VISION_QKV = "vision_qkv"
    GATE_UP = "gate_up"
    CONV3D = "conv3d"
    VOCAB = "vocab"


@dataclass(frozen=True, slots=True)
class WeightSpec:
    """One megatron parameter of the full (unsharded) model and where it lives in HF."""

    mcore: str
    """Megatron state-dict name with the global layer index."""
    hf: tuple[str, ...]
    """Canonical HF names, in the order the transform concatenates them."""
    kind: Kind
    hf_shapes: tuple[tuple[int, ...], ...]
    """Expected shape of each HF tensor, from the model config."""
    tp_axis: int | None
    """Axis megatron's tensor parallelism splits the parameter along; ``None``: replicated."""
    num_heads: int = 0
    """Query heads (``QKV`` / ``VISION_QKV`` only)."""
    num_groups: int = 0
    """Key/value heads (``QKV`` / ``VISION_QKV`` only)."""


# ----------------------------------------------------------------------------------------------
# HF name formats
# ----------------------------------------------------------------------------------------------


def canonical_hf_name(name: str) -> str:
    """Checkpoint (Hub) name -> canonical transformers module name; canonical names pass through.

    >>> canonical_hf_name("model.layers.0.mlp.up_proj.weight")
    'model.language_model.layers.0.mlp.up_proj.weight'
    >>> canonical_hf_name("visual.merger.mlp.0.bias")
    'model.visual.merger.mlp.0.bias'
    >>> canonical_hf_name("model.visual.merger.mlp.0.bias")
    'model.visual.merger.mlp.0.bias'
    """
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(
        ("model.language_model.", "model.visual.")
    ):
        return "model.language_model." + name[len("model.") :]
    return name


def checkpoint_hf_name(name: str) -> str:
    """Canonical name -> the name the Hub checkpoints (and ``save_pretrained``) use on disk.

    >>> checkpoint_hf_name("model.language_model.embed_tokens.weight")
    'model.embed_tokens.weight'
    >>> checkpoint_hf_name("model.visual.blocks.1.attn.qkv.weight")
    'visual.blocks.1.attn.qkv.weight'
    """
    if name.startswith("model.visual."):
        return name[len("model.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


def weight_specs(cfg: ModelConfig, *, fused_norms: bool = False) -> list[WeightSpec]:
    """Every megatron parameter of the full model, in a fixed order (vision, then language model).

    Args:
        cfg: the model architecture; ``cfg.vocab_size`` is the HF vocabulary (embedding rows).
        fused_norms: Transformer Engine layer spec, where the pre-attention and pre-MLP RMSNorm
            weights live inside ``linear_qkv`` / ``linear_fc1`` (``layer_norm_weight``) instead of
            separate ``input_layernorm`` / ``pre_mlp_layernorm`` modules. The vision tower always
            uses the local spec.
    """
    v = cfg.vision
    h, ffn, hd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    nh, ng = cfg.num_attention_heads, cfg.num_query_groups
    vh, vffn, vnh = v.hidden_size, v.intermediate_size, v.num_heads
    merged = vh * v.spatial_merge_size**2
    specs: list[WeightSpec] = []

    def one(mcore: str, hf: str, shape: tuple[int, ...], tp_axis: int | None) -> None:
        specs.append(WeightSpec(mcore, (hf,), Kind.COPY, (shape,), tp_axis))

    def gate_up(mcore: str, prefix: str, suffix: str, shape: tuple[int, ...]) -> None:
        names = (f"{prefix}mlp.gate_proj.{suffix}", f"{prefix}mlp.up_proj.{suffix}")
        specs.append(WeightSpec(mcore, names, Kind.GATE_UP, (shape, shape), 0))

    # --- vision tower (first pipeline stage) -------------------------------------------------
    conv = (vh, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    specs.append(
        WeightSpec(
            "vision.patch_embed.weight",
            ("model.visual.patch_embed.proj.weight",),
            Kind.CONV3D,
            (conv,),
            None,
        )
    )
    for i in range(v.depth):
        m, p = f"vision.layers.{i}.", f"model.visual.blocks.{i}."
        one(m + "input_layernorm.weight", p + "norm1.weight", (vh,), None)
        for suffix, shape in (("weight", (3 * vh, vh)), ("bias", (3 * vh,))):
            specs.append(
                WeightSpec(
                    f"{m}self_attention.linear_qkv.{suffix}",
                    (f"{p}attn.qkv.{suffix}",),
                    Kind.VISION_QKV,
                    (shape,),
                    0,
                    num_heads=vnh,
                    num_groups=vnh,
                )
            )
        one(m + "self_attention.linear_proj.weight", p + "attn.proj.weight", (vh, vh), 1)
        one(m + "self_attention.linear_proj.bias", p + "attn.proj.bias", (vh,), None)
        one(m + "pre_mlp_layernorm.weight", p + "norm2.weight", (vh,), None)
        gate_up(m + "mlp.linear_fc1.weight", p, "weight", (vffn, vh))
        gate_up(m + "mlp.linear_fc1.bias", p, "bias", (vffn,))
        one(m + "mlp.linear_fc2.weight", p + "mlp.down_proj.weight", (vh, vffn), 1)
        one(m + "mlp.linear_fc2.bias", p + "mlp.down_proj.bias", (vh,), None)
    one("vision.merger.ln_q.weight", "model.visual.merger.ln_q.weight", (vh,), None)
    one("vision.merger.fc1.weight", "model.visual.merger.mlp.0.weight", (merged, merged), 0)
    one("vision.merger.fc1.bias", "model.visual.merger.mlp.0.bias", (merged,), 0)
    one("vision.merger.fc2.weight", "model.visual.merger.mlp.2.weight", (h, merged), 1)
    one("vision.merger.fc2.bias", "model.visual.merger.mlp.2.bias", (h,), None)

    # --- language model ----------------------------------------------------------------------
    vocab = (cfg.vocab_size, h)
    specs.append(
        WeightSpec(
            "language_model.embedding.word_embeddings.weight",
            ("model.language_model.embed_tokens.weight",),
            Kind.VOCAB,
            (vocab,),
            0,
        )
    )
    in_norm = (
        "self_attention.linear_qkv.layer_norm_weight" if fused_norms else "input_layernorm.weight"
    )
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if fused_norms else "pre_mlp_layernorm.weight"
    qkv_suffixes = ("weight", "bias") if cfg.add_qkv_bias else ("weight",)
    for i in range(cfg.num_layers):
        m, p = f"language_model.decoder.layers.{i}.", f"model.language_model.layers.{i}."
        one(m + in_norm, p + "input_layernorm.weight", (h,), None)
        for suffix in qkv_suffixes:
            tail = (h,) if suffix == "weight" else ()
            specs.append(
                WeightSpec(
                    f"{m}self_attention.linear_qkv.{suffix}",
                    tuple(f"{p}self_attn.{x}_proj.{suffix}" for x in "qkv"),
                    Kind.QKV,
                    ((nh * hd, *tail), (ng * hd, *tail), (ng * hd, *tail)),
                    0,
                    num_heads=nh,
                    num_groups=ng,
                )
            )
        one(m + "self_attention.linear_proj.weight", p + "self_attn.o_proj.weight", (h, nh * hd), 1)
        one(m + mlp_norm, p + "post_attention_layernorm.weight", (h,), None)
        gate_up(m + "mlp.linear_fc1.weight", p, "weight", (ffn, h))
        one(m + "mlp.linear_fc2.weight", p + "mlp.down_proj.weight", (h, ffn), 1)
    one(
        "language_model.decoder.final_layernorm.weight",
        "model.language_model.norm.weight",
        (h,),
        None,
    )
    if not cfg.tie_word_embeddings:
        specs.append(
            WeightSpec(
                "language_model.output_layer.weight", ("lm_head.weight",), Kind.VOCAB, (vocab,), 0
            )
        )
    return specs


def expected_hf_names(cfg: ModelConfig) -> set[str]:
    """Canonical HF names a checkpoint for ``cfg`` must contain (``lm_head`` only if untied)."""
    return {n for s in weight_specs(cfg) for n in s.hf}


def check_hf_names(names: Sequence[str] | set[str], cfg: ModelConfig) -> None:
    """Refuse a checkpoint whose tensor names do not match the config (canonical names).

    A tied model may still carry ``lm_head.weight`` (some exports write it); whether it equals the
    embedding is checked when the tensors are read.
    """
    have = set(names)
    want = expected_hf_names(cfg)
    missing = sorted(want - have)
    extra = sorted(have - want - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if not missing and not extra:
        return
    lines = ["the checkpoint's tensors contradict its config:"]
    if missing:
        lines.append(f"  {len(missing)} expected tensor(s) missing, e.g. {missing[:5]}")
        if "lm_head.weight" in missing:
            lines.append("  (config says tie_word_embeddings=false but there is no lm_head.weight)")
    if extra:
        lines.append(f"  {len(extra)} unexpected tensor(s), e.g. {extra[:5]}")
        layer_hint = _layer_count_hint(have, cfg)
        if layer_hint:
            lines.append(f"  {layer_hint}")
    raise ConversionError("\n".join(lines))


def _layer_count_hint(names: set[str], cfg: ModelConfig) -> str:
    lm = {
        int(m.group(1))
        for n in names
        if (m := re.match(r"model\.language_model\.layers\.(\d+)\.", n))
    }
    vis = {int(m.group(1)) for n in names if (m := re.match(r"model\.visual\.blocks\.(\d+)\.", n))}
    hints = []
    if lm and max(lm) + 1 != cfg.num_layers:
        hints.append(
            f"weights have {max(lm) + 1} language layers, config num_hidden_layers={cfg.num_layers}"
        )
    if vis and max(vis) + 1 != cfg.vision.depth:
        hints.append(
            f"weights have {max(vis) + 1} vision blocks, config vision depth={cfg.vision.depth}"
        )
    return "; ".join(hints)


# ----------------------------------------------------------------------------------------------
# Transforms on full tensors
# ----------------------------------------------------------------------------------------------


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, nh: int, ng: int) -> Tensor:
    """``[q; k; v]`` (separate) -> megatron's per-group ``[q_g..., k_g, v_g]`` rows."""
    rest = q.shape[1:]
    hd = q.shape[0] // nh
    q = q.reshape(ng, (nh // ng) * hd, *rest)
    k = k.reshape(ng, hd, *rest)
    v = v.reshape(ng, hd, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _split_qkv(t: Tensor, nh: int, ng: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`_fuse_qkv`."""
    rest = t.shape[1:]
    hd = t.shape[0] // (nh + 2 * ng)
    per = nh // ng
    g = t.reshape(ng, (per + 2) * hd, *rest)
    q = g[:, : per * hd].reshape(nh * hd, *rest)
    k = g[:, per * hd : (per + 1) * hd].reshape(ng * hd, *rest)
    v = g[:, (per + 1) * hd :].reshape(ng * hd, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _check_shapes(spec: WeightSpec, tensors: Sequence[Tensor]) -> None:
    if len(tensors) != len(spec.hf):
        raise ConversionError(f"{spec.mcore}: needs {len(spec.hf)} HF tensors, got {len(tensors)}")
    for name, t, want in zip(spec.hf, tensors, spec.hf_shapes, strict=True):
        if tuple(t.shape) != tuple(want):
            raise ConversionError(
                f"shape mismatch vs config: {name} has shape {tuple(t.shape)}, the config implies "
                f"{tuple(want)} (megatron {spec.mcore})"
            )


def spec_to_megatron(
    spec: WeightSpec, tensors: Sequence[Tensor], *, padded_vocab: int | None = None
) -> Tensor:
    """HF tensor(s) of one spec -> the full megatron tensor (shapes checked against the config).

    ``padded_vocab`` is the megatron row count for ``VOCAB`` parameters (zero rows appended).
    """
    _check_shapes(spec, tensors)
    if spec.kind is Kind.COPY:
        return tensors[0]
    if spec.kind is Kind.QKV:
        q, k, v = tensors
        return _fuse_qkv(q, k, v, nh=spec.num_heads, ng=spec.num_groups)
    if spec.kind is Kind.VISION_QKV:
        q, k, v = tensors[0].chunk(3, dim=0)
        return _fuse_qkv(q, k, v, nh=spec.num_heads, ng=spec.num_groups)
    if spec.kind is Kind.GATE_UP:
        return torch.cat([tensors[0], tensors[1]], dim=0)
    if spec.kind is Kind.CONV3D:
        return tensors[0].reshape(tensors[0].shape[0], -1)
    if spec.kind is Kind.VOCAB:
        t = tensors[0]
        rows = t.shape[0] if padded_vocab is None else padded_vocab
        if rows < t.shape[0]:
            raise ConversionError(f"{spec.mcore}: padded vocab {rows} < vocab {t.shape[0]}")
        if rows == t.shape[0]:
            return t
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)
    raise AssertionError(spec.kind)


def spec_to_hf(spec: WeightSpec, tensor: Tensor) -> list[tuple[str, Tensor]]:
    """Full megatron tensor of one spec -> its HF tensor(s), exact inverse of
    :func:`spec_to_megatron` (vocabulary padding rows are dropped)."""
    if spec.kind is Kind.COPY:
        out = [tensor]
    elif spec.kind is Kind.QKV:
        out = list(_split_qkv(tensor, spec.num_heads, spec.num_groups))
    elif spec.kind is Kind.VISION_QKV:
        out = [torch.cat(_split_qkv(tensor, spec.num_heads, spec.num_groups), dim=0)]
    elif spec.kind is Kind.GATE_UP:
        gate, up = tensor.chunk(2, dim=0)
        out = [gate.contiguous(), up.contiguous()]
    elif spec.kind is Kind.CONV3D:
        out = [tensor.reshape(spec.hf_shapes[0])]
    elif spec.kind is Kind.VOCAB:
        out = [tensor[: spec.hf_shapes[0][0]]]
    else:
        raise AssertionError(spec.kind)
    for name, t, want in zip(spec.hf, out, spec.hf_shapes, strict=True):
        if tuple(t.shape) != tuple(want):
            raise ConversionError(
                f"shape mismatch vs config: megatron {spec.mcore} gives {name} of shape "
                f"{tuple(t.shape)}, the config implies {tuple(want)}"
            )
    return list(zip(spec.hf, out, strict=True))


# ----------------------------------------------------------------------------------------------
# Tensor-parallel split / merge of full megatron tensors
# ----------------------------------------------------------------------------------------------


def shard_for_tp(spec: WeightSpec, full: Tensor, rank: int, size: int) -> Tensor:
    """The slice of a full megatron tensor that TP rank ``rank`` of ``size`` holds."""
    if spec.tp_axis is None or size == 1:
        return full
    if spec.kind is Kind.GATE_UP:
        # Each rank holds [gate_r; up_r], not a contiguous block of [gate; up].
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    if full.shape[spec.tp_axis] % size:
        raise ConversionError(
            f"{spec.mcore}: axis {spec.tp_axis} of size {full.shape[spec.tp_axis]} is not "
            f"divisible by tensor-parallel size {size}"
        )
    return full.chunk(size, dim=spec.tp_axis)[rank]


def unshard_from_tp(spec: WeightSpec, shards: Sequence[Tensor]) -> Tensor:
    """Inverse of :func:`shard_for_tp`: TP shards in rank order -> the full megatron tensor."""
    if spec.tp_axis is None or len(shards) == 1:
        return shards[0]
    if spec.kind is Kind.GATE_UP:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(shards), dim=spec.tp_axis)


# ----------------------------------------------------------------------------------------------
# Whole-model conversions (full tensors)
# ----------------------------------------------------------------------------------------------


def check_tied_lm_head(hf_state: Mapping[str, Tensor], embed: Tensor) -> None:
    """A tied checkpoint that still stores ``lm_head.weight`` must store the embedding there."""
    if "lm_head.weight" in hf_state and not torch.equal(hf_state["lm_head.weight"], embed):
        raise ConversionError(
            "config says tie_word_embeddings=true but lm_head.weight differs from "
            "embed_tokens.weight; set tie_word_embeddings=false in config.json"
        )


def hf_to_megatron_full(
    hf_state: Mapping[str, Tensor],
    model_cfg: ModelConfig,
    *,
    padded_vocab: int | None = None,
    fused_norms: bool = False,
) -> dict[str, Tensor]:
    """HF tensors (canonical or checkpoint names) -> full megatron state dict (TP=1, PP=1).

    ``hf_state`` may be lazy (e.g. :class:`~megatron_autothink.weights.hf_io.HFCheckpoint`):
    each tensor is read once, when its megatron parameter is built. ``padded_vocab`` defaults
    to the TP=1 padding of ``model_cfg.vocab_size``.
    """
    state = _CanonicalView(hf_state)
    check_hf_names(list(state.keys()), model_cfg)
    # Imported here: the model module pulls in megatron-core, which the table itself never needs.
    from megatron_autothink.models.qwen25vl import padded_vocab_size

    rows = padded_vocab or padded_vocab_size(
        model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, 1
    )
    out: dict[str, Tensor] = {}
    for spec in weight_specs(model_cfg, fused_norms=fused_norms):
        tensors = [state[n] for n in spec.hf]
        out[spec.mcore] = spec_to_megatron(spec, tensors, padded_vocab=rows)
        if spec.kind is Kind.VOCAB and model_cfg.tie_word_embeddings:
            check_tied_lm_head(state, tensors[0])
    return out


def megatron_full_to_hf(
    mcore_state: Mapping[str, Tensor], model_cfg: ModelConfig, *, fused_norms: bool = False
) -> Iterator[tuple[str, Tensor]]:
    """Full megatron state dict -> ``(canonical HF name, tensor)`` pairs, one spec at a time.

    Extra megatron entries (``_extra_state``, a tied model's output layer) are ignored; a missing
    parameter raises.
    """
    for spec in weight_specs(model_cfg, fused_norms=fused_norms):
        if spec.mcore not in mcore_state:
            raise ConversionError(f"megatron state dict has no {spec.mcore}")
        yield from spec_to_hf(spec, mcore_state[spec.mcore])


class _CanonicalView(Mapping[str, Tensor]):
    """Read-only view of an HF mapping under canonical names (accepts both name formats)."""

    def __init__(self, src: Mapping[str, Tensor]) -> None:
        self._src = src
        self._names: dict[str, str] = {}
        for name in src:
            canon = canonical_hf_name(name)
            if canon in self._names:
                raise ConversionError(f"{name} and {self._names[canon]} name the same tensor")
            self._names[canon] = name

    def __getitem__(self, key: str) -> Tensor:
        return self._src[self._names[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key: object) -> bool:
        return key in self._names


def canonical_view(src: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """``src`` under canonical HF names, without reading any tensor."""
    return _CanonicalView(src)
