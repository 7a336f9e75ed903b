"""A few RL steps of every recipe with real vLLM rollouts, and an exact resume after SIGKILL.

Each run anneals the tiny model for a couple of steps (so it emits the chat format at all), then
runs the recipe's RL stage(s) on digits shards with small groups and short generations. The
VL-Rethinker behaviour test (accepted rethinks, trained replays) runs on the "coin" set of
``benchmarks/rl_rethink_replay.py`` instead, which a barely trained model answers right half the
time.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from benchmarks import rl_rethink_replay as rethink_replay
from benchmarks.tiny_runs import SMALL_RL, prepare_digits, train_command
from megatron_autothink.rl.rethinking import (
    TRIGGER_DOUBLE_CHECK,
    TRIGGER_MISTAKE,
    TRIGGER_SEEM_RIGHT,
    TRIGGER_WAIT,
)
from tests.dist_utils import python_launcher, sigkill_job

pytestmark = [pytest.mark.vllm]

COIN_SEED = 1  # of the seeds the study measured (docs/benchmarks.md)

SMALL = SMALL_RL


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rl_data")
    mm, text = prepare_digits(root), prepare_digits(root, text_only=True)
    return {"mm": mm, "text": text, "tok": mm / "tokenizer"}


def _train(
    recipe: str, data: dict[str, Path], run: Path, stages: str, *extra: str, nproc: int = 1
) -> subprocess.Popen[bytes]:
    cmd = train_command(
        recipe,
        data["mm"],
        data["tok"],
        run,
        f"stages={stages}",
        *SMALL,
        *extra,
        launcher=python_launcher(nproc),
    )
    log = (run.parent / f"{run.name}.log").open("wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(p: subprocess.Popen[bytes], run: Path) -> None:
    rc = p.wait(timeout=1200)
    if rc != 0:
        log = (run.parent / f"{run.name}.log").read_text()[-4000:]
        raise AssertionError(f"train exited {rc}:\n{log}")


def _metrics(run: Path, stage: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["stage"] == stage]


def test_r4b_bpo_steps(data: dict[str, Path], tmp_path: Path) -> None:
    """BPO with the think-format reward: short mode's prefilled empty think block plus any
    tag-free answer is format-valid, long mode's open think block rarely is for a barely
    trained model, so groups have non-zero advantages; two updates per step, so the second
    one's approx. KL against the rollout policy is > 0 exactly when the first moved the
    parameters. The decision is importance-weighted (``rl.bpo.decision_weighting``) and the
    opening both prefills share is anchored (``rl.bpo.prefill_anchor``)."""
    run = tmp_path / "bpo"
    stages = "[{name: anneal, kind: sft, steps: 3}, {name: bpo, kind: rl, steps: 2}]"
    extra = [
        "checkpoint.save_every=0",
        "rl.rewards.think_format=0.5",
        "rl.updates_per_step=2",
        "rl.bpo.decision_weighting=importance",
        "rl.bpo.prefill_anchor=1.0",
    ]
    _finish(_train("r4b_bpo_tiny", data, run, stages, *extra), run)
    steps = _metrics(run, "bpo")
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["samples_trained"] == 2 * 4 and r["zero_adv_group_frac"] < 1.0, r
        assert r["actor/grad_norm"] > 0 and r["actor/approx_kl"] > 0, r  # parameters moved
        # the policy's own thinking probability, read off the decision token (weighted by it)
        assert 0.0 < r["bpo/p_think"] < 1.0, r
        assert 0.0 < r["bpo/p_opening"] <= 1.0, r  # auto mode's chance to open with <think>
    rollouts = [json.loads(x) for x in (run / "rollouts" / "bpo.jsonl").read_text().splitlines()]
    assert {r["mode"] for r in rollouts} == {"long", "short"}
    assert len(rollouts) == 2 * 2 * 4  # steps x prompts x (g_think + g_nothink)
    # The format reward fired: accuracy is 0 or 1, so a x.5 reward carries the 0.5 format term.
    assert any(r["reward"] % 1 == 0.5 for r in rollouts), [r["reward"] for r in rollouts]


def test_lmm_r1_two_stages_text_then_images(data: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "lmm"
    # Stage 2 needs a longer context and budget than stage 1, as lmm_r1_3b's MGT stage does
    # (issue #18 defect 1): the one engine, built in stage 1, must be sized for it.
    stages = (
        f"[{{name: anneal, kind: sft, steps: 3}}, "
        f"{{name: fre, kind: rl, steps: 1, train_path: {data['text']}}}, "
        f"{{name: mgt, kind: rl, steps: 1, overrides: "
        f"{{data.seq_length: 640, rollout.max_new_tokens: 250}}}}]"
    )
    _finish(_train("lmm_r1_tiny", data, run, stages, "checkpoint.save_every=0"), run)
    assert len(_metrics(run, "fre")) == 1 and len(_metrics(run, "mgt")) == 1
    fre = [json.loads(x) for x in (run / "rollouts" / "fre.jsonl").read_text().splitlines()]
    mgt = [json.loads(x) for x in (run / "rollouts" / "mgt.jsonl").read_text().splitlines()]
    assert fre and mgt and all(r["mode"] == "auto" for r in fre + mgt)
    # Stage 1 generated within its 48 tokens, stage 2 beyond them (its own budget of 250).
    assert max(r["tokens"] for r in fre) <= 48 < max(r["tokens"] for r in mgt) <= 250


@pytest.mark.slow  # ~1.5 min; the default suite keeps the BPO + SSR + KL resume (test_resume.py)
def test_vl_rethinker_resume_after_sigkill(data: dict[str, Path], tmp_path: Path) -> None:
    """GRPO + SSR + forced rethinking; killing the run after RL step 2 and restarting gives the
    same step-3 prompts, rollouts and SSR buffer as an uninterrupted run."""
    stages = "[{name: anneal, kind: sft, steps: 2}, {name: grpo_ssr, kind: rl, steps: 3}]"
    extra = [
        "checkpoint.save_every=1",
        "rl.rethink.min_budget_tokens=8",
        "rl.rethink.drop_prob=0.0",
    ]
    ref = tmp_path / "ref"
    _finish(_train("vl_rethinker_tiny", data, ref, stages, *extra), ref)
    run = tmp_path / "killed"
    p = _train("vl_rethinker_tiny", data, run, stages, *extra)
    target = run / "checkpoints" / "grpo_ssr" / "iter_00000002" / "meta.json"
    deadline = time.time() + 1200
    while not target.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert target.exists(), (run.parent / "killed.log").read_text()[-3000:]
    sigkill_job(p)
    _finish(_train("vl_rethinker_tiny", data, run, stages, *extra), run)

    def step3(r: Path) -> list[tuple]:
        rows = [json.loads(x) for x in (r / "rollouts" / "grpo_ssr.jsonl").read_text().splitlines()]
        return [(x["prompt_id"], x["text"], x["reward"]) for x in rows if x["step"] == 3]

    assert step3(run) == step3(ref) and step3(ref)

    def steps_logged(r: Path, name: str) -> list[int]:
        return [json.loads(x)["step"] for x in (r / name).read_text().splitlines()]

    # Steps replayed after the kill are logged once (their first rows dropped at resume).
    for name in ("rollouts/grpo_ssr.jsonl", "metrics.jsonl"):
        assert steps_logged(run, name) == steps_logged(ref, name), name
    m_ref, m_run = _metrics(ref, "grpo_ssr")[-1], _metrics(run, "grpo_ssr")[-1]
    assert m_run["ssr/buffer_size"] == m_ref["ssr/buffer_size"]
    # The logged metrics are the rollouts log's counts: continuations issued (every verdict
    # but "low_budget", which is decided before any request), accepted, SSR's selection.
    rows = [json.loads(x) for x in (ref / "rollouts" / "grpo_ssr.jsonl").read_text().splitlines()]
    for m in _metrics(ref, "grpo_ssr"):
        verdicts = [x["rethink"] for x in rows if x["step"] == m["step"]]
        issued = [v for v in verdicts if v and v != "rejected:low_budget"]
        assert m["rethink/attempted"] == len(issued), (m, verdicts)
        assert m["rethink/accepted"] == verdicts.count("accepted"), (m, verdicts)
        assert m["samples_trained"] == m["ssr/selected"] <= len(verdicts), m
        # Replays counted in the selection are the ones whose tokens reach the update.
        assert m["ssr/replayed"] == round(m["ssr/replay_share"] * m["ssr/selected"]), m
        assert (m.get("actor/replay/tokens", 0.0) > 0) == (m["ssr/replayed"] > 0), m

    def buffer(r: Path) -> dict:
        st = torch.load(
            r / "checkpoints" / "grpo_ssr" / "iter_00000003" / "rank_00000.pt", weights_only=True
        )
        return st["replay"]["buffer"]

    assert buffer(run) == buffer(ref)


@pytest.fixture(scope="module")
def coin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return rethink_replay.prep_coin(tmp_path_factory.mktemp("coin"))


# slow: one run of ~3-4 min on the shared 2-core machine (60 annealing steps, so the model writes
# the answer format; 24 RL steps, so the odds above), over the default suite's budget. The
# default suite checks the same logged counts against the rollouts log in the resume test above.
@pytest.mark.slow
def test_vl_rethinker_accepts_rethinks_trains_replays(
    coin: tuple[Path, Path], tmp_path: Path
) -> None:
    """VL-Rethinker end to end on the "coin" set, whose ground truth (1 or 2) is random, so any
    model that writes the answer format is right about half the time: forced rethinks of its
    responses get accepted, and with one prompt and groups of two per step, every uniform group
    (zero advantages) after a mixed one trains a replay (benchmarks/rl_rethink_replay.py has
    the settings and the odds, at the worst rates its seed study measured (docs/benchmarks.md):
    no acceptance 7e-4, no replay 3.4e-4). The counts are the trainer's logs, checked against
    the rollouts log; with rethinking or SSR off the test fails."""
    data, tok = coin
    run = tmp_path / "coin_run"
    rethink_replay.run_train(
        rethink_replay.train_command(data, tok, run, COIN_SEED), run, timeout=1200
    )
    _check_rethinks_and_replays(run)


def _check_rethinks_and_replays(run: Path) -> None:
    """The assertions of the test above on a finished run directory."""
    steps = _metrics(run, "grpo_ssr")
    assert [m["step"] for m in steps] == list(range(1, rethink_replay.RL_STEPS + 1))
    rows = [json.loads(x) for x in (run / "rollouts" / "grpo_ssr.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * rethink_replay.RL_STEPS  # one prompt, groups of two

    # Rethinks accepted: the logged count is the rollouts' verdicts, and each accepted response
    # is its original text, a trigger and a continuation that made it correct.
    accepted = [r for r in rows if r["rethink"] == "accepted"]
    assert sum(m.get("rethink/accepted", 0.0) for m in steps) == len(accepted) > 0, steps
    triggers = (TRIGGER_WAIT, TRIGGER_SEEM_RIGHT, TRIGGER_DOUBLE_CHECK, TRIGGER_MISTAKE)
    for r in accepted:
        assert r["correct"] and r["finished"] and r["reward"] == 1.0, r
        assert any(t in r["text"] for t in triggers), r

    # Replays trained. SSR's training set is one sample: the step's own when its group's rewards
    # differ, else one from the buffer (filled by the mixed steps before it). The logged replay
    # count follows exactly from the rollouts log, and replayed tokens reach the update.
    mixed_before = False
    for m in steps:
        rewards = {r["reward"] for r in rows if r["step"] == m["step"]}
        mixed = len(rewards) > 1
        expected = 0.0 if mixed or not mixed_before else 1.0
        assert m.get("ssr/replayed") == expected, (m, rewards)
        assert m["samples_trained"] == (1.0 if mixed or mixed_before else 0.0), m
        assert (m.get("actor/replay/tokens", 0.0) > 0) == (expected > 0), m
        mixed_before |= mixed
    assert sum(m["ssr/replayed"] for m in steps) > 0, steps  # a uniform step after a mixed one


@pytest.mark.dist
@pytest.mark.parametrize(
    "layout",
    [
        "parallel.tp=2",
        # ~1-1.5 min each: slow (the default suite keeps TP, whose weight sync gathers shards)
        pytest.param("parallel.pp=2", marks=pytest.mark.slow),
        pytest.param("parallel.tp=1", marks=pytest.mark.slow),  # 2 DP ranks, an engine each
    ],
)
def test_two_rank_rl(data: dict[str, Path], tmp_path: Path, layout: str) -> None:
    """RL on 2 gloo ranks: the engine owner's rollouts reach its model-parallel peers, whose
    sharded recomputation of the sampled tokens' log-probs matches the engine's, before and
    after a weight sync gathered from the TP/PP shards; data-parallel ranks each generate for
    their own prompts and all of them reach the rollouts log.

    BPO with the think-format reward, because its two forced modes differ in it even for a barely
    trained model (non-zero advantages, so there is something to train), with SSR on: the
    ranks of a model-parallel group must draw the same selection or their shards diverge.
    """
    run = tmp_path / "run"
    stages = "[{name: anneal, kind: sft, steps: 2}, {name: rl, kind: rl, steps: 2}]"
    extra = [
        layout,
        "checkpoint.save_every=2",
        "rl.ssr.enabled=true",
        "rl.rewards.think_format=0.5",
    ]
    _finish(_train("r4b_bpo_tiny", data, run, stages, *extra, nproc=2), run)
    steps = _metrics(run, "rl")
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        # Engine (vLLM, full model) vs trainer (megatron, 2 ranks) on the same tokens: only
        # float rounding apart when the rollouts and the synced weights are right.
        assert r["samples_trained"] > 0
        assert abs(r["mismatch/ratio_median"] - 1.0) < 1e-3, r
        assert r["mismatch/max_abs"] < 1e-3, r
    rows = [json.loads(x) for x in (run / "rollouts" / "rl.jsonl").read_text().splitlines()]
    per_prompt = 4  # group_size / g_think + g_nothink in SMALL
    assert len(rows) == 2 * 2 * per_prompt  # steps x prompts_per_step (over all dp ranks)
    for step in (1, 2):
        assert len({x["prompt_id"] for x in rows if x["step"] == step}) == 2
    assert (run / "checkpoints" / "rl" / "iter_00000002" / "meta.json").exists()
