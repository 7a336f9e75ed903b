"""The trainer's glue on tiny hand-made inputs: advantages per group, the training set (with and
without SSR), replay payloads (typed, bounded, weights_only checkpoints) and the behaviour
log-probs a replay trains with."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from PIL import Image

from megatron_autothink.config import AutothinkConfig, RLConfig
from megatron_autothink.data.batch import PromptSample
from megatron_autothink.data.image_processing import ImageProcessingConfig, encode_image
from megatron_autothink.rl import trainer
from megatron_autothink.rl.algorithm import Algorithm
from megatron_autothink.rl.batching import RLMicroBatch, TrainSequence, pack_sequences
from megatron_autothink.rl.losses import policy_loss
from megatron_autothink.rl.rollout import ScoredResponse
from megatron_autothink.rl.trainer import (
    ReplayStore,
    RLContext,
    TrainingSet,
    compute_advantages,
    select_training_set,
)
from megatron_autothink.rl.types import TrainSample

PNG = encode_image(Image.new("RGB", (56, 56), (200, 30, 30)))


def _resp(reward: float, correct: bool = False, mode: str = "auto", n: int = 2) -> ScoredResponse:
    return ScoredResponse(
        prompt_index=0,
        forced_mode=mode,
        prefill_ids=[9] if mode != "auto" else [],
        response_ids=list(range(10, 10 + n)),
        engine_logprobs=[-0.5] * n,
        text="",
        finished=True,
        reward=reward,
        correct=correct,
        thinking=mode == "long",
    )


def _prompt(pid: str, images: bool = True) -> PromptSample:
    return PromptSample(
        id=pid,
        prompt="",
        prompt_ids=[1, 2, 3],
        vllm_prompt="",
        image_bytes=[PNG] if images else [],
    )


# ---------------------------------------------------------------------------------------------
# compute_advantages
# ---------------------------------------------------------------------------------------------


def test_compute_advantages_per_algorithm() -> None:
    groups = [[_resp(1.0), _resp(0.0), _resp(0.0), _resp(1.0)], []]
    # GRPO: (r - 0.5) / (std + 1e-6), unbiased std of [1, 0, 0, 1] = sqrt(1/3)
    grpo = compute_advantages(groups, Algorithm.of(RLConfig(algorithm="grpo")))
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert grpo[0] == pytest.approx([a, -a, -a, a]) and grpo[1] == []
    # REINFORCE with baseline (LMM-R1): mean only, even with std_normalize left on
    one_right = [[_resp(1.0), _resp(0.0), _resp(0.0), _resp(0.0)]]
    assert compute_advantages(one_right, Algorithm.of(RLConfig(algorithm="reinforce"))) == [
        [0.75, -0.25, -0.25, -0.25]
    ]
    # VL-Rethinker's GRPO without std
    assert compute_advantages(one_right, Algorithm.of(RLConfig(std_normalize=False))) == [
        [0.75, -0.25, -0.25, -0.25]
    ]
    # BPO: one baseline over the mixed group (thinking solves it, non-thinking does not)
    bpo = [[_resp(1.0, mode="long"), _resp(1.0, mode="long"), _resp(0.0, mode="short")]]
    out = compute_advantages(bpo, Algorithm.of(RLConfig(algorithm="bpo", std_normalize=False)))
    assert out[0] == pytest.approx([1 / 3, 1 / 3, -2 / 3])


# ---------------------------------------------------------------------------------------------
# select_training_set
# ---------------------------------------------------------------------------------------------


def _two_groups() -> tuple[list[PromptSample], list[list[ScoredResponse]], list[list[float]]]:
    prompts = [_prompt("a"), _prompt("b", images=False)]
    groups = [
        [_resp(1.0, True), _resp(0.0), _resp(1.0, True), _resp(0.0)],
        [_resp(1.0, True, n=3) for _ in range(4)],  # solved by all: zero advantage
    ]
    return prompts, groups, [[0.5, -0.5, 0.5, -0.5], [0.0] * 4]


def test_training_set_without_ssr() -> None:
    prompts, groups, advs = _two_groups()
    gen = torch.Generator().manual_seed(0)
    ts = select_training_set(prompts, groups, advs, RLConfig(), None, gen, step=3)
    assert [s.sample_id for s in ts.samples] == list(range(8))
    assert ts.fresh == ts.samples and ts.is_replay == [False] * 8
    assert ts.metrics == {"zero_adv_group_frac": 0.5, "samples_nonzero_adv": 4.0}
    s0, s4 = ts.samples[0], ts.samples[4]
    assert s0.version == 3 and s0.advantage == 0.5 and s0.correct and s0.mode_id == 0
    assert s0.prompt_ids.dtype == torch.int32 and s0.prompt_ids.tolist() == [1, 2, 3]
    assert s0.response_ids.tolist() == [10, 11] and s4.response_ids.tolist() == [10, 11, 12]
    assert s0.image_bytes == [PNG] and s4.image_bytes == []
    assert s0.behaviour_logprobs is None  # the update computes them
    # DAPO-style dynamic filter drops the zero-advantage group (no refill)
    filtered = select_training_set(
        prompts, groups, advs, RLConfig(dynamic_filter=True), None, gen, step=3
    )
    assert [s.advantage for s in filtered.samples] == [0.5, -0.5, 0.5, -0.5]


def test_training_set_with_ssr_replays_buffered_samples() -> None:
    rl = RLConfig(ssr={"enabled": True, "all_correct_share": 0.5})
    store = ReplayStore(capacity=2)
    gen = torch.Generator().manual_seed(0)
    prompts, groups, advs = _two_groups()
    ts = select_training_set(prompts, groups, advs, rl, store, gen, step=1)
    # 8 rollouts -> 4 trained: min(4 non-zero, 4) fresh |A|-weighted draws, no room for more
    assert len(ts.samples) == 4 and ts.is_replay == [False] * 4
    assert all(s.advantage != 0 for s in ts.samples)
    # FIFO of capacity 2 keeps the last two non-zero samples (ids 2, 3)
    assert [r.sample_id for r in store.buffer.records()] == [2, 3]
    assert sorted(store.samples) == ["s2", "s3"]
    # behaviour log-probs are needed for everything trained now or replayed later, once each
    need = {s.sample_id for s in ts.samples} | {2, 3}
    assert sorted(s.sample_id for s in ts.fresh) == sorted(need)
    for s in ts.fresh:
        s.behaviour_logprobs = torch.full((2,), -1.0 - s.sample_id)
    assert ts.metrics["ssr/buffer_size"] == 2.0 and "ssr/replay_age" not in ts.metrics
    assert ts.metrics["samples_nonzero_adv"] == 4.0
    # Step 2: every group is flat, so the whole training set is replays from step 1
    flat = [[_resp(1.0, True) for _ in range(4)], [_resp(0.0) for _ in range(4)]]
    ts2 = select_training_set(prompts, flat, [[0.0] * 4] * 2, rl, store, gen, step=2)
    assert len(ts2.samples) == 4 and ts2.is_replay == [True] * 4
    assert {s.sample_id for s in ts2.samples} == {2, 3} and ts2.fresh == []
    # the replays carry the step-1 behaviour log-probs, untouched
    for s in ts2.samples:
        assert s.behaviour_logprobs is not None
        assert s.behaviour_logprobs.tolist() == [-1.0 - s.sample_id] * 2
    assert ts2.metrics["ssr/replay_age"] == 1.0 and ts2.metrics["ssr/replay_share"] == 1.0
    assert store.next_id == 16


# ---------------------------------------------------------------------------------------------
# Replay payloads
# ---------------------------------------------------------------------------------------------


def test_replay_store_checkpoint_is_weights_only_and_holds_no_pixels() -> None:
    rl = RLConfig(ssr={"enabled": True})
    store = ReplayStore(capacity=2)
    gen = torch.Generator().manual_seed(0)
    prompts, groups, advs = _two_groups()
    sizes = []
    for step in range(1, 6):  # the buffer (and the checkpoint) stay bounded over steps
        ts = select_training_set(prompts, groups, advs, rl, store, gen, step=step)
        for s in ts.fresh:
            s.behaviour_logprobs = torch.full((2,), -0.25)
        buf = io.BytesIO()
        torch.save(store.state_dict(), buf)
        sizes.append(buf.tell())
    # two samples of 3 prompt + 2 response ids (int32), 2 + 2 float32 log-probs, one PNG each
    assert store.nbytes() == 2 * (3 * 4 + 2 * 4 + 2 * 4 + 2 * 4 + len(PNG))
    assert len(set(sizes)) == 1  # same size every step: nothing accumulates
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    again = ReplayStore(capacity=2)
    again.load_state_dict(loaded)
    assert again.samples == store.samples and again.next_id == store.next_id
    assert again.buffer.records() == store.buffer.records()
    # no decoded image anywhere: every float tensor is a [K] log-prob vector
    for s in loaded["samples"].values():
        assert s["image_bytes"] == [PNG]
        assert all(v.dim() == 1 for v in s.values() if isinstance(v, torch.Tensor))


def test_pack_places_behaviour_logprobs_and_replay_mask_at_label_positions() -> None:
    def seq(i: int, old: list[float] | None, prefill: list[int], rep: bool) -> TrainSequence:
        return TrainSequence(
            sample_index=i,
            prompt_ids=[1, 2],
            prefill_ids=prefill,
            response_ids=[3, 4],
            engine_logprobs=[-0.5, -0.5],
            advantage=1.0,
            mode_id=1,
            train_prefill=bool(prefill),
            old_logprobs=old,
            replay=rep,
        )

    # Row: [1 2 3 4 | 1 2 9 3 4 | pad]; targets of sample 0 are tokens 3, 4 (labels at 1, 2);
    # sample 1 trains its prefill 9 too (labels at 5, 6, 7).
    (mb,) = pack_sequences(
        [seq(0, [-0.1, -0.2], [], False), seq(1, [-0.3, -0.4, -0.6], [9], True)],
        seq_length=10,
        micro_batch_size=1,
        pad_id=0,
        image_token_id=99,
    )
    assert mb.old_logp is not None
    assert mb.sample_index[0].tolist() == [-1, 0, 0, -1, -1, 1, 1, 1, -1, -1]
    expected = [0.0, -0.1, -0.2, 0.0, 0.0, -0.3, -0.4, -0.6, 0.0, 0.0]
    torch.testing.assert_close(mb.old_logp[0], torch.tensor(expected))
    assert mb.replay_mask[0].tolist() == [False] * 5 + [True] * 3 + [False] * 2
    with pytest.raises(ValueError, match="old_logprobs"):
        pack_sequences(
            [seq(0, [-0.1], [], False)], seq_length=10, micro_batch_size=1, pad_id=0,
            image_token_id=99,
        )  # fmt: skip
    with pytest.raises(ValueError, match="every sequence"):
        pack_sequences(
            [seq(0, None, [], False), seq(1, [-0.1, -0.2], [], False)], seq_length=12,
            micro_batch_size=1, pad_id=0, image_token_id=99,
        )  # fmt: skip


def test_update_policy_trains_replays_on_their_behaviour_logprobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fresh samples get their behaviour log-probs from the current policy (here a stub that
    says -0.5 everywhere); a replay keeps the ones stored when it was generated (-2.0)."""
    seen: dict[str, Any] = {}

    def fake_logprobs(chunks: Any, batches: list[RLMicroBatch], ctx: Any, **kw: Any) -> list:
        seen.setdefault("scored", []).append(batches)
        return [-0.5 * mb.packed.loss_mask for mb in batches]

    def fake_update(chunks: Any, opt: Any, batches: list[RLMicroBatch], *a: Any, **kw: Any):
        seen["trained"] = batches
        return {"actor/loss": 0.0}

    monkeypatch.setattr(trainer, "compute_logprobs", fake_logprobs)
    monkeypatch.setattr(trainer, "policy_update", fake_update)
    cfg = AutothinkConfig()
    cfg.data.seq_length, cfg.data.micro_batch_size = 64, 1
    rc: Any = RLContext(
        cfg=cfg, ctx=None, chunks=[], ref_chunks=None, opt=None, engine=None, tokenizer=None,
        algo=Algorithm.of(cfg.rl), score=None, replay=None, rng=None, gen=None, pad_id=0, image_token_id=99,
        image=ImageProcessingConfig(), weight_sync=None, comm=None,
    )  # fmt: skip

    def sample(i: int, old: torch.Tensor | None) -> TrainSample:
        return TrainSample(
            sample_id=i, version=1, prompt_ids=torch.tensor([1, 2], dtype=torch.int32),
            prefill_ids=torch.zeros(0, dtype=torch.int32),
            response_ids=torch.tensor([3, 4], dtype=torch.int32),
            engine_logprobs=torch.tensor([-0.5, float("nan")]), advantage=1.0, mode_id=0,
            correct=False, image_bytes=[], behaviour_logprobs=old,
        )  # fmt: skip

    fresh, replay = sample(0, None), sample(1, torch.tensor([-2.0, -2.0]))
    trainer._update_policy(rc, TrainingSet([fresh, replay], [False, True], [fresh], {}))
    assert fresh.behaviour_logprobs is not None
    assert fresh.behaviour_logprobs.tolist() == [-0.5, -0.5]
    assert len(seen["scored"]) == 1  # one scoring pass, over the fresh sample only
    old = torch.cat([mb.old_logp[mb.packed.loss_mask > 0] for mb in seen["trained"]])
    rep = torch.cat([mb.replay_mask[mb.packed.loss_mask > 0] for mb in seen["trained"]])
    assert sorted(old[rep].tolist()) == [-2.0, -2.0] and old[~rep].tolist() == [-0.5, -0.5]


# ---------------------------------------------------------------------------------------------
# BPO decision weighting
# ---------------------------------------------------------------------------------------------

LONG, SHORT = [775, 198], [775, 198, 198, 776, 198, 198]  # the demo tokenizer's prefills


def _forced(mode: str, reward: float) -> ScoredResponse:
    r = _resp(reward, correct=reward > 0, mode=mode, n=3)
    r.prefill_ids = list(LONG if mode == "long" else SHORT)
    return r


def test_weigh_decisions_reads_p_think_and_weights_whole_groups_only() -> None:
    """Two prompts, 2 + 2 each: the policy answers prompt 0 directly with p = 0.8 and prompt 1
    with p = 0.3 (the short samples' decision log-prob, target 2); each sample's decision
    weight is pi(mode) / q(mode), and only that target's advantage is scaled in the packing."""
    rl = RLConfig(algorithm="bpo", std_normalize=False)
    groups = [
        [_forced("long", 1.0), _forced("long", 1.0), _forced("short", 0.0), _forced("short", 0.0)]
        for _ in range(2)
    ]
    prompts = [_prompt("p0"), _prompt("p1")]
    advs = compute_advantages(groups, Algorithm.of(rl))
    gen = torch.Generator().manual_seed(0)
    ts = select_training_set(prompts, groups, advs, rl, None, gen, step=1)
    for s in ts.samples:
        s.behaviour_logprobs = torch.full((s.prefill_ids.numel() + 3,), -0.1)
    for s, p in zip(ts.samples[2:4] + ts.samples[6:8], (0.8, 0.8, 0.3, 0.3), strict=True):
        s.behaviour_logprobs[2] = math.log(p)
    # a forced trace that came out empty is a non-thinking *response* (mode_id 0) of a sample
    # forced to think: its weight is the thinking one (the forced share is what q is)
    ts.samples[1].mode_id = 0
    m = trainer.weigh_decisions(ts.samples, 2, 2, apply=True)
    assert m["bpo/p_think"] == pytest.approx((0.2 + 0.7) / 2)
    # the shared opening (targets 0-1, log-prob -0.1 each) under the policy
    assert m["bpo/p_opening"] == pytest.approx(math.exp(-0.2))
    assert [s.decision_index for s in ts.samples] == [2] * 8
    weights = [round(s.decision_weight, 4) for s in ts.samples]
    assert weights == [0.4, 0.4, 1.6, 1.6, 1.4, 1.4, 0.6, 0.6]
    # the weight survives a replay buffer checkpoint
    again = TrainSample.from_state_dict(ts.samples[2].state_dict())
    assert (again.decision_index, again.decision_weight) == (2, pytest.approx(1.6))
    # a partial group (SSR kept 3 of 4) finds its decision but is not weighted, and gives no
    # p_think; without apply only the probabilities are read
    fresh = [TrainSample.from_state_dict(s.state_dict()) for s in ts.samples[:3]]
    for s in fresh:
        s.decision_index, s.decision_weight = -1, 1.0
    assert "bpo/p_think" not in trainer.weigh_decisions(fresh, 2, 2, apply=True)
    assert [(s.decision_index, s.decision_weight) for s in fresh] == [(2, 1.0)] * 3
    plain = [TrainSample.from_state_dict(s.state_dict()) for s in ts.samples]
    for s in plain:
        s.decision_index, s.decision_weight = -1, 1.0
    assert trainer.weigh_decisions(plain, 2, 2, apply=False)["bpo/p_think"] == pytest.approx(0.45)
    assert [(s.decision_index, s.decision_weight) for s in plain] == [(2, 1.0)] * 8


def test_weigh_decisions_refuses_groups_out_of_bpo_layout() -> None:
    rl = RLConfig(algorithm="bpo", std_normalize=False)
    groups = [
        [_forced("long", 1.0), _forced("short", 0.0), _forced("long", 1.0), _forced("short", 0.0)]
    ]
    ts = select_training_set(
        [_prompt("p0")],
        groups,
        compute_advantages(groups, Algorithm.of(rl)),
        rl,
        None,
        torch.Generator(),
        step=1,
    )
    for s in ts.samples:
        s.behaviour_logprobs = torch.full((s.prefill_ids.numel() + 3,), -0.1)
    with pytest.raises(RuntimeError, match="forced prefills differ within a mode"):
        trainer.weigh_decisions(ts.samples, 2, 2, apply=True)


def test_weigh_decisions_skips_a_forced_trace_with_no_tokens() -> None:
    """A thinking-forced rollout the engine returned empty (seen once in 160 steps, unfinished,
    0 tokens) has no decision target: it is left unweighted and packs, the others are weighted."""
    rl = RLConfig(algorithm="bpo", std_normalize=False)
    groups = [
        [_forced("long", 1.0), _forced("long", 0.0), _forced("short", 0.0), _forced("short", 0.0)]
    ]
    groups[0][1].response_ids, groups[0][1].engine_logprobs = [], []
    ts = select_training_set(
        [_prompt("p0")],
        groups,
        compute_advantages(groups, Algorithm.of(rl)),
        rl,
        None,
        torch.Generator(),
        step=1,
    )
    for s in ts.samples:
        s.behaviour_logprobs = torch.full((s.prefill_ids.numel() + s.response_ids.numel(),), -0.1)
    trainer.weigh_decisions(ts.samples, 2, 2, apply=True)
    assert [s.decision_index for s in ts.samples] == [2, -1, 2, 2]
    seqs = [
        TrainSequence(
            sample_index=i,
            prompt_ids=s.prompt_ids.tolist(),
            prefill_ids=s.prefill_ids.tolist(),
            response_ids=s.response_ids.tolist(),
            engine_logprobs=s.engine_logprobs.tolist(),
            advantage=s.advantage,
            mode_id=s.mode_id,
            train_prefill=True,
            old_logprobs=s.behaviour_logprobs.tolist(),
            decision_target=s.decision_index,
            decision_weight=s.decision_weight,
        )
        for i, s in enumerate(ts.samples)
    ]
    assert pack_sequences(seqs, seq_length=64, micro_batch_size=1, pad_id=0, image_token_id=7)


@pytest.mark.parametrize("anchor", [0.0, 1.0])
def test_prefill_anchor_holds_the_opening_both_forced_modes_share(
    monkeypatch: pytest.MonkeyPatch, anchor: float
) -> None:
    """A bigram policy trained by the trainer's own packing and loss on one BPO group (a right
    thinking answer, a wrong direct one). The tokens both prefills open with (``<think>``,
    ``\\n``) are targets of both samples in the same context, so their advantages cancel: the
    update leaves auto mode's opening exactly where it was, whatever the rest of the policy
    does. ``rl.bpo.prefill_anchor`` gives them a push of their own; the decision still moves."""
    vocab = 800
    w = torch.zeros(vocab, vocab, requires_grad=True)  # logits of the next token given this one
    with torch.no_grad():
        w[3, 775] = w[775, 198] = -1.0  # an opening the policy has partly unlearnt

    def logp_of(mb: RLMicroBatch) -> torch.Tensor:
        t = mb.packed.tokens
        lp = torch.log_softmax(w[t], -1).gather(-1, mb.packed.labels.unsqueeze(-1)).squeeze(-1)
        return lp * mb.packed.loss_mask

    trained: list[RLMicroBatch] = []
    monkeypatch.setattr(
        trainer, "compute_logprobs", lambda c, b, x, **k: [logp_of(mb).detach() for mb in b]
    )
    monkeypatch.setattr(
        trainer, "policy_update", lambda c, o, b, *a, **k: trained.extend(b) or {"actor/loss": 0}
    )
    cfg = AutothinkConfig()
    cfg.data.seq_length, cfg.data.micro_batch_size = 64, 1
    cfg.rl.algorithm, cfg.rl.std_normalize = "bpo", False
    cfg.rl.bpo.g_think = cfg.rl.bpo.g_nothink = 1
    cfg.rl.bpo.prefill_anchor = anchor
    rc: Any = RLContext(
        cfg=cfg, ctx=None, chunks=[], ref_chunks=None, opt=None, engine=None, tokenizer=None,
        algo=Algorithm.of(cfg.rl), score=None, replay=None, rng=None, gen=None, pad_id=0, image_token_id=99,
        image=ImageProcessingConfig(), weight_sync=None, comm=None,
    )  # fmt: skip
    groups = [[_forced("long", 1.0), _forced("short", 0.0)]]
    ts = select_training_set(
        [_prompt("p0", images=False)], groups, compute_advantages(groups, Algorithm.of(cfg.rl)), cfg.rl, None,
        torch.Generator(), step=1,
    )  # fmt: skip
    m = trainer._update_policy(rc, ts)
    assert m["bpo/p_opening"] == pytest.approx(float(torch.softmax(w.detach()[3], -1)[775]) * float(
        torch.softmax(w.detach()[775], -1)[198]), rel=1e-5)  # fmt: skip

    def probs() -> tuple[float, float, float]:
        p = torch.softmax(w.detach(), -1)
        return float(p[3, 775]), float(p[775, 198]), float(p[198, 198])  # opening, decision

    before = probs()
    mask = [mb.packed.loss_mask > 0 for mb in trained]
    total = sum(int(k.sum()) for k in mask)
    loss = sum(
        policy_loss(
            logp_of(mb), mb.old_logp, mb.advantages, k, clip_low=0.2, clip_high=0.28,
            num_tokens_global=total,
        )[0]
        for mb, k in zip(trained, mask, strict=True)
    )  # fmt: skip
    loss.backward()  # type: ignore[union-attr]
    with torch.no_grad():
        w -= 50.0 * w.grad
    after = probs()
    assert after[2] < before[2] - 1e-3  # the direct answer lost: its decision token falls
    if anchor:
        assert after[0] > before[0] + 1e-3 and after[1] > before[1] + 1e-3
    else:
        assert after[:2] == pytest.approx(before[:2], abs=1e-7)
