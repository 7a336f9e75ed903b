"""A deterministic in-memory batch source with savable position (loop tests without shards)."""

from __future__ import annotations

from typing import Any

from megatron_autothink.data.batch import PackedBatch
from tests.models.model_utils import synthetic_batch


class SyntheticSource:
    def __init__(self, vocab: int, seq: int, rows: int = 2, seed: int = 0, rank: int = 0) -> None:
        self.vocab, self.seq, self.rows, self.seed, self.rank = vocab, seq, rows, seed, rank
        self.idx = 0

    def __next__(self) -> PackedBatch:
        b = synthetic_batch(
            self.rows, self.seq, self.vocab, self.seed + 1000 * self.rank + self.idx
        )
        self.idx += 1
        return b

    def state_dict(self) -> dict[str, Any]:
        return {"idx": self.idx}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.idx = int(state["idx"])
