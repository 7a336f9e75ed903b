"""models/norm.py: RMSNorm's one-node backward gives torch.nn.RMSNorm's values and gradients, and
every norm of the local model (layers, final, vision merger) uses it."""

from __future__ import annotations

import doctest

import pytest
import torch

from megatron_autothink.models import norm
from tests.dist_utils import run_distributed
from tests.models.model_utils import assert_same_loss_and_grads, tiny_model_loss_and_grads


def test_doctests() -> None:
    assert doctest.testmod(norm).failed == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_torch_values_and_gradients(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    ref, ours = torch.nn.RMSNorm(16, eps=1e-6, dtype=dtype), norm.RMSNorm(hidden_size=16, eps=1e-6)
    ours = ours.to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(16, generator=g, dtype=dtype))
        ours.weight.copy_(ref.weight)
    x0 = torch.randn(7, 3, 16, generator=g, dtype=dtype) * 3
    grad = torch.randn(7, 3, 16, generator=g, dtype=dtype)
    a, b = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    ra, rb = ref(a), ours(b)
    ra.backward(grad)
    rb.backward(grad)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(rb, ra, atol=tol, rtol=tol)
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(b.grad, a.grad, atol=tol, rtol=tol)
    assert ref.weight.grad is not None and ours.weight.grad is not None
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=tol * 10, rtol=tol)
    assert rb.grad_fn is not None and type(rb.grad_fn).__name__ == "_RMSNormFunctionBackward"


def test_gradcheck() -> None:
    x = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: norm._RMSNormFunction.apply(a, b, 1e-6), (x, w))


def test_bf16_uses_torchs_path() -> None:
    n = norm.RMSNorm(hidden_size=8, eps=1e-6).to(torch.bfloat16)
    out = n(torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True))
    assert type(out.grad_fn).__name__ != "_RMSNormFunctionBackward"


def _toggle(model: torch.nn.Module, flag: bool) -> None:
    norm.RMSNorm.one_node_backward = flag


def test_model_norms_use_it_and_match_torch() -> None:
    (got,) = run_distributed(tiny_model_loss_and_grads, 1, _toggle, 11)
    norms = {
        n: t for n, t in got["modules"] if n.endswith(("layernorm", "ln_q")) and t != "IdentityOp"
    }
    # 4 language + 2 vision layers x 2, the decoder's final norm, the vision merger's
    assert len(norms) == 6 * 2 + 1 + 1
    assert set(norms.values()) == {"megatron_autothink.models.norm.RMSNorm"}
    assert_same_loss_and_grads(got)
