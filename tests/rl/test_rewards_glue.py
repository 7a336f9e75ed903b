"""Training rollouts and ``autothink eval`` score with the same Rubric: same text, same verdict.

Both paths are driven with a scripted engine (no model), so the only thing under test is the
glue: the prefill is part of the scored text, ``finish_reason`` becomes the EOS rule, and the
recipe's weights reach the scorer.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from megatron_autothink.config import RLConfig, load_config
from megatron_autothink.data.batch import PromptSample
from megatron_autothink.eval.runner import generate_records
from megatron_autothink.rl.algorithm import Algorithm
from megatron_autothink.rl.rewards import Rubric
from megatron_autothink.rl.rollout import generate_groups
from megatron_autothink.rollout.types import Completion, GenerationRequest, SamplingConfig

LONG_PREFILL = 11  # token id the fake tokenizer decodes to "<think>\n"


class _Tokenizer:
    unk_token_id = 0

    def convert_tokens_to_ids(self, name: str) -> int:
        return 0  # no vision tokens in this vocabulary

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join("<think>\n" if i == LONG_PREFILL else "" for i in ids)


class _ScriptedEngine:
    """Answers request i with ``script[i]``: (text, finish_reason) per sample."""

    def __init__(self, script: list[list[tuple[str, str]]]) -> None:
        self.script = script

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingConfig
    ) -> list[list[Completion]]:
        assert len(requests) == len(self.script)
        out = []
        for req, samples in zip(requests, self.script, strict=True):
            prefill = [LONG_PREFILL] if req.mode == "long" else []
            out.append(
                [Completion([5] * 3, [0.0] * 3, t, f, prefill, req.mode) for t, f in samples]  # type: ignore[arg-type]
            )
        return out


PROMPTS = [PromptSample("p0", "q", [1, 2], "q", answer="7", answer_type="number")]
# (generated text, finish reason): right and finished, right but cut, cut mid-thought, wrong.
SAMPLES = [
    ("3+4=7\n</think>\n\n<answer>\\boxed{7}</answer>", "stop"),
    ("3+4=7\n</think>\n\n<answer>\\boxed{7}</answer>", "length"),
    ("so far 3+4=7", "length"),
    ("3+4=8\n</think>\n\n\\boxed{8}", "stop"),
]


@pytest.fixture(scope="module")
def rubric() -> Rubric:
    return Rubric(load_config("lmm_r1_tiny").rl.rewards)


def test_eval_records_use_the_recipe_rubric(rubric: Rubric) -> None:
    engine = _ScriptedEngine([[s] for s in SAMPLES])
    prompts = PROMPTS * len(SAMPLES)  # one sample per prompt, all in "long" mode
    records = generate_records(
        engine, prompts, ["long"], _Tokenizer(), max_new_tokens=8, rewards=rubric.weights
    )
    assert [r.response for r in records] == ["<think>\n" + t for t, _ in SAMPLES]
    assert [r.correct for r in records] == [True, False, False, False]
    for rec, (_, reason) in zip(records, SAMPLES, strict=True):
        expected = rubric.score(
            rec.response, answer="7", answer_type="number", finished=reason == "stop"
        )
        assert rec.correct == expected.correct


def test_training_rollout_uses_the_same_scores(rubric: Rubric) -> None:
    engine = _ScriptedEngine([SAMPLES])
    rl = RLConfig(algorithm="grpo", group_size=len(SAMPLES))
    [group] = generate_groups(
        engine,
        PROMPTS,
        Algorithm.of(rl),
        SamplingConfig(max_new_tokens=8),
        _Tokenizer(),
        rubric,
        step=0,
    )
    assert [(r.reward, r.correct) for r in group] == [
        (1.0, True),
        (0.0, False),
        (0.0, False),
        (0.0, False),
    ]
