"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``, for both specs.

megatron-core's local ``DotProductAttention`` refuses packed sequences and builds a dense
[b*np, s, s] score buffer, and TE's ignores a packing mask under megatron's causal TE spec; this
module is a drop-in ``core_attention`` submodule (same constructor and forward signature) that
calls PyTorch SDPA, so it runs on CPU and GPU and handles GQA without materialising repeated keys
where SDPA supports it. Attention stays inside each packed sample or window in one of two ways:

* ``packed_seq_params`` as :class:`~megatron_autothink.models.varlen.SegmentBuckets` (what the
  training paths and the vision tower pass): one unmasked SDPA call per segment length, no
  ``S x S`` work outside the segments;
* an arbitrary boolean ``attention_mask`` (convention megatron's: ``True`` means *masked out*),
  e.g. :func:`~megatron_autothink.models.masks.packed_causal_mask`: the reference the segments
  are tested against.

:class:`LocalSelfAttention` is megatron's ``SelfAttention`` with one change, in how the fused QKV
projection is split (:func:`split_qkv`): megatron splits it into strided views, copies the query
to merge its heads, and autograd concatenates the three gradients back in backward. Here one
autograd node copies q, k and v out once (batch-major in memory on CPU, the layout the CPU flash
kernel wants, so RoPE keeps it and :class:`SDPAAttention` copies nothing) and writes their
gradients straight into one buffer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor

from megatron_autothink.models.varlen import SegmentBuckets, bucketed_attention


class SDPAAttention(MegatronModule):
    """``core_attention`` for megatron's ``SelfAttention``: q/k/v in, context out.

    Shapes: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` (per TP partition);
    ``attention_mask`` ``[b or 1, 1, sq, sk]`` bool (True = masked) or None; returns
    ``[sq, b, np * hn]``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAAttention does not implement context parallelism; use TE")
        tp_size = pg_collection.tp.size() if pg_collection is not None else 1
        self.attn_mask_type = attn_mask_type
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.num_groups = divide(config.num_query_groups or config.num_attention_heads, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: object | None = None,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported")
        mask_type = attn_mask_type or self.attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        on_cpu = query.device.type == "cpu"
        if packed_seq_params is not None:
            return self._segments(query, key, value, packed_seq_params, mask_type, on_cpu)
        if on_cpu:
            # [s, b, h, d] -> [b, s, h, d] in memory, viewed as [b, h, s, d]: the CPU flash
            # kernel walks s; with megatron's s-major layout each step jumps b*h*d floats. The
            # copy costs less than it saves (~10% of attention fwd+bwd at hidden 512).
            q, k, v = (t.transpose(0, 1).contiguous().transpose(1, 2) for t in (query, key, value))
        else:
            # [s, b, h, d] -> [b, h, s, d]; the CUDA kernels take strided inputs as they are.
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        k, v, native_gqa = self._kv_heads(k, v, on_cpu)
        if attention_mask is not None:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=~attention_mask,
                dropout_p=self.dropout_p if self.training else 0.0,
                scale=self.softmax_scale,
                enable_gqa=native_gqa,
            )
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                is_causal=mask_type == AttnMaskType.causal,
                dropout_p=self.dropout_p if self.training else 0.0,
                scale=self.softmax_scale,
                enable_gqa=native_gqa,
            )
        # [b, h, s, d] -> [s, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)

    def _kv_heads(self, k: Tensor, v: Tensor, on_cpu: bool) -> tuple[Tensor, Tensor, bool]:
        """Key/value heads (dim 1) as SDPA gets them, and whether SDPA shares them itself
        (``enable_gqa``).

        CPU: SDPA's flash kernel reads the shared key/value heads itself, which saves two copies
        forward and two reductions backward per layer (~8% of attention's time at the tiny
        config). CUDA: the memory-efficient kernel that masked attention needs does not take
        ``enable_gqa``, so the heads are repeated (exact either way).
        """
        if self.num_heads == self.num_groups:
            return k, v, False
        if on_cpu:
            return k, v, True
        rep = self.num_heads // self.num_groups
        return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False

    def _segments(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        segments: object,
        mask_type: AttnMaskType,
        on_cpu: bool,
    ) -> Tensor:
        """Attention inside the segments of :class:`SegmentBuckets` (no mask; see
        :mod:`~megatron_autothink.models.varlen`). Tokens are flattened batch-major."""
        if not isinstance(segments, SegmentBuckets):
            raise ValueError(
                "SDPAAttention takes packed segments as models.varlen.SegmentBuckets (or a "
                f"block-diagonal attention_mask), not {type(segments).__name__}"
            )
        sq, b = query.shape[0], query.shape[1]
        total = sum(length * count for length, count in segments.buckets)
        if total != sq * b:
            raise ValueError(f"segments cover {total} tokens, the batch holds {b} x {sq}")
        # [s, b, h, d] -> [b*s, h, d]: a view for b == 1 and for the CPU batch-major layout.
        q, k, v = (t.transpose(0, 1).reshape(b * sq, *t.shape[2:]) for t in (query, key, value))
        k, v, native_gqa = self._kv_heads(k, v, on_cpu)
        out = bucketed_attention(
            q,
            k,
            v,
            segments,
            causal=mask_type == AttnMaskType.causal,
            scale=self.softmax_scale,
            dropout_p=self.dropout_p if self.training else 0.0,
            enable_gqa=native_gqa,
        )
        return out.view(b, sq, self.num_heads * self.head_dim).transpose(0, 1).contiguous()


class _SplitQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, mixed: Tensor, heads_per_group: int, head_dim: int) -> Any:
        s, b, ng, width = mixed.shape
        qw = heads_per_group * head_dim
        if width != qw + 2 * head_dim:
            raise ValueError(
                f"QKV width {width} != ({heads_per_group} query + 2) heads x {head_dim}"
            )
        # Batch-major storage on CPU (see SDPAAttention.forward), shaped [s, b, heads, d] as
        # megatron expects; sequence-major elsewhere.
        bmajor = mixed.device.type == "cpu"

        def new(heads: int) -> Tensor:
            if bmajor:
                return mixed.new_empty(b, s, heads, head_dim).transpose(0, 1)
            return mixed.new_empty(s, b, heads, head_dim)

        q, k, v = new(ng * heads_per_group), new(ng), new(ng)
        q.view(s, b, ng, qw).copy_(mixed[..., :qw])  # merges each group's query heads
        k.view(s, b, ng, head_dim).copy_(mixed[..., qw : qw + head_dim])
        v.view(s, b, ng, head_dim).copy_(mixed[..., qw + head_dim :])
        ctx.dims = (s, b, ng, qw, head_dim)
        ctx.like = (mixed.dtype, mixed.device)
        return q, k, v

    @staticmethod
    def backward(ctx: Any, gq: Tensor | None, gk: Tensor | None, gv: Tensor | None) -> Any:
        s, b, ng, qw, hd = ctx.dims
        dtype, device = ctx.like
        grad = torch.empty((s, b, ng, qw + 2 * hd), dtype=dtype, device=device)
        for g, lo, width in ((gq, 0, qw), (gk, qw, hd), (gv, qw + hd, hd)):
            part = grad[..., lo : lo + width]
            if g is None:
                part.zero_()
            else:
                part.copy_(g.reshape(s, b, ng, width))
        return grad, None, None


def split_qkv(mixed: Tensor, heads_per_group: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split megatron's grouped QKV projection into query, key and value.

    ``mixed`` is ``[s, b, ng, (heads_per_group + 2) * head_dim]``: per query group, its query
    heads, then its key head, then its value head (megatron's layout, which keeps a group on one
    TP rank). Returns query ``[s, b, ng * heads_per_group, head_dim]`` and key/value
    ``[s, b, ng, head_dim]``, exactly megatron's split, as new tensors.

    >>> m = torch.arange(8.0).view(1, 1, 2, 4)  # 2 groups of [q, q, k, v], head_dim 1
    >>> q, k, v = split_qkv(m, heads_per_group=2, head_dim=1)
    >>> q.flatten().tolist(), k.flatten().tolist(), v.flatten().tolist()
    ([0.0, 1.0, 4.0, 5.0], [2.0, 6.0], [3.0, 7.0])
    """
    q, k, v = _SplitQKV.apply(mixed, heads_per_group, head_dim)
    return q, k, v


class LocalSelfAttention(SelfAttention):
    """megatron ``SelfAttention`` whose QKV split is :func:`split_qkv` (one node, no backward
    ``cat``); cases it does not cover go to megatron's own split."""

    def get_query_key_value_tensors(  # type: ignore[override]
        self,
        hidden_states: Tensor,
        key_value_states: Tensor | None = None,
        output_gate: bool = False,
        split_qkv: bool = True,
    ) -> Any:
        groups = self.num_query_groups_per_partition
        assert self.config.num_query_groups is not None
        if (
            key_value_states is not None
            or output_gate
            or not split_qkv
            # TP wider than the query groups: megatron gathers and re-slices groups first.
            or self.config.num_query_groups < self.world_size
            or self.config.test_mode
        ):
            return super().get_query_key_value_tensors(
                hidden_states, key_value_states, output_gate, split_qkv
            )
        mixed, _ = self.linear_qkv(hidden_states)
        per_group = self.num_attention_heads_per_partition // groups
        hd = self.hidden_size_per_attention_head
        mixed = mixed.view(*mixed.shape[:-1], groups, (per_group + 2) * hd)
        # (the parameter named split_qkv, megatron's signature, hides the function here)
        query, key, value = _SplitQKV.apply(mixed, per_group, hd)
        if self.q_layernorm is not None:  # as megatron's split does
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return query, key, value
