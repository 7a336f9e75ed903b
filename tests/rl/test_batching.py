"""Packing rollouts into RL micro-batches: targets, advantages and engine log-probs line up."""

from __future__ import annotations

import pytest
import torch

from megatron_autothink.rl.batching import TrainSequence, pack_sequences, per_sample_values


def _seq(
    i: int, prompt: int, prefill: int, resp: int, adv: float, train_prefill: bool = False
) -> TrainSequence:
    return TrainSequence(
        sample_index=i,
        prompt_ids=list(range(100, 100 + prompt)),
        prefill_ids=list(range(200, 200 + prefill)),
        response_ids=list(range(300, 300 + resp)),
        engine_logprobs=[-0.5 - j for j in range(resp)],
        advantage=adv,
        mode_id=1,
        train_prefill=train_prefill,
    )


def test_targets_advantages_and_logprobs_at_label_positions() -> None:
    seqs = [_seq(0, 3, 2, 4, 1.5), _seq(1, 2, 0, 3, -0.5)]
    (mb,) = pack_sequences(seqs, seq_length=16, micro_batch_size=1, pad_id=0, image_token_id=7)
    row = mb.packed
    # sequence 0 (9 tokens): response tokens at 5..8, predicted from label positions 4..7
    assert row.loss_mask[0, :9].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0]
    assert row.labels[0, 4:8].tolist() == [300, 301, 302, 303]
    assert mb.advantages[0, 4:8].tolist() == [1.5] * 4
    assert mb.engine_logp[0, 4:8].tolist() == [-0.5, -1.5, -2.5, -3.5]
    # sequence 1 (5 tokens) starts at 9; its response at 11..13 predicted from 10..12
    assert row.loss_mask[0, 9:14].tolist() == [0, 1, 1, 1, 0]
    assert mb.advantages[0, 10:13].tolist() == [-0.5] * 3
    assert mb.sample_index[0, 10:13].tolist() == [1, 1, 1]
    assert int(row.loss_mask.sum()) == 7 and mb.num_target_tokens == 7


def test_bpo_decision_tokens_are_trained_without_engine_logprobs() -> None:
    (mb,) = pack_sequences(
        [_seq(0, 3, 2, 4, 2.0, train_prefill=True)],
        seq_length=12,
        micro_batch_size=1,
        pad_id=0,
        image_token_id=7,
    )
    # prefill tokens (3, 4) are targets now: label positions 2..7 carry the advantage
    assert mb.packed.loss_mask[0, :9].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0]
    assert mb.advantages[0, 2:8].tolist() == [2.0] * 6
    # the forced prefill has no sampled log-prob: 0 there, the response's from position 4
    assert mb.engine_logp[0, 2:4].tolist() == [0.0, 0.0]
    assert mb.engine_logp[0, 4:8].tolist() == [-0.5, -1.5, -2.5, -3.5]


def test_micro_batches_are_padded_to_equal_shape() -> None:
    seqs = [_seq(i, 5, 0, 6, 1.0) for i in range(3)]  # 11 tokens each: one per row
    mbs = pack_sequences(seqs, seq_length=12, micro_batch_size=2, pad_id=0, image_token_id=7)
    assert len(mbs) == 2 and all(m.packed.tokens.shape == (2, 12) for m in mbs)
    assert torch.all(mbs[1].packed.segment_ids[1] == 0)  # the padding row is empty


def test_per_sample_values_undoes_the_packing() -> None:
    # 3 sequences of 11 / 7 / 5 tokens in rows of 12: packed as [0], [1, 2] across 2 micro-batches
    seqs = [_seq(0, 5, 2, 4, 1.0), _seq(1, 3, 0, 4, 1.0), _seq(2, 2, 1, 2, 1.0, True)]
    mbs = pack_sequences(seqs, seq_length=12, micro_batch_size=1, pad_id=0, image_token_id=7)
    assert len(mbs) == 2
    # Engine log-probs round-trip; the BPO sample's prefill target has no engine value (0).
    values = per_sample_values(mbs, [mb.engine_logp for mb in mbs], num_samples=3)
    assert values == [[-0.5, -1.5, -2.5, -3.5], [-0.5, -1.5, -2.5, -3.5], [0.0, -0.5, -1.5]]
    # Any per-token result (e.g. compute_logprobs output): the label tokens come back in order.
    labels = per_sample_values(mbs, [mb.packed.labels.float() for mb in mbs], num_samples=3)
    assert labels == [
        [300.0, 301.0, 302.0, 303.0],
        [300.0, 301.0, 302.0, 303.0],
        [200.0, 300.0, 301.0],
    ]


def test_bpo_decision_weight_scales_only_the_decision_target() -> None:
    seq = _seq(0, 3, 2, 4, 2.0, train_prefill=True)
    seq.decision_target, seq.decision_weight = 2, 0.25  # the first response token
    (mb,) = pack_sequences([seq], seq_length=12, micro_batch_size=1, pad_id=0, image_token_id=7)
    assert mb.advantages[0, 2:8].tolist() == [2.0, 2.0, 0.5, 2.0, 2.0, 2.0]
    seq.decision_target = 6
    with pytest.raises(ValueError, match="decision target 6 beyond its 6 target tokens"):
        pack_sequences([seq], seq_length=12, micro_batch_size=1, pad_id=0, image_token_id=7)
