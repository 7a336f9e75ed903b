"""Selective Sample Replay (SSR), VL-Rethinker (arXiv 2504.08837), the paper's version.

Problem it solves: with a mean-only group baseline, a group whose responses are all right (or
all wrong) has zero advantage everywhere and gives no gradient ("vanishing advantages"). As
training progresses most groups saturate and the effective batch shrinks. SSR keeps recent
informative samples and replays them, preferring large ``|A|``.

Per step, with ``train_size`` = half the rollouts of the step (the paper trains on half the
batch):

1. The current step's non-zero-advantage samples enter a FIFO buffer of capacity
   ``train_size`` (oldest evicted first). Samples with ``A == 0`` never enter.
2. Fresh part: ``min(len(F), train_size)`` draws, *with replacement*, from the current
   non-zero-advantage samples ``F`` with ``p ∝ |A|^alpha`` (alpha = 1), plus
   ``int(all_correct_fraction * len(F))`` samples (~10%) from all-correct groups.
3. The remainder is filled from the buffer with ``p ∝ |A|^alpha + 1e-4``; the whole buffer is
   taken once per full pass while the remainder exceeds its size (as the released code does).

Notes and deviations, on purpose:
    * In the released code (``NaiveReplayBuffer.active_sampling``) this path is unreachable (an
      early return), so published numbers may not include SSR; we implement what the paper
      describes.
    * The released code puts the all-correct samples into the same ``|A|``-weighted draw, where
      their weight is 0 (A = 0 under a mean-only baseline) so they are never picked. We include
      them directly (uniformly, without replacement) so the ~10% share is real. With A = 0 they
      add no policy gradient; they only enter through the loss normaliser and any KL/NLL term.
    * The buffer is filled *before* sampling (as in the released code), so on the first step
      the "replay" part can draw current samples. ``is_replay`` marks only items whose
      ``sample_id`` is not in the current step, so the replay-share metric counts true replays.
    * Sample ids must be unique across steps (e.g. ``step * rollouts_per_step + i``).

Records are small frozen dataclasses (id, advantage, opaque payload key); the payload itself
(token ids, images, log-probs) lives wherever the caller stores it, keyed by ``payload_key``.
Randomness comes only from the ``torch.Generator`` passed in, so selection is reproducible, and
the buffer state is plain Python data that round-trips through ``torch.save(weights_only=True)``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class ReplayRecord:
    """One trainable sample as seen by SSR.

    Attributes:
        sample_id: Unique id across the whole run.
        advantage: Its (sequence) advantage.
        payload_key: Opaque key to fetch the sample's tensors from the caller's store.
    """

    sample_id: int
    advantage: float
    payload_key: str


def _weighted_draw(weights: torch.Tensor, num: int, generator: torch.Generator) -> list[int]:
    """``num`` indices drawn with replacement with probability proportional to ``weights``."""
    if num <= 0:
        return []
    return [int(i) for i in torch.multinomial(weights, num, replacement=True, generator=generator)]


class ReplayBuffer:
    """FIFO buffer of non-zero-advantage samples with |A|-prioritised sampling (SSR).

    Args:
        capacity: Maximum number of records (VL-Rethinker: half the rollouts per step).

    Example:
        >>> buf = ReplayBuffer(capacity=2)
        >>> buf.add([ReplayRecord(0, 0.5, "a"), ReplayRecord(1, 0.0, "b"),
        ...          ReplayRecord(2, -0.25, "c"), ReplayRecord(3, 0.75, "d")])
        3
        >>> [r.sample_id for r in buf.records()]  # id 1 (A = 0) never entered; id 0 evicted
        [2, 3]
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._records: deque[ReplayRecord] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[ReplayRecord]:
        """Buffer contents, oldest first."""
        return list(self._records)

    def add(self, records: Iterable[ReplayRecord]) -> int:
        """Append the non-zero-advantage records, evicting the oldest beyond capacity.

        Returns:
            Number of records appended (zero-advantage ones are skipped).
        """
        added = 0
        for rec in records:
            if rec.advantage != 0.0:
                self._records.append(rec)
                added += 1
        return added

    def sample(
        self,
        num: int,
        generator: torch.Generator,
        *,
        alpha: float = 1.0,
        eps: float = 1e-4,
    ) -> list[ReplayRecord]:
        """Draw ``num`` records with replacement, ``p ∝ |A|^alpha + eps``.

        ``eps`` keeps every buffered sample reachable even if its |A| is tiny.

        Example:
            >>> buf = ReplayBuffer(4)
            >>> _ = buf.add([ReplayRecord(0, 1.0, "a"), ReplayRecord(1, -1e-9, "b")])
            >>> g = torch.Generator().manual_seed(0)
            >>> sorted({r.sample_id for r in buf.sample(50, g)})  # ~1e-4 weight: almost never 1
            [0]
        """
        if num <= 0:
            return []
        if not self._records:
            raise ValueError("cannot sample from an empty replay buffer")
        recs = list(self._records)
        w = torch.tensor([abs(r.advantage) for r in recs], dtype=torch.float64) ** alpha + eps
        return [recs[i] for i in _weighted_draw(w, num, generator)]

    def state_dict(self) -> dict[str, Any]:
        """Plain-data snapshot (ints, floats, strings) for checkpoints.

        Example:
            >>> buf = ReplayBuffer(3); _ = buf.add([ReplayRecord(7, 0.5, "k7")])
            >>> buf.state_dict()
            {'capacity': 3, 'sample_ids': [7], 'advantages': [0.5], 'payload_keys': ['k7']}
        """
        recs = list(self._records)
        return {
            "capacity": self.capacity,
            "sample_ids": [r.sample_id for r in recs],
            "advantages": [r.advantage for r in recs],
            "payload_keys": [r.payload_key for r in recs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` snapshot exactly (capacity, order and values)."""
        ids, advs, keys = state["sample_ids"], state["advantages"], state["payload_keys"]
        if not (len(ids) == len(advs) == len(keys)):
            raise ValueError("corrupt replay buffer state: field lengths differ")
        self.capacity = int(state["capacity"])
        self._records = deque(
            (
                ReplayRecord(int(i), float(a), str(k))
                for i, a, k in zip(ids, advs, keys, strict=True)
            ),
            maxlen=self.capacity,
        )


@dataclass(frozen=True, slots=True)
class SSRSelection:
    """Training set chosen by :func:`ssr_select`.

    Attributes:
        records: Selected records, fresh part first, then all-correct, then buffer draws.
        is_replay: Per record, True when it comes from an earlier step.
        num_fresh: Draws from the current non-zero-advantage samples.
        num_all_correct: Samples from all-correct groups.
        num_from_buffer: Draws from the buffer.
    """

    records: list[ReplayRecord]
    is_replay: list[bool]
    num_fresh: int
    num_all_correct: int
    num_from_buffer: int

    @property
    def replay_share(self) -> float:
        """Share of the training set replayed from earlier steps (0 when empty)."""
        return sum(self.is_replay) / len(self.records) if self.records else 0.0


def ssr_select(
    current: Sequence[ReplayRecord],
    all_correct_group: Sequence[bool],
    buffer: ReplayBuffer,
    *,
    generator: torch.Generator,
    train_size: int | None = None,
    all_correct_fraction: float = 0.1,
    alpha: float = 1.0,
    buffer_eps: float = 1e-4,
) -> SSRSelection:
    """Build one step's SSR training set (VL-Rethinker, arXiv 2504.08837); updates ``buffer``.

    Args:
        current: All records of this step (every rollout, zero advantage included).
        all_correct_group: Per record, whether its group was solved by every response.
        buffer: The replay buffer; this step's non-zero-advantage records are added first.
        generator: Source of all randomness (reproducible selection).
        train_size: Size of the training set; default ``len(current) // 2`` (the paper).
        all_correct_fraction: All-correct samples per fresh non-zero sample (~10%).
        alpha: Priority exponent for ``|A|`` (paper: 1).
        buffer_eps: Additive floor on buffer priorities (paper: 1e-4).

    Returns:
        The selection; it has fewer than ``train_size`` items only if the buffer is empty.

    Example:
        Eight rollouts of two prompts; the second prompt was solved by all four.

        >>> cur = [ReplayRecord(i, a, f"s{i}") for i, a in
        ...        enumerate([0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0])]
        >>> solved = [False] * 4 + [True] * 4
        >>> sel = ssr_select(cur, solved, ReplayBuffer(4),
        ...                  generator=torch.Generator().manual_seed(0))
        >>> len(sel.records), sel.num_fresh, sel.num_all_correct, sel.num_from_buffer
        (4, 4, 0, 0)
        >>> all(abs(r.advantage) > 0 for r in sel.records), sel.replay_share
        (True, 0.0)
    """
    if len(all_correct_group) != len(current):
        raise ValueError("all_correct_group must have one flag per record")
    size = len(current) // 2 if train_size is None else int(train_size)
    if size < 0:
        raise ValueError("train_size must be non-negative")
    current_ids = {r.sample_id for r in current}
    fresh = [r for r in current if r.advantage != 0.0]
    solved = [r for r, s in zip(current, all_correct_group, strict=True) if s and r.advantage == 0]

    # Step 1: the buffer sees this step's informative samples before anything is drawn.
    buffer.add(fresh)

    # Step 2a: fresh draws, with replacement, p ∝ |A|^alpha.
    n_fresh = min(len(fresh), size)
    picked: list[ReplayRecord] = []
    if n_fresh:
        w = torch.tensor([abs(r.advantage) for r in fresh], dtype=torch.float64) ** alpha
        picked = [fresh[i] for i in _weighted_draw(w, n_fresh, generator)]

    # Step 2b: ~10% all-correct samples, uniform without replacement (see module notes).
    n_solved = min(len(solved), int(all_correct_fraction * len(fresh)), size - n_fresh)
    if n_solved > 0:
        order = torch.randperm(len(solved), generator=generator)[:n_solved]
        picked += [solved[int(i)] for i in order]

    # Step 3: fill the rest from the buffer, whole passes first, then |A|-weighted draws.
    remaining = size - len(picked)
    from_buffer: list[ReplayRecord] = []
    if remaining > 0 and len(buffer) > 0:
        buffered = buffer.records()
        while remaining > len(buffered):
            from_buffer += buffered
            remaining -= len(buffered)
        from_buffer += buffer.sample(remaining, generator, alpha=alpha, eps=buffer_eps)

    records = picked + from_buffer
    return SSRSelection(
        records=records,
        is_replay=[r.sample_id not in current_ids for r in records],
        num_fresh=n_fresh,
        num_all_correct=n_solved,
        num_from_buffer=len(from_buffer),
    )
