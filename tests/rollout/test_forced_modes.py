"""Forced modes are forced (issue #19, item 0), on the real vLLM engine.

The session's tiny model gets weights that make the tag the mode must not produce the most
likely next token right after the prefill (its tied embedding / head row is set along the
hidden states at those positions), pushed through the engine's weight sync. Without the rule
long mode then closes its think block at once and short mode opens a new one; with it neither
happens, eval's long-mode thinking rate is 100 %, and the engine's log-probs stay the
unconstrained policy's. Every test restores the original weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from megatron_autothink.modes import PREFILLS, is_thinking
from megatron_autothink.rollout import GenerationRequest, SamplingConfig
from megatron_autothink.rollout.types import ThinkRuleSettings
from tests.rollout.harness import chat_prompt, hf_token_logprobs

pytestmark = pytest.mark.vllm

N = 8
QUESTIONS = ["solve 12 + 7", "what is 3 * 4?", "name a colour", "count the digits", "sum 5 9"]


def _prompts(engine: Any) -> list[list[int]]:
    return [chat_prompt(engine.tokenizer, q) for q in QUESTIONS]


@contextmanager
def tag_boosted(
    engine: Any, hf_model: Any, tiny_vl_dir: Path, tag: str, mode: str
) -> Iterator[Any]:
    """The engine (and a transformers copy) with ``tag`` the argmax right after ``mode``'s
    prefill for every test prompt; the original weights are pushed back afterwards."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    tok = engine.tokenizer
    tag_id = tok.convert_tokens_to_ids(tag)
    prefill = tok.encode(PREFILLS[mode], add_special_tokens=False)
    with torch.no_grad():
        hs, top = [], []
        for p in _prompts(engine):
            out = hf_model(
                input_ids=torch.tensor([p + prefill]), output_hidden_states=True, use_cache=False
            )
            hs.append(out.hidden_states[-1][0, -1])  # after the final norm: the head's input
            top.append(out.logits[0, -1].max())
        h = torch.stack(hs)
        direction = h.mean(0) / h.mean(0).norm()
        along = h @ direction
        assert along.min() > 0, "the prompts' hidden states share no direction"
        # Large enough that the tag's logit beats every other one by 5 at each prompt.
        row = direction * float((torch.stack(top).max() + 5) / along.min())
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    for name in state:  # tied: the embedding and the head are one row in vLLM
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            state[name][tag_id] = row
    boosted = Qwen2_5_VLForConditionalGeneration(hf_model.config).eval()
    boosted.load_state_dict(state)
    engine.update_weights(iter(state.items()), version=engine.policy_version + 1)
    try:
        yield boosted
    finally:
        original = load_file(str(tiny_vl_dir / "model.safetensors"))
        engine.update_weights(iter(original.items()), version=engine.policy_version + 1)


def think_block(engine: Any, token_ids: list[int]) -> list[int]:
    """The completion's tokens before its first ``</think>`` (all of them if it never closes)."""
    close = engine.tokenizer.convert_tokens_to_ids("</think>")
    return token_ids[: token_ids.index(close)] if close in token_ids else token_ids


def content_tokens(engine: Any, ids: list[int]) -> int:
    return sum(bool(engine.tokenizer.decode([t]).strip()) for t in ids)


def test_long_mode_writes_min_think_tokens_before_closing(
    engine: Any, hf_model: Any, tiny_vl_dir: Path
) -> None:
    close = engine.tokenizer.convert_tokens_to_ids("</think>")
    prompts = _prompts(engine)
    greedy = [GenerationRequest(f"g{i}", p, mode="long") for i, p in enumerate(prompts)]
    sampled = [GenerationRequest(f"s{i}", p, mode="long", n=4) for i, p in enumerate(prompts)]
    auto = [GenerationRequest(f"a{i}", p, mode="auto") for i, p in enumerate(prompts)]
    with tag_boosted(engine, hf_model, tiny_vl_dir, "</think>", "long") as boosted:
        off = SamplingConfig(
            temperature=0.0, max_new_tokens=24, seed=0, think_rule=ThinkRuleSettings(0)
        )
        # The prefill alone: every long answer closes its think block at once.
        for (c,) in engine.generate(greedy, off):
            assert c.token_ids[0] == close, c.text
            assert not is_thinking(PREFILLS["long"] + c.text)

        on = SamplingConfig(
            temperature=0.0, max_new_tokens=24, seed=0, think_rule=ThinkRuleSettings(N)
        )
        hot = SamplingConfig(
            temperature=1.0, max_new_tokens=24, seed=3, think_rule=ThinkRuleSettings(N)
        )
        completions = [c for g in engine.generate(greedy, on) for c in g]
        assert len(completions) == len(prompts)
        # Greedy under the rule, token by token: the argmax without </think> and EOS while the
        # block holds fewer than N content tokens, the plain argmax after (the ban lifts).
        banned = [close, engine.tokenizer.eos_token_id]
        changed = 0
        for r, c in zip(greedy, completions, strict=True):
            ids = torch.tensor([r.prompt_token_ids + c.prefill_token_ids + c.token_ids])
            start = len(r.prompt_token_ids) + len(c.prefill_token_ids) - 1
            with torch.no_grad():
                logits = boosted(input_ids=ids, use_cache=False).logits[0]
            for j, tok in enumerate(c.token_ids):
                row = logits[start + j].clone()
                if content_tokens(engine, c.token_ids[:j]) < N:
                    changed += int(row.argmax()) in banned
                    row[banned] = float("-inf")
                assert tok == int(row.argmax()), (c.text, j)
        assert changed >= len(prompts)  # at least the first token of each answer
        completions += [c for g in engine.generate(sampled, hot) for c in g]
        for c in completions:
            assert content_tokens(engine, think_block(engine, c.token_ids)) >= N, c.text
            assert is_thinking(PREFILLS["long"] + c.text), c.text

        # The engine reports the *unconstrained* policy's log-probs (raw, before the ban):
        # what the trainer recomputes, so mismatch/* compares the same distribution.
        trainer = [
            hf_token_logprobs(boosted, r.prompt_token_ids, [c])[0]
            for r, c in zip(
                greedy + [s for s in sampled for _ in range(4)], completions, strict=True
            )
        ]
        for c, lp in zip(completions, trainer, strict=True):
            np.testing.assert_allclose(c.logprobs, lp, atol=2e-3)
        # ...which at the banned positions is where the policy wanted to close: the sampled
        # token got little of its mass (renormalised log-probs would be near 0 here).
        first = [c.logprobs[0] for c in completions[: len(prompts)]]
        assert max(first) < np.log(0.5), first

        # Auto mode is the model's decision: the rule never touches it.
        auto_off = [c.token_ids for (c,) in engine.generate(auto, off)]
        assert [c.token_ids for (c,) in engine.generate(auto, on)] == auto_off


def test_short_mode_never_opens_a_think_block(
    engine: Any, hf_model: Any, tiny_vl_dir: Path
) -> None:
    open_id = engine.tokenizer.convert_tokens_to_ids("<think>")
    prompts = _prompts(engine)
    greedy = [GenerationRequest(f"sh{i}", p, mode="short") for i, p in enumerate(prompts)]
    sampled = [GenerationRequest(f"ss{i}", p, mode="short", n=3) for i, p in enumerate(prompts)]
    with tag_boosted(engine, hf_model, tiny_vl_dir, "<think>", "short"):
        free = SamplingConfig(
            temperature=0.0,
            max_new_tokens=16,
            seed=0,
            think_rule=ThinkRuleSettings(ban_think_in_short=False),
        )
        for (c,) in engine.generate(greedy, free):
            assert c.token_ids[0] == open_id, c.text  # the prefill alone: it opens one
        for requests, sampling in (
            (greedy, SamplingConfig(temperature=0.0, max_new_tokens=16, seed=0)),
            (sampled, SamplingConfig(temperature=1.0, max_new_tokens=16, seed=5)),
        ):
            for g in engine.generate(requests, sampling):
                for c in g:
                    assert open_id not in c.token_ids and "<think>" not in c.text, c.text
                    assert not is_thinking(PREFILLS["short"] + c.text)


def test_eval_long_mode_thinks_on_every_question(
    engine: Any, hf_model: Any, tiny_vl_dir: Path
) -> None:
    from megatron_autothink.data.batch import PromptSample
    from megatron_autothink.eval.runner import generate_records
    from megatron_autothink.eval.summary import summarize

    tok = engine.tokenizer
    prompts = [
        PromptSample(
            id=f"q{i}",
            prompt=tok.decode(p),
            prompt_ids=p,
            vllm_prompt=tok.decode(p),
            answer="7",
            answer_type="number",
            difficulty=1 + i % 2,
        )
        for i, p in enumerate(_prompts(engine))
    ]

    def think_rate(rule: ThinkRuleSettings) -> dict[str, float]:
        records = generate_records(
            engine, prompts, ["long", "short"], tok, max_new_tokens=16, think_rule=rule
        )
        return {
            m: sum(r.thinking for r in records if r.mode == m) / len(prompts)
            for m in ("long", "short")
        } | {"summary": bool(summarize(records))}

    with tag_boosted(engine, hf_model, tiny_vl_dir, "</think>", "long"):
        assert think_rate(ThinkRuleSettings(min_think_tokens=0))["long"] == 0.0
        rates = think_rate(ThinkRuleSettings())
        assert rates["long"] == 1.0 and rates["short"] == 0.0


def test_the_engine_never_samples_an_image_placeholder(
    engine: Any, hf_model: Any, tiny_vl_dir: Path
) -> None:
    """A forced-thinking rollout whose first sampled token was ``<|image_pad|>`` came back empty
    (the rollout cuts responses at vision tokens: 4 of 10 240 in the demo's BPO). With the pad
    token the argmax after the thinking prefill, the engine samples it in no mode, and its
    reported log-prob is still the unbiased policy's (what the trainer recomputes)."""
    pad = engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    prompts = _prompts(engine)
    with tag_boosted(engine, hf_model, tiny_vl_dir, "<|image_pad|>", "long") as boosted:
        for mode in ("long", "auto", "short"):
            for n, sampling in (
                (1, SamplingConfig(temperature=0.0, max_new_tokens=8, seed=0)),
                (3, SamplingConfig(temperature=1.0, max_new_tokens=8, seed=3)),
            ):
                requests = [
                    GenerationRequest(f"v{mode}{n}{i}", p, mode=mode, n=n)
                    for i, p in enumerate(prompts)
                ]
                for c in (c for g in engine.generate(requests, sampling) for c in g):
                    assert pad not in c.token_ids, (mode, c.text)
        prefill = engine.tokenizer.encode(PREFILLS["long"], add_special_tokens=False)
        (c,) = engine.generate([GenerationRequest("vlp", prompts[0], mode="long")],
                               SamplingConfig(temperature=0.0, max_new_tokens=1, seed=0))[0]  # fmt: skip
        with torch.no_grad():
            logits = boosted(input_ids=torch.tensor([prompts[0] + prefill]), use_cache=False).logits
        expected = torch.log_softmax(logits[0, -1].float(), -1)[c.token_ids[0]]
        assert abs(c.logprobs[0] - float(expected)) < 1e-3  # the pad's boost is in it: unbiased
