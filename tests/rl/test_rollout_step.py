"""The rollout role's glue on hand-made inputs: forced rethinking and the length metrics.

``rollout.testing``'s scripted engine (the ``RolloutEngine`` interface, canned completions per
request id) and one-character-per-token tokenizer make every token count computable by hand.
"""

from __future__ import annotations

import math
import random

from megatron_autothink.config import RethinkConfig, RLConfig
from megatron_autothink.data.batch import PromptSample
from megatron_autothink.rl.rollout import ScoredResponse, force_rethinking
from megatron_autothink.rl.trainer import rollout_metrics, rollout_records
from megatron_autothink.rollout.testing import CharTokenizer, ScriptedEngine
from megatron_autothink.rollout.types import SamplingConfig


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
    assert [r["tokens"] for r in rollout_records(1, [PROMPT], groups)] == [28, 28, 31]
