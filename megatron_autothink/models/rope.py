"""Rotary position embedding in one autograd node, for megatron's unfused RoPE path.

megatron-core applies RoPE in ``Attention.forward`` through ``rope_utils.apply_rotary_pos_emb``.
Its unfused branch (taken on CPU, and on GPU for multimodal RoPE with micro-batch > 1, where TE's
fused kernel does not apply) recomputes ``cos``/``sin`` of the angles in every call, builds
``rotate_half`` from a negation and a ``cat``, and ends with a ``cat`` of an empty pass-through
slice: about ten autograd nodes and four full copies per query/key tensor per layer.

:func:`apply_rotary_pos_emb` computes the same thing (rotate-half convention, rotary dim = head
dim) in one :class:`torch.autograd.Function` that writes both halves of the output directly and
applies the transposed rotation in backward; ``cos``/``sin`` are computed once per angle tensor
(the model computes one per forward and every layer reuses it). Anything else (fused RoPE, packed
``cu_seqlens``, interleaved or partial rotary, ``mscale``, angles that need a gradient) goes to
megatron's own function. :func:`install` routes megatron's attention through it; the models call
it when they are built.

Worked example (head dim 2, angle pi/2: a quarter turn maps (x1, x2) to (-x2, x1)):

>>> import math
>>> t = torch.tensor([[[[1.0, 2.0]]]])            # [s=1, b=1, h=1, d=2]
>>> freqs = torch.full((1, 1, 1, 2), math.pi / 2)
>>> [round(v, 4) + 0.0 for v in rotate_half_rope(t, freqs).flatten().tolist()]
[-2.0, 1.0]
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

_cache: tuple[weakref.ref[Tensor], int, torch.dtype, Tensor, Tensor] | None = None


def _cos_sin(freqs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos``/``sin`` of ``freqs`` in ``dtype``, reused while the same angle tensor comes back
    (every layer of one forward passes the same one)."""
    global _cache
    if _cache is not None:
        ref, version, cached_dtype, cos, sin = _cache
        if ref() is freqs and version == freqs._version and cached_dtype == dtype:
            return cos, sin
    # Like megatron: angles in fp32, cos/sin cast to the activations' dtype.
    cos, sin = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
    _cache = (weakref.ref(freqs), freqs._version, dtype, cos, sin)
    return cos, sin


class _RotateHalf(torch.autograd.Function):
    """``out = t * cos + rotate_half(t) * sin`` with ``rotate_half(x1, x2) = (-x2, x1)``."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        h = t.shape[-1] // 2
        x1, x2 = t[..., :h], t[..., h:]
        # empty_like keeps a dense input's memory layout (split_qkv's batch-major q/k on CPU)
        out = torch.empty_like(t)
        o1, o2 = out[..., :h], out[..., h:]
        torch.mul(x1, cos[..., :h], out=o1)
        o1.addcmul_(x2, sin[..., :h], value=-1.0)  # x1 cos - x2 sin
        torch.mul(x2, cos[..., h:], out=o2)
        o2.addcmul_(x1, sin[..., h:])  # x2 cos + x1 sin
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        h = grad.shape[-1] // 2
        g1, g2 = grad[..., :h], grad[..., h:]
        dt = torch.empty_like(grad)
        d1, d2 = dt[..., :h], dt[..., h:]
        # The transpose of the rotation above.
        torch.mul(g1, cos[..., :h], out=d1)
        d1.addcmul_(g2, sin[..., h:])
        torch.mul(g2, cos[..., h:], out=d2)
        d2.addcmul_(g1, sin[..., :h], value=-1.0)
        return dt, None, None


def rotate_half_rope(t: Tensor, freqs: Tensor) -> Tensor:
    """RoPE of ``t`` ``[s, b, h, d]`` by angles ``freqs`` ``[s, b or 1, 1, d]`` (rotate-half
    convention, the whole head dim rotated)."""
    cos, sin = _cos_sin(freqs, t.dtype)
    out: Tensor = _RotateHalf.apply(t, cos, sin)
    return out


def apply_rotary_pos_emb(
    t: Tensor,
    freqs: Tensor,
    config: Any,
    cu_seqlens: Tensor | None = None,
    mscale: float = 1.0,
    cp_group: Any = None,
) -> Tensor:
    """Drop-in for ``megatron.core.models.common.embeddings.rope_utils.apply_rotary_pos_emb``."""
    if (
        config.apply_rope_fusion
        or cu_seqlens is not None
        or config.rotary_interleaved
        or config.multi_latent_attention
        or mscale != 1.0
        or freqs.shape[-1] != t.shape[-1]
        or freqs.requires_grad
    ):
        return _megatron_apply(t, freqs, config, cu_seqlens, mscale, cp_group)
    return rotate_half_rope(t, freqs)


def _megatron_apply(*args: Any) -> Tensor:
    from megatron.core.models.common.embeddings import rope_utils

    out: Tensor = rope_utils.apply_rotary_pos_emb(*args)
    return out


def install() -> None:
    """Route megatron's ``Attention.forward`` RoPE through :func:`apply_rotary_pos_emb`.

    Process-wide and idempotent: ``megatron.core.transformer.attention`` imported the function
    by name, so that module attribute is the one call site to replace.
    """
    from megatron.core.transformer import attention

    attention.apply_rotary_pos_emb = apply_rotary_pos_emb  # type: ignore[assignment]
