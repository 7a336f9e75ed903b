"""The SFT stage: packed loader, per-mode held-out loss, and the shared loop (``train/loop.py``).

``pipeline.main`` calls :func:`run_sft_stage` for every stage of ``kind: sft`` (bi-mode
annealing, the curated continuation); the RL stages are ``rl/stage.py``'s.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from megatron_autothink.config import AutothinkConfig, StageConfig, stage_config
from megatron_autothink.data.loader import (
    PackedLoader,
    build_packed_loader,
    fetch_agreed,
    sft_loader_config,
)
from megatron_autothink.parallel import ParallelContext
from megatron_autothink.train.callbacks import standard_callbacks
from megatron_autothink.train.checkpoint import CheckpointManager, checkpoint_root
from megatron_autothink.train.loop import run_sft
from megatron_autothink.train.preempt import PreemptionWatcher
from megatron_autothink.train.progress import phase
from megatron_autothink.train.setup import build_optimizer
from megatron_autothink.train.state import LoopState
from megatron_autothink.train.step import train_step

log = logging.getLogger(__name__)


def build_sft_loader(
    cfg: AutothinkConfig,
    ctx: ParallelContext,
    path: str,
    tokenizer: Any,
    *,
    training: bool,
    split: str,
) -> PackedLoader:
    """This data-parallel rank's packed loader of ``path`` (``data.*`` of the recipe)."""
    return build_packed_loader(
        sft_loader_config(cfg, path, training=training, split=split),
        tokenizer,
        dp_rank=ctx.dp_rank,
        dp_world_size=ctx.dp,
    )


def make_eval_fn(
    cfg: AutothinkConfig,
    ctx: ParallelContext,
    chunks: list[torch.nn.Module],
    opt: Any,
    path: str,
    tokenizer: Any,
) -> Any:
    """Forward-only loss per mode over the first ``train.eval_steps`` global batches of the
    held-out split (the same batches every time)."""
    n_micro = cfg.data.global_batch_size // (cfg.data.micro_batch_size * ctx.dp)

    def evaluate() -> dict[str, float]:
        loader = build_sft_loader(cfg, ctx, path, tokenizer, training=False, split="test")
        losses: list[tuple[float, float, float, int]] = []
        for _ in range(cfg.train.eval_steps):
            try:
                batches = fetch_agreed(
                    lambda: [next(loader) for _ in range(n_micro)], device=ctx.device
                )
            except StopIteration:
                break
            r = train_step(
                chunks, opt, batches, ctx, seq_length=cfg.data.seq_length, forward_only=True
            )
            losses.append((r.loss, r.loss_thinking, r.loss_non_thinking, r.tokens))
        if not losses:
            return {}
        total = sum(t for *_, t in losses) or 1
        return {
            "eval_loss": sum(a * t for a, _, _, t in losses) / total,
            "eval_loss_thinking": sum(b for _, b, _, _ in losses) / len(losses),
            "eval_loss_non_thinking": sum(c for _, _, c, _ in losses) / len(losses),
        }

    return evaluate


def run_sft_stage(
    cfg: AutothinkConfig,
    ctx: ParallelContext,
    stage: StageConfig,
    chunks: list[torch.nn.Module],
    tokenizer: Any,
    *,
    step_offset: int,
    previous: CheckpointManager | None,
    watcher: PreemptionWatcher | None = None,
) -> tuple[LoopState, CheckpointManager]:
    cfg = stage_config(cfg, stage)
    d = cfg.data
    path = stage.train_path or d.train_path
    n_micro = d.global_batch_size // (d.micro_batch_size * ctx.dp)
    phase(
        f"stage {stage.name} ({stage.kind}, {stage.steps} steps): optimizer and data loader "
        f"({path})",
        rank=ctx.rank,
    )
    opt = build_optimizer(cfg, chunks, ctx, total_steps=stage.steps)
    loader = build_sft_loader(cfg, ctx, path, tokenizer, training=True, split="train")
    ckpt = CheckpointManager(checkpoint_root(cfg) / stage.name, ctx, cfg.checkpoint.keep_last)
    state = LoopState(
        cfg=cfg,
        ctx=ctx,
        chunks=chunks,
        opt=opt,
        data=loader,
        ckpt=ckpt,
        stage=stage.name,
        total_steps=stage.steps,
        step_offset=step_offset,
    )
    state.resume(previous)
    if state.step >= stage.steps:
        log.info("stage %s already finished (step %d)", stage.name, state.step)
        return state, ckpt
    eval_path = d.eval_path or path
    state.eval_fn = make_eval_fn(cfg, ctx, chunks, opt, eval_path, tokenizer)
    callbacks = standard_callbacks(cfg, evaluate=True)
    phase(f"stage {stage.name}: training steps {state.step + 1}-{stage.steps}", rank=ctx.rank)
    run_sft(state, callbacks, num_micro_batches=n_micro, watcher=watcher)
    return state, ckpt
