"""models/swiglu.py: exact SwiGLU on the fused fc1 output (values and gradients), and the local
spec's MLPs run it in place of megatron's unfused chunk-and-multiply with the same numbers."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F

from megatron_autothink.models import swiglu
from tests.dist_utils import run_distributed
from tests.models.model_utils import synthetic_batch


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


def _model_with_and_without(seed: int) -> dict:
    from megatron_autothink.config import load_config
    from megatron_autothink.models.qwen25vl import Qwen25VLModel
    from megatron_autothink.models.swiglu import SwiGLU
    from megatron_autothink.parallel import init_distributed, seed_everything

    cfg = load_config("tiny_cpu")
    ctx = init_distributed(cfg)
    seed_everything(seed, ctx)
    model = Qwen25VLModel(
        cfg.model,
        cfg.parallel,
        vocab_size=cfg.model.vocab_size,
        image_token_id=7,
        pg_collection=ctx.pg,
    )
    mlps = [m for m in model.modules() if type(m).__name__ == "MLP"]
    batch = synthetic_batch(2, 64, cfg.model.vocab_size, seed, with_image=True)
    out: dict = {
        "n_mlps": len(mlps),
        "all_swiglu": all(isinstance(m.activation_func, SwiGLU) for m in mlps),
    }
    configs = {id(m.config): m.config for m in mlps}.values()  # language and vision configs
    for flag in (True, False):  # False: megatron's own unfused chunk-and-multiply, same weights
        for c in configs:
            c.use_te_activation_func = flag
        model.zero_grad()
        loss = model(
            batch.tokens,
            batch.position_ids,
            None,
            labels=batch.labels,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
        )
        (loss * batch.loss_mask).sum().backward()
        out[flag] = (
            loss.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
    return out


def test_local_model_mlps_use_it_and_match_megatrons_unfused_path() -> None:
    (got,) = run_distributed(_model_with_and_without, 1, 3)
    assert got["n_mlps"] == 4 + 2  # tiny_cpu: 4 language + 2 vision layers
    assert got["all_swiglu"]
    (loss_ours, grads_ours), (loss_ref, grads_ref) = got[True], got[False]
    torch.testing.assert_close(loss_ours, loss_ref, atol=1e-6, rtol=1e-6)
    assert grads_ours.keys() == grads_ref.keys()
    assert any("vision" in n and "linear_fc1" in n for n in grads_ours)  # both towers covered
    for name in grads_ref:
        torch.testing.assert_close(grads_ours[name], grads_ref[name], atol=1e-5, rtol=1e-5)
