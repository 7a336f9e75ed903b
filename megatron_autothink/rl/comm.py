"""How the RL roles share work across ranks (the only RL module that talks to process groups).

Layout: the first rank of every model-parallel group (tp_rank 0, pp_rank 0) owns a rollout
engine holding the whole policy and generates for its data-parallel shard of the prompts. The
other ranks of that model-parallel group receive the scored rollouts from it, so every rank of
the group computes the same advantages, the same SSR selection (same generator, same records)
and hence packs the same micro-batches, which tensor and pipeline parallelism require.

::

    dp rank 0:  [tp0 pp0 = owner] --broadcast rollouts--> [tp1 pp0] [tp0 pp1] [tp1 pp1]
    dp rank 1:  [tp0 pp0 = owner] --broadcast rollouts--> ...

Across data-parallel ranks only gradients (megatron DDP), token counts and logged metrics are
reduced. A world of one rank takes none of these paths (every call returns its input).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from megatron_autothink.parallel import ParallelContext

T = TypeVar("T")


def engine_owner(ctx: ParallelContext) -> bool:
    """Whether this rank runs a rollout engine (first rank of its model-parallel group)."""
    return ctx.tp_rank == 0 and ctx.pp_rank == 0


class RolloutError(RuntimeError):
    """The engine-owning rank failed; raised on every rank of its model-parallel group."""


@dataclass
class RLComm:
    """Collectives of one RL stage. Build with :meth:`create` (collective over the world)."""

    ctx: ParallelContext
    owner_rank: int  # global rank of the engine owner of this rank's model-parallel group

    @classmethod
    def create(cls, ctx: ParallelContext) -> RLComm:
        if ctx.cp > 1:
            raise ValueError(
                "RL stages do not support context parallelism yet (parallel.cp="
                f"{ctx.cp}); use tp/pp/dp for RL stages"
            )
        if ctx.world_size == 1 or ctx.tp * ctx.pp == 1:
            return cls(ctx, ctx.rank)
        members: list[Any] = [None] * (ctx.tp * ctx.pp)
        dist.all_gather_object(members, (engine_owner(ctx), ctx.rank), group=ctx.pg.mp)
        owners = [rank for is_owner, rank in members if is_owner]
        if len(owners) != 1:  # megatron's group layout guarantees one; guard the assumption
            raise RuntimeError(f"model-parallel group {members} has {len(owners)} engine owners")
        return cls(ctx, owners[0])

    @property
    def _shares(self) -> bool:
        return self.ctx.world_size > 1 and self.ctx.tp * self.ctx.pp > 1

    def run_on_owner(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine owner and hand its result to the whole model-parallel group.

        An exception on the owner is raised on every rank of the group (instead of leaving
        the others waiting in the broadcast until the collective timeout).
        """
        result: list[Any] = [None]
        if engine_owner(self.ctx):
            try:
                result = [("ok", fn())]
            except Exception as e:
                if not self._shares:
                    raise
                result = [("error", f"{type(e).__name__}: {e}")]
                dist.broadcast_object_list(result, src=self.owner_rank, group=self.ctx.pg.mp)
                raise
        if self._shares:
            dist.broadcast_object_list(result, src=self.owner_rank, group=self.ctx.pg.mp)
        status, value = result[0]
        if status == "error":
            raise RolloutError(f"rollout on rank {self.owner_rank} failed: {value}")
        return value  # type: ignore[no-any-return]

    def global_count(self, n: int) -> int:
        """Sum of ``n`` over data-parallel ranks."""
        if self.ctx.dp == 1:
            return n
        t = torch.tensor([n], dtype=torch.long, device=self.ctx.device)
        dist.all_reduce(t, group=self.ctx.pg.dp)
        return int(t.item())

    def gather_to_first_dp(self, items: list[T]) -> list[T] | None:
        """Concatenate ``items`` of all data-parallel ranks on dp rank 0 (None elsewhere).

        Collective over this rank's data-parallel group only.
        """
        if self.ctx.dp == 1:
            return items
        dp = self.ctx.pg.dp
        dst = dist.get_global_rank(dp, 0)
        parts: list[Any] | None = [None] * self.ctx.dp if self.ctx.dp_rank == 0 else None
        dist.gather_object(items, parts, dst=dst, group=dp)
        if parts is None:
            return None
        return [x for part in parts for x in part]

    def reduce_metrics(self, metrics: dict[str, float], sums: Iterable[str]) -> dict[str, float]:
        """Mean of each metric over data-parallel ranks (sum for the keys in ``sums``).

        A key some ranks lack (say, a mode no rank-local response used) is combined over the
        ranks that have it.
        """
        if self.ctx.dp == 1:
            return metrics
        parts: list[Any] = [None] * self.ctx.dp
        dist.all_gather_object(parts, metrics, group=self.ctx.pg.dp)
        return combine_metrics(parts, set(sums))


def combine_metrics(parts: list[dict[str, float]], sums: set[str]) -> dict[str, float]:
    """Combine per-rank metric dicts: mean per key, sum for keys in ``sums``.

    Example:
        >>> combine_metrics([{"a": 1.0, "n": 2.0}, {"a": 3.0, "n": 5.0, "b": 1.0}], {"n"})
        {'a': 2.0, 'n': 7.0, 'b': 1.0}
    """
    out: dict[str, float] = {}
    keys = list(dict.fromkeys(k for p in parts for k in p))
    for k in keys:
        vals = [p[k] for p in parts if k in p]
        out[k] = float(sum(vals)) if k in sums else float(sum(vals) / len(vals))
    return out
