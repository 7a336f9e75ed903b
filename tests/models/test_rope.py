"""models/rope.py computes exactly megatron's unfused RoPE (values and gradients), falls back to
megatron's function for what it does not cover, and is what megatron's attention calls once a
model is built."""

from __future__ import annotations

import doctest
from types import SimpleNamespace

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from megatron_autothink.models import rope


def _config(**kw: object) -> SimpleNamespace:
    base = dict(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False)
    return SimpleNamespace(**{**base, **kw})


def _inputs(dtype: torch.dtype, heads: int = 3, batch: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    # Non-contiguous query like megatron's QKV split: a view into a wider tensor.
    wide = torch.randn(7, batch, heads + 2, 8, generator=g, dtype=dtype)
    t = wide[:, :, :heads].requires_grad_(False)
    # Multimodal RoPE angles: one set per sample, halves that differ (mrope sections).
    freqs = torch.rand(7, batch, 1, 8, generator=g) * 6.0
    grad = torch.randn(7, batch, heads, 8, generator=g, dtype=dtype)
    return t, freqs, grad


def test_doctests() -> None:
    assert doctest.testmod(rope).failed == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_megatron_values_and_gradients(dtype: torch.dtype) -> None:
    t, freqs, grad = _inputs(dtype)
    a = t.detach().clone().requires_grad_(True)
    b = t.detach().clone().requires_grad_(True)
    ref = rope_utils._apply_rotary_pos_emb_bshd(a, freqs)
    out = rope.apply_rotary_pos_emb(b, freqs, _config())
    ref.backward(grad)
    out.backward(grad)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(b.grad, a.grad, atol=tol, rtol=tol)


def test_gradcheck() -> None:
    t, freqs, _ = _inputs(torch.float64, heads=2, batch=1)
    t = t.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: rope.rotate_half_rope(x, freqs), (t,))


def test_cos_sin_cached_per_angle_tensor() -> None:
    _, freqs, _ = _inputs(torch.float32)
    c1, _ = rope._cos_sin(freqs, torch.float32)
    c2, _ = rope._cos_sin(freqs, torch.float32)
    assert c1 is c2  # every layer of a forward reuses one computation
    freqs.mul_(2.0)  # an in-place change must not serve stale values
    c3, _ = rope._cos_sin(freqs, torch.float32)
    torch.testing.assert_close(c3, torch.cos(freqs))
    other = freqs.clone()
    assert rope._cos_sin(other, torch.float32)[0] is not c3


@pytest.mark.parametrize(
    "case",
    ["fusion", "interleaved", "mscale", "partial", "cu_seqlens"],
)
def test_other_cases_go_to_megatron(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(rope_utils, "apply_rotary_pos_emb", lambda *a: calls.append(a) or a[0])
    t, full, _ = _inputs(torch.float32)
    freqs = full
    kw: dict = {}
    cfg = _config()
    if case == "fusion":
        cfg = _config(apply_rope_fusion=True)
    elif case == "interleaved":
        cfg = _config(rotary_interleaved=True)
    elif case == "mscale":
        kw["mscale"] = 1.5
    elif case == "partial":
        freqs = freqs[..., :4]
    elif case == "cu_seqlens":
        kw["cu_seqlens"] = torch.tensor([0, 7])
    rope.apply_rotary_pos_emb(t, freqs, cfg, **kw)
    assert len(calls) == 1
    # The fast path itself does not call megatron.
    rope.apply_rotary_pos_emb(t, full, _config())
    assert len(calls) == 1


def _built_model_uses_it() -> bool:
    from megatron.core.transformer import attention

    from megatron_autothink.config import load_config
    from megatron_autothink.models.qwen25vl import Qwen25VLModel
    from megatron_autothink.parallel import init_distributed

    cfg = load_config("tiny_cpu")
    ctx = init_distributed(cfg)
    before = attention.apply_rotary_pos_emb is rope.apply_rotary_pos_emb
    Qwen25VLModel(cfg.model, cfg.parallel, vocab_size=512, image_token_id=7, pg_collection=ctx.pg)
    return not before and attention.apply_rotary_pos_emb is rope.apply_rotary_pos_emb


def test_building_a_model_installs_it() -> None:
    from tests.dist_utils import run_distributed

    assert run_distributed(_built_model_uses_it, 1) == [True]
