"""RLComm on 2 gloo ranks: the engine owner's result reaches its model-parallel peer, an owner
failure is raised on both ranks, and data-parallel ranks gather and reduce."""

from __future__ import annotations

from typing import Any

import pytest

from tests.dist_utils import run_distributed

pytestmark = [pytest.mark.dist]


def _model_parallel(fail: bool) -> dict[str, Any]:
    from megatron_autothink.config import load_config
    from megatron_autothink.parallel import init_distributed
    from megatron_autothink.rl.comm import RLComm, RolloutError, engine_owner

    ctx = init_distributed(load_config("tiny_cpu", ["parallel.tp=2"]))
    comm = RLComm.create(ctx)

    def generate() -> list[str]:
        if fail:
            raise ValueError("engine died")
        return [f"made on rank {ctx.rank}"]  # only the owner may run this

    try:
        got: Any = comm.run_on_owner(generate)
    except (ValueError, RolloutError) as e:
        got = f"{type(e).__name__}: {e}"
    return {"owner": engine_owner(ctx), "owner_rank": comm.owner_rank, "got": got}


def _data_parallel() -> dict[str, Any]:
    from megatron_autothink.config import load_config
    from megatron_autothink.parallel import init_distributed
    from megatron_autothink.rl.comm import RLComm

    ctx = init_distributed(load_config("tiny_cpu"))
    comm = RLComm.create(ctx)
    metrics = {"acc": float(ctx.rank), "n": 2.0 + ctx.rank}
    if ctx.rank == 1:
        metrics["only_1"] = 5.0
    return {
        "count": comm.global_count(3 + ctx.rank),
        "gathered": comm.gather_to_first_dp([f"r{ctx.rank}a", f"r{ctx.rank}b"]),
        "metrics": comm.reduce_metrics(metrics, sums=["n"]),
        "shared": comm.run_on_owner(lambda: ctx.rank),  # every dp rank owns an engine
    }


def test_owner_result_reaches_its_model_parallel_peer() -> None:
    ranks = run_distributed(_model_parallel, 2, False)
    assert [r["owner"] for r in ranks] == [True, False]
    assert [r["owner_rank"] for r in ranks] == [0, 0]
    assert [r["got"] for r in ranks] == [["made on rank 0"]] * 2


def test_owner_failure_is_raised_on_every_rank() -> None:
    ranks = run_distributed(_model_parallel, 2, True)
    assert ranks[0]["got"] == "ValueError: engine died"
    assert ranks[1]["got"] == "RolloutError: rollout on rank 0 failed: ValueError: engine died"


def test_data_parallel_count_gather_and_metrics() -> None:
    r0, r1 = run_distributed(_data_parallel, 2)
    assert r0["count"] == r1["count"] == 7
    assert r0["gathered"] == ["r0a", "r0b", "r1a", "r1b"] and r1["gathered"] is None
    assert r0["metrics"] == r1["metrics"] == {"acc": 0.5, "n": 5.0, "only_1": 5.0}
    assert (r0["shared"], r1["shared"]) == (0, 1)
