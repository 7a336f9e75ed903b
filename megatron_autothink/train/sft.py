"""The SFT stage: packed loader, per-mode held-out loss, and its module for the shared loop
(``train/loop.py``).

``pipeline.main`` calls :func:`run_sft_stage` for every stage of ``kind: sft`` (bi-mode
annealing, the curated continuation); the RL stages are ``rl/stage.py``'s.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_autothink.config import AutothinkConfig, StageConfig, stage_config
from megatron_autothink.data.batch import PackedBatch
from megatron_autothink.data.loader import (
    PackedLoader,
    build_packed_loader,
    fetch_agreed,
    sft_loader_config,
)
from megatron_autothink.parallel import ParallelContext
from megatron_autothink.train.callbacks import standard_callbacks
from megatron_autothink.train.checkpoint import CheckpointManager
from megatron_autothink.train.flops import attended_length, mfu, train_flops_per_token
from megatron_autothink.train.loop import run_loop
from megatron_autothink.train.preempt import PreemptionWatcher
from megatron_autothink.train.progress import phase
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


@dataclass
class SFTModule:
    """One SFT step: ``num_micro_batches`` packed micro-batches of this rank through megatron's
    schedule (``train.step.train_step``), the loss per token and per mode."""

    state: LoopState
    num_micro_batches: int
    _started: float = field(default=0.0, init=False)

    def next_item(self) -> list[PackedBatch]:
        self._started = time.perf_counter()  # tokens_per_s counts the wait for data too
        return [next(self.state.data) for _ in range(self.num_micro_batches)]

    def train_step(self, item: list[PackedBatch], step: int) -> dict[str, float]:
        st = self.state
        cfg, ctx = st.cfg, st.ctx
        local_tokens = sum(b.num_tokens for b in item)
        result = train_step(st.chunks, st.opt, item, ctx, seq_length=cfg.data.seq_length)
        dt = time.perf_counter() - self._started
        tokens = local_tokens * ctx.dp  # every DP rank processes the same amount
        metrics: dict[str, float] = {
            "loss": result.loss,
            "loss_thinking": result.loss_thinking,
            "loss_non_thinking": result.loss_non_thinking,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "loss_tokens": float(result.tokens),
            "tokens_per_s": tokens / dt,
            "step_time_s": dt,
        }
        if torch.cuda.is_available():
            head_share = min(result.tokens / tokens, 1.0) if tokens else 1.0
            # attention FLOPs at the packed samples' lengths, not the row's (see attended_length)
            context = attended_length(torch.cat([b.segment_ids for b in item]))
            flops_per_token = train_flops_per_token(cfg.model, context, head_share)
            metrics["mfu"] = mfu(flops_per_token * tokens / dt / ctx.world_size)
            metrics["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return metrics


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
    loader = build_sft_loader(cfg, ctx, path, tokenizer, training=True, split="train")
    state = LoopState.begin(cfg, ctx, stage, chunks, loader, step_offset=step_offset)
    opt, ckpt = state.opt, state.ckpt
    assert ckpt is not None  # LoopState.begin always gives the stage a checkpoint folder
    state.resume(previous)
    if state.step >= stage.steps:
        log.info("stage %s already finished (step %d)", stage.name, state.step)
        return state, ckpt
    eval_path = d.eval_path or path
    state.eval_fn = make_eval_fn(cfg, ctx, chunks, opt, eval_path, tokenizer)
    callbacks = standard_callbacks(cfg, evaluate=True)
    phase(f"stage {stage.name}: training steps {state.step + 1}-{stage.steps}", rank=ctx.rank)
    run_loop(state, SFTModule(state, n_micro), callbacks, watcher=watcher)
    return state, ckpt
