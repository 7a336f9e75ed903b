"""models/swiglu.py: exact SwiGLU on the fused fc1 output (values and gradients), and the local
spec's MLPs run it in place of megatron's unfused chunk-and-multiply with the same numbers."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F

from megatron_autothink.models import swiglu
from tests.dist_utils import run_distributed
from tests.models.model_utils import assert_same_loss_and_grads, tiny_model_loss_and_grads


def test_doctests() -> None:
    assert doctest.testmod(swiglu).failed == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_autograd_values_and_gradients(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    # [s, b, 2f] like megatron's fc1 output, plus a strided (non-contiguous) input.
    for x0 in (
        torch.randn(5, 2, 12, generator=g, dtype=dtype),
        torch.randn(2, 5, 12, generator=g, dtype=dtype).transpose(0, 1),
    ):
        grad = torch.randn(5, 2, 6, generator=g, dtype=dtype)
        a = x0.detach().clone().requires_grad_(True)
        b = x0.detach().clone().requires_grad_(True)
        gate, up = a.chunk(2, dim=-1)
        ref = F.silu(gate) * up
        out = swiglu.swiglu(b)
        ref.backward(grad)
        out.backward(grad)
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(b.grad, a.grad, atol=tol, rtol=tol)


def test_gradcheck() -> None:
    x = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu.swiglu, (x,))


def test_odd_width_is_refused() -> None:
    with pytest.raises(ValueError, match="even last dim"):
        swiglu.swiglu(torch.zeros(2, 3))


def _toggle(model: torch.nn.Module, flag: bool) -> None:
    """True: the spec'd SwiGLU; False: megatron's own unfused chunk-and-multiply (same weights:
    the flag only picks the branch in megatron's ``MLP.forward``)."""
    for m in model.modules():
        if type(m).__name__ == "MLP":
            m.config.use_te_activation_func = flag  # language and vision configs


def test_local_model_mlps_use_it_and_match_megatrons_unfused_path() -> None:
    (got,) = run_distributed(tiny_model_loss_and_grads, 1, _toggle, 3)
    mlps = [n for n, t in got["modules"] if t == "MLP"]
    swiglus = [n for n, t in got["modules"] if t == "megatron_autothink.models.swiglu.SwiGLU"]
    assert len(mlps) == 4 + 2  # tiny_cpu: 4 language + 2 vision layers
    assert sorted(swiglus) == sorted(f"{n}.activation_func" for n in mlps)
    assert_same_loss_and_grads(got)
