"""Synthetic packed batches for model tests (a real image-token layout, random ids)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_autothink.data.batch import PackedBatch

IMAGE_TOKEN = 7


def synthetic_batch(
    rows: int, seq: int, vocab: int, seed: int, with_image: bool = True
) -> PackedBatch:
    """Row 0 holds one 1x4x4-patch image (4 merged tokens); odd rows pack two samples."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, vocab, (rows, seq), generator=g)
    pos = torch.zeros(3, rows, seq, dtype=torch.long)
    seg = torch.ones(rows, seq, dtype=torch.long)
    for r in range(rows):
        bounds = [(0, seq)] if r % 2 == 0 else [(0, seq // 2), (seq // 2, seq - 3)]
        seg[r] = 0
        for k, (a, b) in enumerate(bounds):
            seg[r, a:b] = k + 1
            pos[:, r, a:b] = torch.arange(b - a)
    pixels = grid = None
    if with_image:
        start = 3
        tokens[0, start : start + 4] = IMAGE_TOKEN
        hw = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
        pos[0, 0, start : start + 4] = start
        pos[1:, 0, start : start + 4] = start + hw.t()
        pos[:, 0, start + 4 :] = torch.arange(start + 2, start + 2 + seq - start - 4)
        pixels = torch.randn(16, 1176, generator=g)
        grid = torch.tensor([[1, 4, 4]])
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = (seg > 0).float()
    loss_mask[:, -1] = 0
    loss_mask[tokens == IMAGE_TOKEN] = 0
    mode_ids = torch.where(seg > 0, (torch.arange(rows)[:, None] % 2).expand(rows, seq), -1)
    return PackedBatch(
        tokens, labels, loss_mask, pos, seg, mode_ids, pixels, grid, [[] for _ in range(rows)]
    )


def build_tiny_model(seed: int, overrides: Sequence[str] = ()) -> tuple[Any, torch.nn.Module]:
    """Run in a rank: ``(cfg, model)``, the tiny VLM (recipe ``tiny_cpu`` + ``overrides``) on a
    fresh parallel context, with seeded weights."""
    from megatron_autothink.config import load_config
    from megatron_autothink.models.qwen25vl import Qwen25VLModel
    from megatron_autothink.parallel import init_distributed, seed_everything

    cfg = load_config("tiny_cpu", list(overrides))
    ctx = init_distributed(cfg)
    seed_everything(seed, ctx)
    model = Qwen25VLModel(
        cfg.model,
        cfg.parallel,
        vocab_size=cfg.model.vocab_size,
        image_token_id=IMAGE_TOKEN,
        pg_collection=ctx.pg,
    )
    return cfg, model


def loss_and_grads(
    model: torch.nn.Module,
    batch: PackedBatch,
    attention_mask: torch.Tensor | None = None,
    **forward_kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward/backward of ``sum(per_token_loss * loss_mask)`` on ``batch``: the per-token
    loss ``[B, S]`` and every parameter's gradient by name."""
    model.zero_grad()
    loss = model(
        batch.tokens,
        batch.position_ids,
        attention_mask,
        labels=batch.labels,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        **forward_kwargs,
    )
    (loss * batch.loss_mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def tiny_model_loss_and_grads(
    toggle: Callable[[torch.nn.Module, bool], None], seed: int, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Run in a rank: build the tiny VLM, then for ``toggle(model, True)`` and
    ``toggle(model, False)`` one forward/backward on the same synthetic batch and weights.

    Returns ``{True: (per_token_loss, grads), False: (...), "model": module summary}`` where
    ``grads`` maps parameter names to gradients. Used to show that a fast path we switch in
    computes exactly what megatron's own path computes.
    """
    cfg, model = build_tiny_model(seed, overrides)
    batch = synthetic_batch(2, 64, cfg.model.vocab_size, seed, with_image=True)
    out: dict[str, Any] = {"modules": [(n, m) for n, m in model.named_modules()]}
    for flag in (True, False):
        toggle(model, flag)
        out[flag] = loss_and_grads(model, batch)  # type: ignore[index]
    toggle(model, True)
    out["modules"] = [(n, _qualname(type(m))) for n, m in out["modules"]]
    return out


def assert_same_loss_and_grads(got: dict[Any, Any], atol: float = 1e-5) -> None:
    """Both runs of :func:`tiny_model_loss_and_grads` agree; both towers have gradients."""
    (loss_a, grads_a), (loss_b, grads_b) = got[True], got[False]
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    assert any("vision" in n and "linear_fc1" in n for n in grads_a)
    assert any("decoder" in n and "linear_qkv" in n for n in grads_a)
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=atol)


def _qualname(cls: type) -> str:
    """Class name; fully qualified for our own modules (``torch.nn.RMSNorm`` vs ours)."""
    if cls.__module__.startswith("megatron_autothink."):
        return f"{cls.__module__}.{cls.__name__}"
    return cls.__name__
