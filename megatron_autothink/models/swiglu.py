"""SwiGLU on megatron's fused ``[gate | up]`` fc1 output, in one autograd node.

megatron's MLP computes fc1 as one GEMM whose output holds the gate and up projections side by
side, then (unfused path, the only one without CUDA or TorchScript) chunks it into two strided
halves, adds ``glu_linear_offset`` (0.0 for SwiGLU: a full pass that changes nothing) and
multiplies. Autograd then needs ``cat`` to put the two half-gradients back together: a copy of
the whole fc1 activation gradient per layer. :class:`SwiGLU` is the ``activation_func``
submodule megatron's MLP takes from the layer spec (its Transformer Engine path, used with
``TransformerConfig.use_te_activation_func``; TE's own SwiGLU has the same contract): it takes
the fused tensor, returns ``silu(gate) * up``, and its backward writes both halves of the input
gradient into one buffer. Exact (same formulas as autograd's), checked by ``gradcheck``.

Worked example (gate 0 -> silu 0; gate 2 -> 2 * sigmoid(2) = 1.7616):

>>> x = torch.tensor([[0.0, 2.0, 5.0, 3.0]])   # [gate | up] = [0, 2 | 5, 3]
>>> [round(v, 4) for v in swiglu(x).flatten().tolist()]
[0.0, 5.2848]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        act = F.silu(gate)
        # Saved: the fused input and silu(gate), as autograd keeps them on the unfused path
        # (which also keeps up + 0.0, a third copy); backward recomputes no sigmoid for du.
        ctx.save_for_backward(x, act)
        return act * up

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        x, act = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        grad_gate, grad_up = grad_x.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_up)  # d(silu(g) * u)/du = silu(g)
        # d/dg = grad * u * silu'(g); aten's silu_backward computes silu' fused with the product.
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_x


def swiglu(x: Tensor) -> Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` along the last dim: ``[..., 2f] -> [..., f]``."""
    if x.shape[-1] % 2:
        raise ValueError(f"SwiGLU input needs an even last dim ([gate | up]), got {tuple(x.shape)}")
    out: Tensor = _SwiGLUFunction.apply(x)
    return out


class SwiGLU(MegatronModule):
    """megatron MLP ``activation_func`` submodule: fused ``[gate | up]`` in, ``[..., f]`` out."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config=config)
        if config.activation_func is not F.silu or not config.gated_linear_unit:
            raise ValueError("SwiGLU needs activation_func=F.silu and gated_linear_unit=True")
        if config.glu_linear_offset != 0.0 or config.activation_func_clamp_value is not None:
            raise ValueError("SwiGLU implements neither glu_linear_offset nor activation clamping")

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x)
