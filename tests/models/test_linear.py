"""models/linear.py: the local spec's linears call torch's linear when they communicate nothing,
with megatron's numbers, and keep megatron's function when they do (TP > 1)."""

from __future__ import annotations

import pytest
import torch

from megatron_autothink.models import linear
from tests.dist_utils import run_distributed
from tests.models.model_utils import assert_same_loss_and_grads, tiny_model_loss_and_grads


def _toggle(model: torch.nn.Module, flag: bool) -> None:
    linear._TorchLinearWhenLocal.use_torch_linear = flag


def test_model_linears_use_it_and_match_megatrons_function() -> None:
    (got,) = run_distributed(tiny_model_loss_and_grads, 1, _toggle, 5)
    names = dict(got["modules"])
    # every layer linear of both towers (4 language + 2 vision layers, 4 linears each)
    local = [n for n, t in names.items() if t.startswith("megatron_autothink.models.linear.Local")]
    assert len(local) == 6 * 4
    assert_same_loss_and_grads(got)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"allreduce_dgrad": True},
        {"sequence_parallel": True},
        {"gradient_accumulation_fusion": True},
        {"grad_output_buffer": []},
    ],
)
def test_communicating_calls_go_to_megatron(kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []

    def fake(self: object, input: torch.Tensor, weight: torch.Tensor, **kw: object) -> str:
        calls.append(kw)
        return "megatron"

    monkeypatch.setattr(linear.ColumnParallelLinear, "_forward_impl", fake)
    layer = object.__new__(linear.LocalColumnParallelLinear)
    x, w = torch.randn(3, 2, 4), torch.randn(5, 4)
    base = dict(
        bias=None,
        gradient_accumulation_fusion=False,
        allreduce_dgrad=False,
        sequence_parallel=False,
        grad_output_buffer=None,
    )
    out = layer._forward_impl(input=x, weight=w, **base)
    torch.testing.assert_close(out, x @ w.t())
    assert not calls
    assert layer._forward_impl(input=x, weight=w, **{**base, **kwargs}) == "megatron"
    assert len(calls) == 1
