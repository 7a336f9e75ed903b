"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

megatron-core's local ``DotProductAttention`` refuses packed sequences and builds a dense
[b*np, s, s] score buffer; this module is a drop-in ``core_attention`` submodule (same
constructor and forward signature) that calls PyTorch SDPA, so it runs on CPU and GPU, handles
GQA without materialising repeated keys where SDPA supports it, and accepts an arbitrary
boolean mask. We use the mask for two things megatron's local path cannot do:

* packed language-model sequences: attention stays inside each packed sample (block-diagonal
  causal mask built from ``segment_ids``), and
* Qwen2.5-VL's vision tower: window attention and per-image full attention (block-diagonal,
  non-causal).

Mask convention is megatron's: ``True`` means *masked out*.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor


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
        if packed_seq_params is not None:
            raise ValueError(
                "SDPAAttention takes packed samples as a block-diagonal attention_mask "
                "(see models.masks), not PackedSeqParams"
            )
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported")
        mask_type = attn_mask_type or self.attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        on_cpu = query.device.type == "cpu"
        if on_cpu:
            # [s, b, h, d] -> [b, s, h, d] in memory, viewed as [b, h, s, d]: the CPU flash
            # kernel walks s; with megatron's s-major layout each step jumps b*h*d floats. The
            # copy costs less than it saves (~10% of attention fwd+bwd at hidden 512).
            q, k, v = (t.transpose(0, 1).contiguous().transpose(1, 2) for t in (query, key, value))
        else:
            # [s, b, h, d] -> [b, h, s, d]; the CUDA kernels take strided inputs as they are.
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        gqa = self.num_heads != self.num_groups
        # CPU: SDPA's flash kernel reads the shared key/value heads itself (enable_gqa), which
        # saves two copies forward and two reductions backward per layer (~8% of attention's
        # time at the tiny config). CUDA: the memory-efficient kernel that masked attention
        # needs does not take enable_gqa, so repeat the heads (exact either way).
        native_gqa = gqa and on_cpu
        if gqa and not native_gqa:
            rep = self.num_heads // self.num_groups
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
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
