"""The rollout role's glue on hand-made inputs: forced rethinking and the length metrics.

``tests.rollout.harness``'s scripted engine (the ``RolloutEngine`` interface, canned completions per
request id) and one-character-per-token tokenizer make every token count computable by hand.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from megatron_autothink.config import RethinkConfig, RLConfig
from megatron_autothink.data.batch import PromptSample
from megatron_autothink.rl.rollout import ScoredResponse, force_rethinking
from megatron_autothink.rl.trainer import rollout_metrics, rollout_records
from megatron_autothink.rollout.types import SamplingConfig
from tests.rollout.harness import CharTokenizer, ScriptedEngine


class AlwaysHigh(random.Random):
    """Every draw is 0.9: never dropped or truncated, and the answer-specific trigger."""

    def random(self) -> float:
        return 0.9


def score(text: str, prompt: PromptSample, finished: bool) -> tuple[float, bool, dict[str, float]]:
    correct = text.rstrip().endswith("\\boxed{4}")
    return float(correct), correct, {"accuracy": float(correct)}


def response(text: str, correct: bool, finished: bool = True, prefill: str = "") -> ScoredResponse:
    return ScoredResponse(
        prompt_index=0,
        forced_mode="auto",
        prefill_ids=[ord(c) for c in prefill],
        response_ids=[ord(c) for c in text],
        engine_logprobs=[-0.1] * len(text),
        text=prefill + text,
        finished=finished,
        reward=float(correct),
        correct=correct,
    )


PROMPT = PromptSample(id="q", prompt="2+2?", prompt_ids=[1, 2, 3], vllm_prompt="2+2?", answer="4")
RIGHT = "2+2 = \\boxed{4}"  # 15 tokens
WRONG = "2+2 = \\boxed{5}"  # 15 tokens
LONG = "1" * 71 + "\\boxed{4}"  # 80 tokens
DOUBLE_CHECK = "\n\nWait, let's double check"  # 26 tokens: the trigger after a right answer
MISTAKE = "\n\nWait, there might be a mistake"  # 32 tokens: after a wrong one
FIXED = " Checked again: 2 + 2 = 4, so \\boxed{4}"  # 39 tokens, right
STILL_WRONG = " Checked again: 2 + 2 = 5, so \\boxed{5}"  # 39 tokens, wrong


def test_forced_rethinking_step_budgets_requests_and_swaps() -> None:
    prompts = [PROMPT, PROMPT]
    unfinished = response("2+2 = ", correct=False, finished=False)
    groups = [
        [response(RIGHT, True), response(WRONG, False), unfinished],
        [response(LONG, True)],
    ]
    groups[1][0].prompt_index = 1
    engine = ScriptedEngine({"rethink-0-0": FIXED, "rethink-0-1": STILL_WRONG})
    rl = RLConfig(
        rethink=RethinkConfig(enabled=True, min_budget_tokens=10, drop_prob=0.0, truncate_prob=0.0)
    )
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=100, seed=3)
    metrics = force_rethinking(
        engine, prompts, groups, rl, sampling, CharTokenizer(), score, AlwaysHigh()
    )

    # One engine call for the two planned continuations; the unfinished response has no EOS
    # (not eligible) and the 80-token one leaves 100 - 80 = 20 >= 10 tokens by the plan, but
    # its prefix + trigger is already 80 + 26 = 106 > 100 tokens: no room, no request.
    ((requests, cont),) = engine.calls
    assert [r.request_id for r in requests] == ["rethink-0-0", "rethink-0-1"]
    assert requests[0].prompt_token_ids == [1, 2, 3] + [ord(c) for c in RIGHT + DOUBLE_CHECK]
    assert requests[1].prompt_token_ids == [1, 2, 3] + [ord(c) for c in WRONG + MISTAKE]
    # Budgets: the plan leaves 100 - 15 = 85 tokens, capped so that prefix + trigger +
    # continuation stays within 100: 100 - (15 + 26) = 59 and 100 - (15 + 32) = 53.
    assert [r.budget(cont) for r in requests] == [59, 53]
    for r in requests:  # each fits wherever its original did: prompt + 100 tokens
        assert len(r.prompt_token_ids) + r.budget(cont) <= 3 + 100
    assert cont.temperature == 0.9 and cont.seed == 3 + 7919

    swapped = groups[0][0]
    assert swapped.rethink == "accepted" and swapped.correct and swapped.reward == 1.0
    assert swapped.text == RIGHT + DOUBLE_CHECK + FIXED
    assert swapped.response_ids == [ord(c) for c in RIGHT + DOUBLE_CHECK + FIXED]
    # The re-tokenised prefix was not sampled as such: NaN there, the engine's after it.
    assert all(math.isnan(x) for x in swapped.engine_logprobs[:41])
    assert swapped.engine_logprobs[41:] == [-0.25] * 39
    assert groups[0][1].rethink == "rejected:incorrect"
    assert groups[0][1].response_ids == [ord(c) for c in WRONG]  # kept as it was
    assert groups[0][2] is unfinished and unfinished.rethink == ""
    assert groups[1][0].rethink == "rejected:low_budget"
    assert metrics == {
        "rethink/attempted": 2.0,
        "rethink/accepted": 1.0,
        "rethink/acceptance": 0.5,
    }


def test_lengths_count_the_whole_assistant_turn_in_every_mode() -> None:
    """Issue #18 defect 7: short mode's prefilled empty think block counts exactly as auto
    mode's self-generated one."""
    block = "<think>\n\n</think>\n\n"  # 19 tokens with the character tokenizer
    auto = response(block + "\\boxed{4}", True)  # the model wrote the block: 19 + 9 = 28
    auto.forced_mode = "auto"
    short = response("\\boxed{4}", True, prefill=block)  # the engine prefilled it: 19 + 9
    short.forced_mode = "short"
    long = response("hmm\n</think>\n\n\\boxed{4}", True, prefill="<think>\n")  # 8 + 23 = 31
    long.forced_mode = "long"
    groups = [[auto, short, long]]
    m = rollout_metrics([PROMPT], groups)
    assert m["rollout/auto/length"] == m["rollout/short/length"] == 28.0
    assert m["rollout/long/length"] == 31.0
    assert [r.tokens for r in rollout_records(1, [PROMPT], groups)] == [28, 28, 31]


def test_length_cost_lets_bpo_prefer_the_direct_answer_only_where_both_modes_are_right() -> None:
    """``rl.rewards.length_cost``, through the trainer's rollout step: on an easy prompt (both
    modes right) the short answers win the mixed group; on a hard one (only the trace is right)
    the trace still wins; wrong answers pay nothing. Without the cost the easy group's
    advantages are all 0 (nothing tells BPO to stop thinking there)."""
    from megatron_autothink.config import AutothinkConfig
    from megatron_autothink.data.image_processing import ImageProcessingConfig
    from megatron_autothink.rl.algorithm import Algorithm
    from megatron_autothink.rl.trainer import RLContext, _rollouts, compute_advantages

    trace = "a=4\n</think>\n\nThe answer is \\boxed{4}"  # 8 prefill + 37 = 45 tokens
    direct = "\\boxed{4}"  # 19 + 9 = 28 tokens
    easy = PromptSample(id="e", prompt="a?", prompt_ids=[1], vllm_prompt="a?", answer="4")
    hard = PromptSample(id="h", prompt="a*b?", prompt_ids=[2], vllm_prompt="a*b?", answer="4")
    answers = {
        "s0-p0-long-e": trace, "s0-p0-short-e": direct,
        "s0-p1-long-h": trace, "s0-p1-short-h": "\\boxed{5}",
    }  # fmt: skip
    sampling = SamplingConfig(max_new_tokens=96)

    def run(cost: float) -> tuple[list[list[ScoredResponse]], list[list[float]]]:
        cfg = AutothinkConfig()
        cfg.rl.algorithm, cfg.rl.rewards.length_cost = "bpo", cost
        cfg.rl.bpo.g_think = cfg.rl.bpo.g_nothink = 2
        rc: Any = RLContext(
            cfg=cfg, ctx=None, chunks=[], ref_chunks=None, opt=None,
            engine=ScriptedEngine(answers), tokenizer=CharTokenizer(), algo=Algorithm.of(cfg.rl),
            score=score, replay=None,
            rng=None, gen=None, pad_id=0, image_token_id=99, image=ImageProcessingConfig(),
            weight_sync=None, comm=None,
        )  # fmt: skip
        groups, _ = _rollouts(rc, [easy, hard], sampling, 0)
        return groups, compute_advantages(groups, Algorithm.of(cfg.rl))

    groups, adv = run(0.2)
    e_long, _, e_short, _ = groups[0]
    assert (e_long.num_tokens, e_short.num_tokens) == (45, 28)
    assert e_long.reward == pytest.approx(1 - 0.2 * 45 / 96)
    assert e_short.reward == pytest.approx(1 - 0.2 * 28 / 96)
    assert adv[0][0] < 0 < adv[0][2]  # easy: the direct answer wins
    _, _, h_short, _ = groups[1]
    assert h_short.reward == 0.0 and h_short.components["length_cost"] == 0.0
    assert adv[1][0] > 0 > adv[1][2]  # hard: the trace still wins
    _, adv0 = run(0.0)
    assert adv0[0] == [0.0] * 4 and adv0[1][0] > 0


def test_rethink_budgets_scale_to_a_short_answer_budget() -> None:
    """The paper's budgets (1024 tokens left, continuations of >= 30) can never trigger at a
    96-token answer budget; scaled down, a short right continuation is accepted."""
    short_fix = " so \\boxed{4}"  # 13 tokens

    def run(rethink: RethinkConfig) -> tuple[dict[str, float], ScoredResponse]:
        groups = [[response(RIGHT, True)]]
        engine = ScriptedEngine({"rethink-0-0": short_fix})
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=96, seed=3)
        m = force_rethinking(
            engine, [PROMPT], groups, RLConfig(rethink=rethink), sampling, CharTokenizer(),
            score, AlwaysHigh(),
        )  # fmt: skip
        return m, groups[0][0]

    paper = RethinkConfig(enabled=True, drop_prob=0.0, truncate_prob=0.0)
    m, r = run(paper)
    assert m["rethink/attempted"] == 0.0 and r.rethink == ""  # 96 - 15 tokens left < 1024
    m, r = run(paper.model_copy(update={"min_budget_tokens": 48}))
    assert m["rethink/attempted"] == 1.0 and r.rethink == "rejected:too_short"  # 13 < 30
    m, r = run(paper.model_copy(update={"min_budget_tokens": 48, "min_continuation_tokens": 8}))
    assert m["rethink/acceptance"] == 1.0 and r.rethink == "accepted"
    assert r.text == RIGHT + DOUBLE_CHECK + short_fix
