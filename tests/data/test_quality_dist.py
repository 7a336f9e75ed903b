"""A data-quality failure on one rank stops every rank with the same message (issue #21 (c)).

Two gloo ranks each build a real packed loader over the digits shards; only rank 1's cannot
form a batch (its ``seq_length`` is below every sample). Each rank then runs a few "steps":
the batches through :func:`fetch_agreed`, then a collective as the training step's gradient
all-reduce would be. Without the agreement rank 0 would wait in that all-reduce for a rank
that has stopped (until the process-group timeout); with it both raise at the same step.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from tests.dist_utils import run_distributed

pytestmark = [pytest.mark.dist]


def _rank(digits_dir: str, tokenizer_dir: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from megatron_autothink.data.loader import (
        DataQualityError,
        LoaderConfig,
        build_packed_loader,
        fetch_agreed,
    )

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    cfg = LoaderConfig(
        path=digits_dir,
        seq_length=512 if rank == 0 else 32,  # rank 1: no sample fits
        micro_batch_size=1,
        max_unusable_in_a_row=20,
    )
    loader = build_packed_loader(cfg, tokenizer_dir, dp_rank=rank, dp_world_size=2)
    steps = 0
    try:
        for _ in range(3):
            fetch_agreed(lambda: [next(loader) for _ in range(2)])
            grad = torch.ones(1)
            dist.all_reduce(grad)  # the step's collectives
            steps += 1
    except DataQualityError as e:
        return {"steps": steps, "error": str(e)}
    finally:
        loader.close()
    return {"steps": steps, "error": None}


def _rank_fake() -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist

    from megatron_autothink.data.loader import DataQualityError, fetch_agreed

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    out = []
    for bad in ((), (1,), (0, 1)):

        def fetch(bad: tuple[int, ...] = bad) -> int:
            if rank in bad:
                raise DataQualityError(f"/d [train]: bad on {rank}")
            return rank

        steps, error = 0, None
        try:
            for _ in range(2):
                assert fetch_agreed(fetch) == rank
                dist.all_reduce(torch.ones(1))  # the step's collectives
                steps += 1
        except DataQualityError as e:
            error = str(e)
        out.append({"steps": steps, "error": error})
    return out


def test_the_lowest_failing_rank_speaks_for_all() -> None:
    """The default-suite version (no loader): nothing failing costs one all-reduce and changes
    nothing; one or several failing ranks stop every rank alike, at the same step."""
    r0, r1 = run_distributed(_rank_fake, 2)
    assert (
        r0
        == r1
        == [
            {"steps": 2, "error": None},
            {"steps": 0, "error": "rank 1: /d [train]: bad on 1"},
            {"steps": 0, "error": "rank 0 (and 1 other ranks): /d [train]: bad on 0"},
        ]
    )


@pytest.mark.slow  # ~60 s on 2 loaded cores (two spawned ranks building real loaders)
def test_a_bad_rank_stops_every_rank_with_its_message(digits_dir: str, tokenizer_dir: str) -> None:
    r0, r1 = run_distributed(_rank, 2, digits_dir, tokenizer_dir)
    assert r0 == r1, (r0, r1)
    assert r0["steps"] == 0
    msg = r0["error"]
    assert msg.startswith("rank 1: "), msg
    assert "the last 20 samples read were all unusable" in msg and "seq_length=32" in msg, msg
