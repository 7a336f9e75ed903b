"""The RL stage: rollout (vLLM) -> rewards -> advantages (GRPO/BPO) -> SSR -> megatron update ->
weight sync. One step reads top to bottom in :func:`rl_step`; everything else is set-up.

Which paper does what (all composable through ``cfg.rl``):

* R-4B BPO: ``rl.algorithm=bpo`` forces ``g_think`` thinking and ``g_nothink`` non-thinking
  responses per prompt; advantages over the mixed group.
* VL-Rethinker: ``rl.std_normalize=false`` (mean-only advantages), asymmetric clip
  (``clip_low=0.2 clip_high=0.35``), ``nll_coef=0.05``, ``rl.ssr.enabled``, ``rl.rethink.enabled``.
* LMM-R1: ``rl.algorithm=reinforce`` with group baseline, format 0.5 + accuracy 1.0 rewards,
  stage 1 text-only data (FRE), stage 2 multimodal (MGT), as two ``stages`` of one recipe.

Off-policy replays and the reference model:

* ``old_logp`` is always the *behaviour* policy's log-prob: the trainer's log-probs of a
  sample's target tokens under the weights that generated it, computed once, in the step that
  generated it, before the update (:func:`_update_policy`). The engine's log-probs are checked
  against them there (``mismatch/*``); the trainer's are used because they also exist where the
  engine sampled nothing (a rethink prefix, BPO's trained decision prefill) and because they
  share the numerics of the current log-probs in the ratio. A fresh sample therefore starts at
  ratio 1; an SSR replay from step ``k`` carries ``pi_now / pi_k``, so the asymmetric clip and
  the dual-clip (``rl.clip_ratio_c``) act on it even at ``updates_per_step=1``. Its ratio
  statistics are logged as ``actor/replay/*``, its age in steps as ``ssr/replay_age``.
* Forced modes (``rollout.think_rule``): in BPO's ``long`` rollouts the engine bans
  ``</think>`` and EOS until ``rollout.min_think_tokens`` content tokens are written, in
  ``short`` rollouts ``<think>``. The tokens sampled there come from the policy *renormalised*
  over the allowed tokens, but every log-prob in the loss is the unconstrained policy's: the
  trainer's ``old_logp`` and current log-probs are full-vocabulary softmaxes, and the engine
  reports raw log-probs (computed before its logits processors), so ``mismatch/*`` compares the
  same distribution and a fresh sample still starts at ratio 1. No ``pi / pi_banned``
  correction is applied: the forced groups are an intervention, like the prefill, and their
  tokens are trained as what the policy would write *given* that it keeps thinking. The policy
  gets no direct signal on the banned token at those positions (it is never sampled there);
  auto-mode rollouts, where the model decides, are never constrained. See docs/rl.md.
* The KL reference is the policy the stage started from, always: it is saved once under the
  stage's checkpoint folder before the first step and reloaded from there on resume
  (:mod:`megatron_autothink.rl.stage`), never copied from the resumed weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_autothink.config import AutothinkConfig, RLConfig
from megatron_autothink.data.batch import PromptSample
from megatron_autothink.data.image_processing import (
    ImageProcessingConfig,
    decode_image,
    image_patches,
)
from megatron_autothink.modes import mode_id
from megatron_autothink.parallel import ParallelContext
from megatron_autothink.rl.actor import compute_logprobs, policy_update
from megatron_autothink.rl.algorithm import Algorithm
from megatron_autothink.rl.batching import TrainSequence, pack_sequences, per_sample_values
from megatron_autothink.rl.bpo import decision_position, decision_weights
from megatron_autothink.rl.comm import RLComm, engine_owner
from megatron_autothink.rl.rewards.rubric import length_cost
from megatron_autothink.rl.rollout import (
    ScoredResponse,
    ScoreFn,
    force_rethinking,
    generate_groups,
)
from megatron_autothink.rl.ssr import ReplayBuffer, ReplayRecord, ssr_select
from megatron_autothink.rl.types import RolloutRecord, TrainSample
from megatron_autothink.rollout.engine import RolloutEngine
from megatron_autothink.rollout.parity import logprob_parity
from megatron_autothink.rollout.types import SamplingConfig, ThinkRuleSettings
from megatron_autothink.train.setup import OptimizerBundle

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Advantages and sample selection
# ---------------------------------------------------------------------------------------------


def compute_advantages(groups: list[list[ScoredResponse]], algo: Algorithm) -> list[list[float]]:
    """Group advantages per prompt (BPO: over the mixed thinking/non-thinking group)."""
    out: list[list[float]] = []
    for g in groups:
        if not g:
            out.append([])
            continue
        r = torch.tensor([[x.reward for x in g]], dtype=torch.float64)
        forced_long = torch.tensor([[x.forced_mode == "long" for x in g]])
        out.append([float(v) for v in algo.advantages(r, forced_long)[0]])
    return out


def replay_capacity(algo: Algorithm, prompts_per_step: int, dp: int) -> int:
    """SSR buffer capacity of ONE data-parallel rank: half of its own rollouts per step
    (VL-Rethinker's half of the batch), since each rank buffers only the prompts it generated.

    Example:
        8 prompts x 8 samples over 2 ranks: 32 rollouts per rank, 16 buffered (not 32).

        >>> replay_capacity(Algorithm.of(RLConfig(group_size=8)), prompts_per_step=8, dp=2)
        16
        >>> bpo = Algorithm.of(RLConfig(algorithm="bpo", bpo={"g_think": 2, "g_nothink": 1}))
        >>> replay_capacity(bpo, prompts_per_step=2, dp=2)
        1
    """
    return max(1, prompts_per_step // dp * algo.group_size // 2)


class ReplayStore:
    """SSR (per data-parallel rank): the buffer's records plus the samples they point at.

    Holds only what a replay needs (:class:`~megatron_autothink.rl.types.TrainSample`: token
    ids, log-probs, advantage, the images' shard bytes), so its host memory and its share of
    the rank's checkpoint are bounded by ``capacity`` samples (:meth:`nbytes`, logged as
    ``ssr/buffer_mb``).
    """

    def __init__(self, capacity: int) -> None:
        self.buffer = ReplayBuffer(capacity)
        self.samples: dict[str, TrainSample] = {}
        self.next_id = 0

    def prune(self) -> None:
        """Drop the samples no buffered record points at any more."""
        keep = {r.payload_key for r in self.buffer.records()}
        self.samples = {k: v for k, v in self.samples.items() if k in keep}

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.samples.values())

    def state_dict(self) -> dict[str, Any]:
        """Plain containers, tensors and bytes only (``torch.load(weights_only=True)``)."""
        return {
            "buffer": self.buffer.state_dict(),
            "samples": {k: v.state_dict() for k, v in self.samples.items()},
            "next_id": self.next_id,
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.buffer.load_state_dict(s["buffer"])
        self.samples = {k: TrainSample.from_state_dict(v) for k, v in s["samples"].items()}
        self.next_id = int(s["next_id"])


def train_sample(
    resp: ScoredResponse, prompt: PromptSample, adv: float, sample_id: int, version: int
) -> TrainSample:
    """The response joined with its prompt's token ids and encoded images."""
    return TrainSample(
        sample_id=sample_id,
        version=version,
        prompt_ids=torch.tensor(prompt.prompt_ids, dtype=torch.int32),
        prefill_ids=torch.tensor(resp.prefill_ids, dtype=torch.int32),
        response_ids=torch.tensor(resp.response_ids, dtype=torch.int32),
        engine_logprobs=torch.tensor(resp.engine_logprobs, dtype=torch.float32),
        advantage=adv,
        mode_id=mode_id("thinking" if resp.thinking else "non_thinking"),
        correct=resp.correct,
        image_bytes=list(prompt.image_bytes),
    )


@dataclass
class TrainingSet:
    """What one step trains, from :func:`select_training_set`."""

    samples: list[TrainSample]  # the training set in order (SSR: with repeats)
    is_replay: list[bool]  # per sample: from an earlier step
    fresh: list[TrainSample]  # this step's samples that need behaviour log-probs, once each
    metrics: dict[str, float]


def select_training_set(
    prompts: list[PromptSample],
    groups: list[list[ScoredResponse]],
    advs: list[list[float]],
    rl: RLConfig,
    replay: ReplayStore | None,
    gen: torch.Generator,
    step: int,
) -> TrainingSet:
    """All samples (``rl.dynamic_filter``: without zero-advantage groups), or SSR's selection.

    ``fresh`` lists this step's samples that are trained now or kept for later replays: the
    update computes their behaviour log-probs under the current (generating) policy before it
    changes the weights.
    """
    samples: list[TrainSample] = []
    solved: list[bool] = []
    zero_groups = 0
    first_id = replay.next_id if replay is not None else 0
    for gi, (g, a) in enumerate(zip(groups, advs, strict=True)):
        zero = all(abs(x) < 1e-12 for x in a)
        zero_groups += zero
        if rl.dynamic_filter and zero and replay is None:
            continue
        all_correct = all(r.correct for r in g)
        for r, adv in zip(g, a, strict=True):
            samples.append(train_sample(r, prompts[gi], adv, first_id + len(samples), step))
            solved.append(all_correct)
    metrics = {"zero_adv_group_frac": zero_groups / max(len(groups), 1)}
    if replay is None:
        # VL-Rethinker's "effective" batch: only samples with a non-zero advantage move the
        # policy (the rest contribute a zero policy-gradient term).
        metrics["samples_nonzero_adv"] = float(sum(abs(x.advantage) > 1e-12 for x in samples))
        return TrainingSet(samples, [False] * len(samples), list(samples), metrics)
    records = []
    for s in samples:
        key = f"s{s.sample_id}"
        records.append(ReplayRecord(s.sample_id, s.advantage, key))
        replay.samples[key] = s
    replay.next_id = first_id + len(samples)
    sel = ssr_select(
        records,
        solved,
        replay.buffer,
        generator=gen,
        alpha=rl.ssr.alpha,
        all_correct_fraction=rl.ssr.all_correct_share,
    )
    chosen = [replay.samples[r.payload_key] for r in sel.records]
    replay.prune()
    needed = {s.sample_id for s in replay.samples.values()}
    needed |= {s.sample_id for s, rep in zip(chosen, sel.is_replay, strict=True) if not rep}
    fresh = [s for s in samples if s.sample_id in needed]
    ages = [step - s.version for s, rep in zip(chosen, sel.is_replay, strict=True) if rep]
    metrics.update(
        {
            "ssr/buffer_size": float(len(replay.buffer.records())),
            "ssr/replay_share": sel.replay_share,
            "ssr/selected": float(len(chosen)),
            "samples_nonzero_adv": float(sum(abs(x.advantage) > 1e-12 for x in chosen)),
            # Samples of the training set replayed from earlier steps (they are trained now).
            "ssr/replayed": float(sum(sel.is_replay)),
        }
    )
    if ages:
        metrics["ssr/replay_age"] = sum(ages) / len(ages)
    return TrainingSet(chosen, list(sel.is_replay), fresh, metrics)


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
    (:func:`~megatron_autothink.rollout.parity.logprob_parity`). The positions where the
    forced-mode rule banned tokens count like any other: the engine's raw log-probs there are
    the unconstrained policy's, as the trainer's are (``logprobs_mode="raw_logprobs"``).
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
) -> list[RolloutRecord]:
    """One record per response, in prompt order."""
    return [
        RolloutRecord(
            step=step,
            prompt_id=prompts[r.prompt_index].id,
            difficulty=prompts[r.prompt_index].difficulty,
            mode=r.forced_mode,
            thinking=r.thinking,
            reward=r.reward,
            correct=r.correct,
            finished=r.finished,
            tokens=r.num_tokens,
            rethink=r.rethink,
            text=r.text,
        )
        for g in groups
        for r in g
    ]


def log_rollouts(path: Path, records: list[RolloutRecord]) -> None:
    """Append the records to the rollouts JSONL (one line each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for rec in records:
            f.write(json.dumps(dataclasses.asdict(rec)) + "\n")


# Metrics that add up over data-parallel ranks (the others are averaged).
SUMMED_METRICS = (
    "samples_trained",
    "samples_nonzero_adv",
    "ssr/selected",
    "ssr/replayed",
    "ssr/buffer_size",
    "ssr/buffer_mb",
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
    opt: OptimizerBundle
    engine: RolloutEngine | None  # on engine-owning ranks (rl.comm.engine_owner), else None
    tokenizer: PreTrainedTokenizerBase
    algo: Algorithm  # chosen once, from rl.algorithm, where the stage is built
    score: ScoreFn
    replay: ReplayStore | None
    rng: random.Random  # forced-rethinking draws
    gen: torch.Generator  # SSR draws
    pad_id: int
    image_token_id: int
    image: ImageProcessingConfig  # the loader's: replays re-decode their shard bytes with it
    weight_sync: Callable[[int], float]  # (policy version) -> seconds taken
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
        # BPO's forced groups must think / not think for real (rollout.think_rule).
        think_rule=ThinkRuleSettings.of(ro),
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
    advs = compute_advantages(groups, rc.algo)
    ts = select_training_set(prompts, groups, advs, rl, rc.replay, rc.gen, step)
    metrics.update(ts.metrics)
    t_reward = time.perf_counter() - t1
    t2 = time.perf_counter()
    # Every data-parallel rank steps the optimizer (DDP), also one whose samples were all
    # filtered out: it then packs one empty micro-batch and contributes no tokens.
    if rc.comm.global_count(len(ts.samples)):
        metrics.update(_update_policy(rc, ts, prompts))
    t_train = time.perf_counter() - t2
    if rc.replay is not None:  # after the update: the buffered samples' log-probs count too
        metrics["ssr/buffer_mb"] = rc.replay.nbytes() / 2**20
    t_sync = rc.weight_sync(step)
    metrics.update(
        {
            "time/rollout_s": t_roll,
            "time/reward_s": t_reward,
            "time/train_s": t_train,
            "time/sync_s": t_sync,
            "samples_trained": float(len(ts.samples)),
        }
    )
    metrics = rc.comm.reduce_metrics(metrics, SUMMED_METRICS)
    metrics["loss"] = metrics.get("actor/loss", float("nan"))
    metrics["lr"] = metrics.get("actor/lr", float("nan"))
    metrics["grad_norm"] = metrics.get("actor/grad_norm", float("nan"))
    return metrics


# A sample's images (its shard bytes) -> (pixel_values, image_grid_thw), decoded once per step.
_Images = dict[tuple[bytes, ...], tuple[torch.Tensor | None, torch.Tensor | None]]


def _sequences(
    rc: RLContext,
    samples: list[TrainSample],
    is_replay: list[bool],
    decoded: _Images,
    *,
    with_old: bool,
) -> list[TrainSequence]:
    """The packing input; images come from ``decoded`` or are decoded from the shard bytes
    (replays) into it; ``with_old`` packs the behaviour log-probs."""
    rl = rc.cfg.rl
    train_prefill = rc.algo.trains_decision
    anchor = rl.bpo.prefill_anchor if train_prefill and rl.bpo.prefill_anchor > 0 else None
    seqs = []
    for i, (s, rep) in enumerate(zip(samples, is_replay, strict=True)):
        key = tuple(s.image_bytes)
        if key not in decoded:
            pixels, grid, _ = image_patches([decode_image(b) for b in key], rc.image)
            decoded[key] = (pixels, grid)
        pixels, grid = decoded[key]
        old = None
        if with_old:
            if s.behaviour_logprobs is None:
                raise RuntimeError(f"sample {s.sample_id} has no behaviour log-probs")
            old = s.behaviour_logprobs.tolist()
        seqs.append(
            TrainSequence(
                sample_index=i,
                prompt_ids=s.prompt_ids.tolist(),
                prefill_ids=s.prefill_ids.tolist(),
                response_ids=s.response_ids.tolist(),
                engine_logprobs=torch.nan_to_num(s.engine_logprobs, nan=0.0).tolist(),
                advantage=s.advantage,
                mode_id=s.mode_id,
                nll=s.correct and s.advantage > 0,
                train_prefill=train_prefill and s.prefill_ids.numel() > 0,
                decision_target=s.decision_index if train_prefill else -1,
                decision_weight=s.decision_weight,
                prefix_advantage=anchor,
                pixel_values=pixels,
                image_grid_thw=grid,
                old_logprobs=old,
                replay=rep,
            )
        )
    return seqs


def weigh_decisions(
    fresh: Sequence[TrainSample], g_think: int, g_nothink: int, *, apply: bool
) -> dict[str, float]:
    """BPO: find each sample's mode decision, read the policy's probability of thinking per
    prompt off the behaviour log-prob of the non-thinking samples' decision token, and
    (``apply``) set each sample's decision weight
    (:func:`~megatron_autothink.rl.bpo.decision_weights`); samples are updated in place.

    A group is a prompt's ``g_think + g_nothink`` samples of one step: ids are handed out group
    by group from a multiple of the group size (:func:`select_training_set`), so
    ``sample_id // G`` names it and ``sample_id % G < g_think`` says it was forced to think
    (the forced mode, not ``mode_id``: a forced trace can come out empty). Every sample with a
    prefill gets its ``decision_index`` (where the two modes' prefills part); a group that is
    not whole here (SSR kept part of it) gets no weights: its forced share is not the one its
    samples were drawn with.

    Returns ``bpo/p_think`` (mean over whole groups): auto mode's thinking probability on this
    step's prompts, and ``bpo/p_opening``: the policy's probability of the tokens both prefills
    open with (``<think>\n``), i.e. of auto mode's answer starting in the format at all
    (``rl.bpo.prefill_anchor`` holds it up), both free with the behaviour log-probs.
    """
    size = g_think + g_nothink
    if not fresh or not g_think or not g_nothink:
        return {}
    prefills: tuple[set[tuple[int, ...]], set[tuple[int, ...]]] = (set(), set())
    for s in fresh:
        prefills[0 if s.sample_id % size < g_think else 1].add(tuple(s.prefill_ids.tolist()))
    if len(prefills[0]) > 1 or len(prefills[1]) > 1:
        raise RuntimeError(
            f"samples {fresh[0].sample_id}..: the forced prefills differ within a mode "
            "(rollouts out of BPO's layout)"
        )
    if not prefills[0] or not prefills[1]:
        return {}  # one mode only in this step's samples: nothing to tell the decision by
    d = decision_position(list(*prefills[0]), list(*prefills[1]))
    opening = []
    for s in fresh:
        if s.behaviour_logprobs is None:
            raise RuntimeError(f"sample {s.sample_id}: decision weights need behaviour log-probs")
        # A thinking-forced rollout that generated nothing has no decision target (its
        # prefill stops before the decision when the tokenizer splits "\n\n").
        if d < s.prefill_ids.numel() + s.response_ids.numel():
            s.decision_index = d
        opening.append(float(s.behaviour_logprobs[:d].sum().exp()))
    groups: dict[tuple[int, int], list[TrainSample]] = {}
    for s in fresh:
        groups.setdefault((s.version, s.sample_id // size), []).append(s)
    p_think = []
    for members in groups.values():
        if len(members) != size:
            continue
        members.sort(key=lambda s: s.sample_id)
        lp = [
            s.behaviour_logprobs[d] for s in members[g_think:] if s.behaviour_logprobs is not None
        ]
        # The same context for every short sample of the prompt: equal up to packing numerics.
        p = torch.stack(lp).exp().mean()
        p_think.append(1.0 - float(p))
        if apply:
            modes = torch.tensor([[True] * g_think + [False] * g_nothink])
            for s, w in zip(members, decision_weights(p.reshape(1), modes)[0], strict=True):
                if s.decision_index >= 0:
                    s.decision_weight = float(w)
    out = {"bpo/p_opening": sum(opening) / len(opening)}
    if p_think:
        out["bpo/p_think"] = sum(p_think) / len(p_think)
    return out


def _update_policy(
    rc: RLContext, ts: TrainingSet, prompts: Sequence[PromptSample] = ()
) -> dict[str, float]:
    """Behaviour log-probs of this step's samples, then the update on the training set.

    ``prompts`` (the step's) lend their already decoded pixels to this step's samples, which
    hold the same shard bytes (the loader's decoding is bit-identical to a replay's), so only
    replays decode images here, once for both packings.

    1. ``ts.fresh`` (this step's samples, each once) under the current weights, which generated
       them: their ``behaviour_logprobs``, compared with the engine's (``mismatch/*``).
    2. The training set packed with every sample's behaviour log-probs as ``old_logp``: fresh
       samples are on-policy (ratio 1 before the update), replays carry
       ``pi_now / pi_behaviour`` (``actor/replay/*``).
    """
    cfg, rl, ctx = rc.cfg, rc.cfg.rl, rc.ctx
    pack = partial(
        pack_sequences,
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.data.micro_batch_size,
        pad_id=rc.pad_id,
        image_token_id=rc.image_token_id,
    )
    decoded: _Images = {
        tuple(p.image_bytes): (p.pixel_values, p.image_grid_thw)
        for p in prompts
        if len(p.image_bytes) == len(p.images)  # every image has its shard bytes
    }
    metrics: dict[str, float] = {}
    if ts.fresh:  # the same on every rank of a model-parallel group (collectives inside)
        scoring = pack(_sequences(rc, ts.fresh, [False] * len(ts.fresh), decoded, with_old=False))
        behaviour = compute_logprobs(rc.chunks, scoring, ctx, seq_length=cfg.data.seq_length)
        metrics.update(logprob_mismatch(scoring, behaviour))
        values = per_sample_values(scoring, behaviour, len(ts.fresh))
        for s, v in zip(ts.fresh, values, strict=True):
            s.behaviour_logprobs = torch.tensor(v, dtype=torch.float32)
        if rc.algo.trains_decision:
            metrics.update(
                weigh_decisions(
                    ts.fresh,
                    rl.bpo.g_think,
                    rl.bpo.g_nothink,
                    apply=rl.bpo.decision_weighting == "importance",
                )
            )
    batches = pack(_sequences(rc, ts.samples, ts.is_replay, decoded, with_old=True))
    if rc.ref_chunks is not None:
        ref = compute_logprobs(rc.ref_chunks, batches, ctx, seq_length=cfg.data.seq_length)
        for mb, r in zip(batches, ref, strict=True):
            mb.ref_logp = r
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
    if rc.engine is None:
        raise RuntimeError(f"rank {rc.ctx.rank} owns no rollout engine but was asked to generate")
    rc.engine.wake_up()
    groups = generate_groups(
        rc.engine, prompts, rc.algo, sampling, rc.tokenizer, rc.score, step=step
    )
    metrics: dict[str, float] = {}
    if rl.rethink.enabled:
        metrics.update(
            force_rethinking(
                rc.engine, prompts, groups, rl, sampling, rc.tokenizer, rc.score, rc.rng
            )
        )
    rc.engine.sleep()
    if rl.rewards.length_cost:
        for group in groups:
            for r in group:
                cost = length_cost(
                    r.correct, r.num_tokens, sampling.max_new_tokens, rl.rewards.length_cost
                )
                r.reward -= cost
                r.components["length_cost"] = cost
    return groups, metrics
