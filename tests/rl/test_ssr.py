"""Tests for megatron_autothink.rl.ssr."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch

from megatron_autothink.rl.ssr import ReplayBuffer, ReplayRecord, ssr_select


def _recs(advs: list[float], start: int = 0) -> list[ReplayRecord]:
    return [ReplayRecord(start + i, a, f"k{start + i}") for i, a in enumerate(advs)]


def test_buffer_fifo_and_zero_advantage_filter() -> None:
    buf = ReplayBuffer(3)
    assert buf.add(_recs([0.5, 0.0, -0.5])) == 2
    assert [r.sample_id for r in buf.records()] == [0, 2]
    assert buf.add(_recs([0.1, 0.2, 0.0], start=10)) == 2
    assert [r.sample_id for r in buf.records()] == [2, 10, 11]  # id 0 evicted first
    assert len(buf) == 3
    with pytest.raises(ValueError):
        ReplayBuffer(0)
    with pytest.raises(ValueError):
        ReplayBuffer(2).sample(1, torch.Generator())
    assert ReplayBuffer(2).sample(0, torch.Generator()) == []


def test_buffer_priority_sampling_statistics() -> None:
    buf = ReplayBuffer(3)
    buf.add(_recs([1.0, -3.0, 0.0001]))
    g = torch.Generator().manual_seed(1234)
    n = 20_000
    counts = Counter(r.sample_id for r in buf.sample(n, g))
    w = [1.0 + 1e-4, 3.0 + 1e-4, 1e-4 + 1e-4]
    for sid, wi in zip([0, 1, 2], w, strict=True):
        p = wi / sum(w)
        # 5 sigma binomial tolerance
        assert abs(counts[sid] / n - p) < 5 * (p * (1 - p) / n) ** 0.5 + 1e-4, (sid, counts)


def test_buffer_sampling_is_deterministic_given_generator() -> None:
    buf = ReplayBuffer(8)
    buf.add(_recs([0.1, 0.5, -0.7, 0.2, -0.3]))
    a = buf.sample(50, torch.Generator().manual_seed(7))
    b = buf.sample(50, torch.Generator().manual_seed(7))
    c = buf.sample(50, torch.Generator().manual_seed(8))
    assert a == b and a != c


def test_state_dict_round_trip_exact() -> None:
    buf = ReplayBuffer(4)
    buf.add(_recs([0.1, -0.2, 1 / 3, 0.4, -0.5]))  # one evicted
    buf2 = ReplayBuffer(1)
    stream = io.BytesIO()
    torch.save(buf.state_dict(), stream)
    stream.seek(0)
    buf2.load_state_dict(torch.load(stream, weights_only=True))  # plain data only
    assert buf2.capacity == 4 and buf2.records() == buf.records()
    assert buf2.records()[1].advantage == 1 / 3  # bit-exact floats
    # Same future behaviour: identical samples and identical eviction.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert buf.sample(20, g1) == buf2.sample(20, g2)
    buf.add(_recs([0.9], start=99))
    buf2.add(_recs([0.9], start=99))
    assert buf.records() == buf2.records()
    bad = buf.state_dict()
    bad["advantages"] = bad["advantages"][:-1]
    with pytest.raises(ValueError):
        ReplayBuffer(1).load_state_dict(bad)


def test_ssr_select_fresh_priority_and_sizes() -> None:
    # 8 prompts x 4 rollouts = 32 rollouts -> train size 16. Two informative groups.
    advs = [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5] + [0.0] * 24
    solved = [False] * 8 + [True] * 8 + [False] * 16  # groups 2-3 all correct
    cur = _recs(advs)
    buf = ReplayBuffer(16)
    sel = ssr_select(cur, solved, buf, generator=torch.Generator().manual_seed(0))
    assert len(sel.records) == 16
    assert sel.num_fresh == 8  # all 8 non-zero samples drawn (with replacement)
    assert sel.num_all_correct == 0  # int(0.1 * 8) = 0
    assert sel.num_from_buffer == 8  # rest from the buffer, which holds this step's 8
    assert all(r.advantage != 0 for r in sel.records)
    assert sel.replay_share == 0.0  # buffer only held current samples
    assert len(buf) == 8


def test_ssr_fresh_draw_statistics() -> None:
    advs = [0.9, -0.1]  # p = 0.9 / 1.0 for the first
    counts: Counter[int] = Counter()
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        sel = ssr_select(_recs(advs), [False, False], ReplayBuffer(4), generator=g, train_size=2)
        counts.update(r.sample_id for r in sel.records[: sel.num_fresh])
    share = counts[0] / (counts[0] + counts[1])
    assert abs(share - 0.9) < 0.02


def test_ssr_all_correct_share() -> None:
    fresh = [0.5, -0.5] * 20  # 40 informative samples
    advs = fresh + [0.0] * 40
    solved = [False] * 40 + [True] * 40
    sel = ssr_select(
        _recs(advs),
        solved,
        ReplayBuffer(100),
        generator=torch.Generator().manual_seed(0),
        train_size=60,
    )
    assert sel.num_fresh == 40 and sel.num_all_correct == 4  # ~10% of the fresh count
    solved_ids = set(range(40, 80))
    picked = [r for r in sel.records if r.sample_id in solved_ids]
    assert len(picked) == 4 and len({r.sample_id for r in picked}) == 4  # no repeats
    assert sel.num_from_buffer == 16
    # When the fresh samples fill the train size, no room is left for all-correct ones.
    full = ssr_select(
        _recs(advs),
        solved,
        ReplayBuffer(100),
        generator=torch.Generator().manual_seed(0),
        train_size=40,
    )
    assert full.num_fresh == 40 and full.num_all_correct == 0 and full.num_from_buffer == 0


def test_ssr_replays_from_earlier_steps_and_marks_them() -> None:
    buf = ReplayBuffer(8)
    g = torch.Generator().manual_seed(0)
    step0 = _recs([0.5, -0.5, 0.25, -0.25, 0.0, 0.0, 0.0, 0.0], start=0)
    ssr_select(step0, [False] * 8, buf, generator=g)
    # Step 1: every group saturated -> everything comes from the buffer.
    step1 = _recs([0.0] * 8, start=100)
    sel = ssr_select(step1, [True] * 8, buf, generator=g)
    assert sel.num_fresh == 0 and sel.num_all_correct == 0 and sel.num_from_buffer == 4
    assert sel.is_replay == [True] * 4 and sel.replay_share == 1.0
    assert {r.sample_id for r in sel.records} <= {0, 1, 2, 3}
    # Step 2: one informative sample; fresh first, replays marked.
    step2 = _recs([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], start=200)
    sel = ssr_select(step2, [False] * 8, buf, generator=g)
    assert sel.records[0].sample_id == 200 and sel.is_replay[0] is False
    assert sel.num_from_buffer == 3
    assert sel.replay_share == sum(sel.is_replay) / 4


def test_ssr_buffer_fill_takes_whole_passes_when_short() -> None:
    buf = ReplayBuffer(2)
    sel = ssr_select(
        _recs([0.5, -0.5] + [0.0] * 10),
        [False] * 12,
        buf,
        generator=torch.Generator().manual_seed(0),
        train_size=7,
    )
    # 2 fresh draws, then 5 from a 2-sample buffer: 2 whole passes + 1 weighted draw.
    assert sel.num_fresh == 2 and sel.num_from_buffer == 5
    ids = Counter(r.sample_id for r in sel.records[2:])
    assert ids[0] >= 2 and ids[1] >= 2


def test_ssr_deterministic_and_empty_cases() -> None:
    cur = _recs([0.3, -0.3, 0.6, 0.0])
    a = ssr_select(cur, [False] * 4, ReplayBuffer(4), generator=torch.Generator().manual_seed(5))
    b = ssr_select(cur, [False] * 4, ReplayBuffer(4), generator=torch.Generator().manual_seed(5))
    assert a == b
    empty = ssr_select(_recs([0.0] * 4), [True] * 4, ReplayBuffer(4), generator=torch.Generator())
    assert empty.records == [] and empty.replay_share == 0.0
    with pytest.raises(ValueError):
        ssr_select(cur, [False], ReplayBuffer(4), generator=torch.Generator())
