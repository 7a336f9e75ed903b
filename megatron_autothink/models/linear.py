"""megatron's column/row-parallel linears, with torch's own linear where there is nothing to
communicate.

megatron-core routes every ``ColumnParallelLinear``/``RowParallelLinear`` matmul through
``LinearWithGradAccumulationAndAsyncCommunication``, a Python ``autograd.Function`` that handles
the tensor-parallel cases: all-reducing the input gradient, sequence-parallel gathers and
reduce-scatters, fused weight-gradient accumulation into ``main_grad`` (CUDA) and deferred
embedding weight gradients. When none of those is in use (one TP rank, or a row-parallel layer
without sequence parallelism, and no gradient-accumulation fusion) its forward and backward are
two plain matmuls wrapped in Python: ~100 us per layer call on CPU, ~3 ms of a tiny training
step. These subclasses then call ``torch.nn.functional.linear`` (same matmuls, autograd in
C++); otherwise megatron's function, unchanged. The weight gradient reaches megatron's DDP the
same way in both cases: through ``param.grad`` and its grad-accumulation hook.

With one TP rank (and no sequence parallelism, expert communication, deferred embedding
gradients or CPU offloading) the whole ``forward`` is ``F.linear``: megatron's ``copy_to`` /
``reduce_from`` tensor-parallel regions around the matmul are identities there, but each is a
Python ``autograd.Function`` too. With more TP ranks, megatron's ``forward`` runs as it is.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import Tensor


def _needs_megatron(
    gradient_accumulation_fusion: bool = False,
    allreduce_dgrad: bool = False,
    sequence_parallel: bool = False,
    grad_output_buffer: list[Tensor] | None = None,
    **_: Any,
) -> bool:
    """Whether the call uses anything megatron's linear function does beyond two matmuls."""
    return (
        gradient_accumulation_fusion
        or allreduce_dgrad
        or sequence_parallel
        or grad_output_buffer is not None
    )


class _TorchLinearWhenLocal:
    use_torch_linear = True
    """Class switch (the tests compare both paths on one model)."""

    def _one_rank(self) -> bool:
        """Nothing in megatron's ``forward`` communicates or defers: it reduces to F.linear."""
        me: Any = self
        cfg = me.config
        return bool(
            self.use_torch_linear
            and me.tp_group.size() == 1
            and not me.sequence_parallel
            and not me.explicit_expert_comm
            and not cfg.defer_embedding_wgrad_compute
            and cfg._cpu_offloading_context is None
        )

    def _one_rank_forward(self, input_: Tensor) -> tuple[Tensor, Tensor | None]:
        """megatron's ``forward`` on one TP rank: the matmul, bias added or returned apart."""
        me: Any = self
        if me.skip_bias_add:
            return F.linear(input_, me.weight), me.bias
        return F.linear(input_, me.weight, me.bias), None

    def _forward_impl(self, input: Tensor, weight: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not self.use_torch_linear or args or _needs_megatron(**kwargs):
            out: Tensor = super()._forward_impl(input, weight, *args, **kwargs)  # type: ignore[misc]
            return out
        return F.linear(input, weight, kwargs.get("bias"))


class LocalColumnParallelLinear(_TorchLinearWhenLocal, ColumnParallelLinear):
    """``ColumnParallelLinear`` whose matmul is ``F.linear`` when it communicates nothing."""

    def forward(
        self,
        input_: Tensor,
        weight: Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if weight is not None or not self._one_rank():
            return super().forward(input_, weight, runtime_gather_output)  # type: ignore[no-any-return]
        return self._one_rank_forward(input_)


class LocalRowParallelLinear(_TorchLinearWhenLocal, RowParallelLinear):
    """``RowParallelLinear`` whose matmul is ``F.linear`` when it communicates nothing (the
    reduction of the output across TP ranks stays in megatron's ``forward``)."""

    def forward(self, input_: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self._one_rank():
            return super().forward(input_)  # type: ignore[no-any-return]
        return self._one_rank_forward(input_)
