"""The RL stage: rollout (vLLM) -> rewards -> advantages (GRPO/BPO) -> SSR -> megatron update ->
weight sync. One step reads top to bottom in :func:`rl_step`; everything else is set-up.

Which paper does what (all composable through ``cfg.rl``):

* R-4B BPO: ``rl.algorithm=bpo`` forces ``g_think`` thinking and ``g_nothink`` non-thinking
  responses per prompt; advantages over the mixed group.
* VL-Rethinker: ``rl.std_normalize=false`` (mean-only advantages), asymmetric clip
  (``clip_low=0.2 clip_high=0.35``), ``nll_coef=0.05``, ``rl.ssr.enabled``, ``rl.rethink.enabled``.
* LMM-R1: ``rl.algorithm=reinforce`` with group baseline, format 0.5 + accuracy 1.0 rewards,
  stage 1 text-only data (FRE), stage 2 multimodal (MGT), as two ``stages`` of one recipe.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_autothink.config import AutothinkConfig, RLConfig
from megatron_autothink.data.batch import PromptSample
from megatron_autothink.parallel import ParallelContext
from megatron_autothink.rl.actor import compute_logprobs, policy_update
from megatron_autothink.rl.advantages import group_advantages
from megatron_autothink.rl.batching import TrainSequence, pack_sequences
from megatron_autothink.rl.bpo import bpo_advantages
from megatron_autothink.rl.comm import RLComm, engine_owner
from megatron_autothink.rl.rollout import (
    MODE_ID,
    ScoredResponse,
    ScoreFn,
    force_rethinking,
    generate_groups,
)
from megatron_autothink.rl.ssr import ReplayBuffer, ReplayRecord, ssr_select
from megatron_autothink.rollout.parity import logprob_parity
from megatron_autothink.rollout.types import SamplingConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Advantages and sample selection
# ---------------------------------------------------------------------------------------------


def compute_advantages(groups: list[list[ScoredResponse]], rl: RLConfig) -> list[list[float]]:
    """Group advantages per prompt (BPO: over the mixed thinking/non-thinking group)."""
    out: list[list[float]] = []
    for g in groups:
        if not g:
            out.append([])
            continue
        r = torch.tensor([[x.reward for x in g]], dtype=torch.float64)
        if rl.algorithm == "bpo":
            modes = torch.tensor([[x.forced_mode == "long" for x in g]])
            a = bpo_advantages(r, modes, std_normalize=rl.std_normalize)
        else:
            a = group_advantages(r, std_normalize=rl.std_normalize and rl.algorithm == "grpo")
        out.append([float(v) for v in a[0]])
    return out


@dataclass
class ReplayStore:
    """SSR: the buffer of records plus the training payloads they point at (checkpointed)."""

    buffer: ReplayBuffer
    payloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    next_id: int = 0

    def prune(self) -> None:
        keep = {r.payload_key for r in self.buffer.records()}
        self.payloads = {k: v for k, v in self.payloads.items() if k in keep}

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer": self.buffer.state_dict(),
            "payloads": self.payloads,
            "next_id": self.next_id,
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.buffer.load_state_dict(s["buffer"])
        self.payloads = dict(s["payloads"])
        self.next_id = int(s["next_id"])


def _payload(resp: ScoredResponse, prompt: PromptSample, adv: float) -> dict[str, Any]:
    return {
        "prompt_ids": list(prompt.prompt_ids),
        "prefill_ids": resp.prefill_ids,
        "response_ids": resp.response_ids,
        "engine_logprobs": resp.engine_logprobs,
        "advantage": adv,
        "mode_id": MODE_ID["thinking" if resp.thinking else "non_thinking"],
        "correct": resp.correct,
        "pixel_values": prompt.pixel_values,
        "image_grid_thw": prompt.image_grid_thw,
    }


def _sequence(i: int, p: dict[str, Any], nll: bool, train_prefill: bool = False) -> TrainSequence:
    return TrainSequence(
        train_prefill=train_prefill and bool(p["prefill_ids"]),
        sample_index=i,
        prompt_ids=p["prompt_ids"],
        prefill_ids=p["prefill_ids"],
        response_ids=p["response_ids"],
        engine_logprobs=[0.0 if math.isnan(x) else x for x in p["engine_logprobs"]],
        advantage=p["advantage"],
        mode_id=p["mode_id"],
        nll=nll,
        pixel_values=p["pixel_values"],
        image_grid_thw=p["image_grid_thw"],
    )


def select_training_set(
    prompts: list[PromptSample],
    groups: list[list[ScoredResponse]],
    advs: list[list[float]],
    rl: RLConfig,
    replay: ReplayStore | None,
    gen: torch.Generator,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """All samples (optionally dropping zero-advantage groups), or SSR's selection."""
    payloads, solved, records = [], [], []
    zero_groups = 0
    for gi, (g, a) in enumerate(zip(groups, advs, strict=True)):
        zero = all(abs(x) < 1e-12 for x in a)
        zero_groups += zero
        if rl.dynamic_filter and zero and replay is None:
            continue
        all_correct = all(r.correct for r in g)
        for r, adv in zip(g, a, strict=True):
            payloads.append(_payload(r, prompts[gi], adv))
            solved.append(all_correct)
    metrics = {"zero_adv_group_frac": zero_groups / max(len(groups), 1)}
    if replay is None:
        return payloads, metrics
    for p in payloads:
        key = f"s{replay.next_id}"
        records.append(ReplayRecord(replay.next_id, p["advantage"], key))
        replay.payloads[key] = p
        replay.next_id += 1
    sel = ssr_select(
        records,
        solved,
        replay.buffer,
        generator=gen,
        alpha=rl.ssr.alpha,
        all_correct_fraction=rl.ssr.all_correct_share,
    )
    chosen = [replay.payloads[r.payload_key] for r in sel.records]
    replay.prune()
    metrics.update(
        {
            "ssr/buffer_size": float(len(replay.buffer.records())),
            "ssr/replay_share": sel.replay_share,
            "ssr/selected": float(len(chosen)),
        }
    )
    return chosen, metrics


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def rollout_metrics(
    prompts: list[PromptSample], groups: list[list[ScoredResponse]]
) -> dict[str, float]:
    """Reward/accuracy/length per forced mode, thinking trigger rate (auto), per difficulty.

    Lengths are whole assistant turns (prefill + sampled tokens,
    :attr:`~megatron_autothink.rl.rollout.ScoredResponse.num_tokens`), so the modes compare.
    """
    m: dict[str, float] = {}
    flat = [(prompts[r.prompt_index], r) for g in groups for r in g]
    for mode in sorted({r.forced_mode for _, r in flat}):
        rs = [r for _, r in flat if r.forced_mode == mode]
        m[f"rollout/{mode}/reward"] = sum(r.reward for r in rs) / len(rs)
        m[f"rollout/{mode}/accuracy"] = sum(r.correct for r in rs) / len(rs)
        m[f"rollout/{mode}/length"] = sum(r.num_tokens for r in rs) / len(rs)
        m[f"rollout/{mode}/think_rate"] = sum(r.thinking for r in rs) / len(rs)
    m["rollout/vision_token_cuts"] = float(sum(r.vision_cut for _, r in flat))
    # Actual mode used (auto decides by itself): accuracy of thinking vs direct answers.
    for name, flag in (("thinking", True), ("non_thinking", False)):
        rs = [r for _, r in flat if r.thinking == flag]
        if rs:
            m[f"rollout/used_{name}/accuracy"] = sum(r.correct for r in rs) / len(rs)
            m[f"rollout/used_{name}/length"] = sum(r.num_tokens for r in rs) / len(rs)
    return m


def logprob_mismatch(batches: list[Any], old: list[torch.Tensor]) -> dict[str, float]:
    """Engine vs trainer log-probs on the sampled tokens (same weights, before the update).

    Ratios are ``exp(trainer - engine)``, the importance ratio an on-policy step sees
    (:func:`~megatron_autothink.rollout.parity.logprob_parity`).
    """
    engine, trainer = [], []
    for mb, lp in zip(batches, old, strict=True):
        mask = (mb.packed.loss_mask > 0) & (mb.engine_logp != 0)
        engine.append(mb.engine_logp[mask].tolist())
        trainer.append(lp[mask].tolist())
    if not any(engine):
        return {}
    r = logprob_parity(engine, trainer)
    return {
        "mismatch/max_abs": r["max_abs_diff"],
        "mismatch/mean_abs": r["mean_abs_diff"],
        "mismatch/ratio_median": r["ratio_median"],
        "mismatch/ratio_p1": r["ratio_p1"],
        "mismatch/ratio_p99": r["ratio_p99"],
    }


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def rollout_records(
    step: int, prompts: list[PromptSample], groups: list[list[ScoredResponse]]
) -> list[dict[str, Any]]:
    """One JSON-able record per response: what was asked, in which mode, what came back."""
    recs = []
    for g in groups:
        for r in g:
            p = prompts[r.prompt_index]
            recs.append(
                {
                    "step": step,
                    "prompt_id": p.id,
                    "difficulty": p.difficulty,
                    "mode": r.forced_mode,
                    "thinking": r.thinking,
                    "reward": r.reward,
                    "correct": r.correct,
                    "finished": r.finished,
                    "tokens": r.num_tokens,
                    "rethink": r.rethink,
                    "text": r.text,
                }
            )
    return recs


def log_rollouts(path: Path, records: list[dict[str, Any]]) -> None:
    """Append the records to the rollouts JSONL (one line each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


# Metrics that add up over data-parallel ranks (the others are averaged).
SUMMED_METRICS = (
    "samples_trained",
    "ssr/selected",
    "ssr/buffer_size",
    "rollout/vision_token_cuts",
    "rethink/attempted",
    "rethink/accepted",
)


@dataclass
class RLContext:
    """Long-lived objects of one RL stage (built once by :func:`~megatron_autothink.rl.stage.run_stage`)."""

    cfg: AutothinkConfig
    ctx: ParallelContext
    chunks: list[torch.nn.Module]
    ref_chunks: list[torch.nn.Module] | None
    opt: Any
    engine: Any  # RolloutEngine on engine-owning ranks, None elsewhere
    tokenizer: Any
    score: ScoreFn
    replay: ReplayStore | None
    rng: random.Random  # forced-rethinking draws
    gen: torch.Generator  # SSR draws
    pad_id: int
    image_token_id: int
    weight_sync: Any  # callable(version) -> seconds
    comm: RLComm  # engine owner -> model-parallel group; reductions over data parallelism
    rollout_log: Path | None = None  # JSONL of every rollout (prompt id, mode, reward, text)


def rl_step(rc: RLContext, prompts: list[PromptSample], step: int) -> dict[str, float]:
    cfg, rl, ctx = rc.cfg, rc.cfg.rl, rc.ctx
    ro = cfg.rollout
    sampling = SamplingConfig(
        temperature=ro.temperature,
        top_p=ro.top_p,
        max_new_tokens=ro.max_new_tokens,
        seed=cfg.train.seed * 100_003 + step,
    )
    t0 = time.perf_counter()
    # Only the engine owner generates; its model-parallel peers receive the scored groups.
    groups, metrics = rc.comm.run_on_owner(lambda: _rollouts(rc, prompts, sampling, step))
    t_roll = time.perf_counter() - t0
    metrics.update(rollout_metrics(prompts, groups))
    if engine_owner(ctx):
        records = rc.comm.gather_to_first_dp(rollout_records(step, prompts, groups))
        if rc.rollout_log is not None and records is not None:
            log_rollouts(rc.rollout_log, records)
    t1 = time.perf_counter()
    advs = compute_advantages(groups, rl)
    payloads, sel_metrics = select_training_set(prompts, groups, advs, rl, rc.replay, rc.gen)
    metrics.update(sel_metrics)
    t_reward = time.perf_counter() - t1
    t2 = time.perf_counter()
    # Every data-parallel rank steps the optimizer (DDP), also one whose samples were all
    # filtered out: it then packs one empty micro-batch and contributes no tokens.
    if rc.comm.global_count(len(payloads)):
        metrics.update(_update_policy(rc, payloads))
    t_train = time.perf_counter() - t2
    t_sync = rc.weight_sync(step)
    metrics.update(
        {
            "time/rollout_s": t_roll,
            "time/reward_s": t_reward,
            "time/train_s": t_train,
            "time/sync_s": t_sync,
            "samples_trained": float(len(payloads)),
        }
    )
    metrics = rc.comm.reduce_metrics(metrics, SUMMED_METRICS)
    metrics["loss"] = metrics.get("actor/loss", float("nan"))
    metrics["lr"] = metrics.get("actor/lr", float("nan"))
    metrics["grad_norm"] = metrics.get("actor/grad_norm", float("nan"))
    return metrics


def _update_policy(rc: RLContext, payloads: list[dict[str, Any]]) -> dict[str, float]:
    """Pack the selected samples, recompute old/ref log-probs with megatron, update the policy."""
    cfg, rl, ctx = rc.cfg, rc.cfg.rl, rc.ctx
    seqs = [
        _sequence(
            i,
            p,
            nll=p["correct"] and p["advantage"] > 0,
            train_prefill=rl.algorithm == "bpo" and rl.bpo.train_decision,
        )
        for i, p in enumerate(payloads)
    ]
    batches = pack_sequences(
        seqs,
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.data.micro_batch_size,
        pad_id=rc.pad_id,
        image_token_id=rc.image_token_id,
    )
    old = compute_logprobs(rc.chunks, batches, ctx, seq_length=cfg.data.seq_length)
    metrics = logprob_mismatch(batches, old)
    ref = (
        compute_logprobs(rc.ref_chunks, batches, ctx, seq_length=cfg.data.seq_length)
        if rc.ref_chunks is not None
        else None
    )
    for i, mb in enumerate(batches):
        mb.old_logp = old[i]
        mb.ref_logp = None if ref is None else ref[i]
    for _ in range(rl.updates_per_step):
        metrics.update(
            policy_update(rc.chunks, rc.opt, batches, ctx, rl, seq_length=cfg.data.seq_length)
        )
    return metrics


def _rollouts(
    rc: RLContext, prompts: list[PromptSample], sampling: SamplingConfig, step: int
) -> tuple[list[list[ScoredResponse]], dict[str, float]]:
    """Generate and score every prompt's group (+ forced rethinking); engine owner only."""
    rl = rc.cfg.rl
    rc.engine.wake_up()
    groups = generate_groups(rc.engine, prompts, rl, sampling, rc.tokenizer, rc.score, step=step)
    metrics: dict[str, float] = {}
    if rl.rethink.enabled:
        metrics.update(
            force_rethinking(
                rc.engine, prompts, groups, rl, sampling, rc.tokenizer, rc.score, rc.rng
            )
        )
    rc.engine.sleep()
    return groups, metrics
