"""models/attention.py: the one-node QKV split gives megatron's query/key/value and gradients,
in the batch-major memory layout on CPU that RoPE keeps and the SDPA module then uses as is."""

from __future__ import annotations

import doctest

import torch

from megatron_autothink.models import attention, rope
from tests.dist_utils import run_distributed
from tests.models.model_utils import assert_same_loss_and_grads, tiny_model_loss_and_grads


def test_doctests() -> None:
    assert doctest.testmod(attention).failed == 0


def _megatron_split(mixed: torch.Tensor, per_group: int, hd: int) -> tuple[torch.Tensor, ...]:
    # megatron-core's SelfAttention.get_query_key_value_tensors, after the projection
    q, k, v = torch.split(mixed, [per_group * hd, hd, hd], dim=3)
    return q.reshape(q.size(0), q.size(1), -1, hd), k, v


def test_split_matches_megatron_values_and_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    s, b, groups, per_group, hd = 5, 3, 2, 3, 4
    mixed = torch.randn(s, b, groups, (per_group + 2) * hd, generator=g, dtype=torch.float64)
    a = mixed.clone().requires_grad_(True)
    c = mixed.clone().requires_grad_(True)
    ref = _megatron_split(a, per_group, hd)
    got = attention.split_qkv(c, per_group, hd)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in ref]
    for r, o in zip(ref, got, strict=True):
        assert r.shape == o.shape
        torch.testing.assert_close(o, r, rtol=0, atol=0)
        # batch-major memory on CPU: [s, b, h, d] shape over [b, s, h, d] storage
        assert o.transpose(0, 1).is_contiguous()
    torch.autograd.backward(ref, grads)
    torch.autograd.backward(got, grads)
    assert a.grad is not None and c.grad is not None
    torch.testing.assert_close(c.grad, a.grad, rtol=0, atol=0)


def test_split_gradcheck_and_unused_outputs() -> None:
    mixed = torch.randn(2, 2, 2, 4 * 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: attention.split_qkv(x, 2, 3), (mixed,))
    q, _, v = attention.split_qkv(mixed, 2, 3)
    (q.sum() + v.sum()).backward()  # no gradient for k: its slice of the input grad is zero
    assert mixed.grad is not None
    torch.testing.assert_close(mixed.grad[..., 6:9], torch.zeros(2, 2, 2, 3, dtype=torch.float64))
    torch.testing.assert_close(mixed.grad[..., :6], torch.ones(2, 2, 2, 6, dtype=torch.float64))


def test_rope_keeps_the_batch_major_layout() -> None:
    mixed = torch.randn(6, 2, 2, 4 * 8)
    q, _, _ = attention.split_qkv(mixed, 2, 8)
    out = rope.rotate_half_rope(q, torch.rand(6, 2, 1, 8))
    assert out.transpose(0, 1).is_contiguous()  # SDPAAttention's CPU copy is then a no-op


def _toggle(model: torch.nn.Module, flag: bool) -> None:
    from megatron.core.transformer.attention import SelfAttention

    for m in model.modules():
        if isinstance(m, attention.LocalSelfAttention):
            # instance attribute shadows the override: False = megatron's own split
            if flag:
                m.__dict__.pop("get_query_key_value_tensors", None)
            else:
                m.get_query_key_value_tensors = SelfAttention.get_query_key_value_tensors.__get__(m)  # type: ignore[method-assign]


def test_model_attention_uses_it_and_matches_megatrons_split() -> None:
    (got,) = run_distributed(tiny_model_loss_and_grads, 1, _toggle, 7)
    kinds = [t for _, t in got["modules"]]
    assert (
        kinds.count("megatron_autothink.models.attention.LocalSelfAttention") == 4 + 2
    )  # language and vision layers
    assert_same_loss_and_grads(got)
