"""Model FLOPs per trained token and MFU (for honest throughput figures on GPU)."""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_autothink.config import ModelConfig

# Dense bf16 tensor-core peaks (no sparsity), per GPU, from NVIDIA's data sheets; the first name
# contained in the device's name wins, so variants come before their family.
_PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "GH200": 989e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "H800": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
}


def attended_length(segment_ids: Tensor) -> float:
    """Mean causal context length per token: ``sum(L**2) / sum(L)`` over the packed samples.

    A packed sample of ``L`` tokens costs attention ``~L**2 / 2`` score pairs, and attention
    runs within samples only (:mod:`~megatron_autothink.models.varlen`); counting the whole row
    length for every token would overstate MFU for packed rows.

    >>> attended_length(torch.tensor([[1, 1, 1, 1], [1, 1, 2, 0]]))  # lengths 4, 2, 1
    3.0
    """
    ids = segment_ids.detach().to("cpu")
    rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)
    keys = (rows * (int(ids.max()) + 1) + ids)[ids > 0]
    lengths = torch.unique(keys, return_counts=True)[1].double()
    return float((lengths**2).sum() / lengths.sum()) if len(lengths) else 0.0


def train_flops_per_token(m: ModelConfig, seq_length: float, head_share: float = 1.0) -> float:
    """Forward+backward FLOPs per token of the language model (3x forward; 2 FLOPs per MAC).

    Counts the QKV/output projections, the SwiGLU MLP, the LM head and attention scores
    (causal: half of ``seq x seq``; for packed rows pass :func:`attended_length` as
    ``seq_length``). The vision tower is excluded (image tokens are a small share
    of the text-dominated batches this figure is used for). ``head_share`` is the share of
    tokens the LM head runs on: the trainer computes logits at loss tokens only
    (``MaskedHeadGPTModel``), so counting the head for every token would overstate MFU.

    >>> round(train_flops_per_token(ModelConfig(), 512) / 1e6, 2)
    5.9
    >>> round(train_flops_per_token(ModelConfig(), 512, head_share=0.5) / 1e6, 2)
    5.51
    """
    h, f, layers = m.hidden_size, m.ffn_hidden_size, m.num_layers
    kv = m.num_query_groups * m.head_dim
    per_layer = 2 * (h * h + 2 * h * kv + h * h) + 2 * 3 * h * f
    attention = 2 * 2 * h * seq_length / 2
    head = 2 * h * m.vocab_size
    return 3.0 * (layers * (per_layer + attention) + head * head_share)


def peak_flops_for(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its CUDA name; None when not in the table.

    >>> peak_flops_for("NVIDIA H200") / 1e12, peak_flops_for("NVIDIA H100 PCIe") / 1e12
    (989.0, 756.0)
    >>> peak_flops_for("cpu") is None
    True
    """
    return next((v for k, v in _PEAK_BF16.items() if k in device_name), None)


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    return peak_flops_for(torch.cuda.get_device_name())


def mfu(achieved_flops_per_gpu: float) -> float:
    """Model FLOPs utilisation in [0, 1]; NaN when the GPU's peak is unknown."""
    peak = peak_flops()
    return achieved_flops_per_gpu / peak if peak else float("nan")
