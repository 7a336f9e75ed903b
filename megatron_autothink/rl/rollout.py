"""The rollout role: prompts -> groups of scored responses (with optional forced rethinking).

* GRPO / REINFORCE (LMM-R1, VL-Rethinker): ``group_size`` samples per prompt in ``auto`` mode.
* BPO (R-4B): ``g_think`` samples with the thinking prefill and ``g_nothink`` with the empty
  think block, one mixed group per prompt.
* Forced rethinking (VL-Rethinker): eligible responses get a trigger appended and are continued;
  an accepted continuation replaces the original response in its group.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_autothink.config import RLConfig
from megatron_autothink.data.batch import PromptSample
from megatron_autothink.modes import is_thinking
from megatron_autothink.rl.algorithm import Algorithm
from megatron_autothink.rl.rethinking import accept_rethink, plan_rethink
from megatron_autothink.rollout.engine import RolloutEngine
from megatron_autothink.rollout.types import (
    Completion,
    GenerationRequest,
    PreprocessedImages,
    SamplingConfig,
    vision_token_ids,
)


@dataclass
class ScoredResponse:
    """One response with everything the trainer and the metrics need."""

    prompt_index: int  # into the step's prompt list
    forced_mode: str  # "auto" | "long" | "short"
    prefill_ids: list[int]  # [F]
    response_ids: list[int]  # [R]
    engine_logprobs: list[float]  # [R]; NaN where the engine did not sample (rethink prefix)
    text: str  # prefill + response text (what rewards see)
    finished: bool
    reward: float = 0.0
    correct: bool = False
    thinking: bool = False  # non-empty think block
    rethink: str = ""  # "" | "accepted" | "rejected:<reason>"
    components: dict[str, float] = field(default_factory=dict)
    vision_cut: bool = False  # response cut before a sampled image placeholder token

    @property
    def num_tokens(self) -> int:
        """Length of the whole assistant turn, prefill included: every mode counts the same
        tokens (auto mode's self-written empty think block as short mode's prefilled one)."""
        return len(self.prefill_ids) + len(self.response_ids)


ScoreFn = Callable[[str, PromptSample, bool], tuple[float, bool, dict[str, float]]]
"""(full response text, prompt, finished) -> (reward, correct, per-component scores)."""


def requests_for(
    prompts: Sequence[PromptSample], algo: Algorithm, step: int
) -> list[GenerationRequest]:
    """One request per prompt and forced mode (BPO: two)."""
    reqs = []
    for i, p in enumerate(prompts):
        images = (
            PreprocessedImages(p.pixel_values, p.image_grid_thw)
            if p.pixel_values is not None and p.image_grid_thw is not None
            else None
        )
        for mode, n in algo.groups:
            if n > 0:
                reqs.append(
                    GenerationRequest(
                        f"s{step}-p{i}-{mode}-{p.id}", list(p.prompt_ids), images, mode, n
                    )
                )
    return reqs


def generate_groups(
    engine: RolloutEngine,
    prompts: Sequence[PromptSample],
    algo: Algorithm,
    sampling: SamplingConfig,
    tokenizer: Any,
    score: ScoreFn,
    *,
    step: int,
) -> list[list[ScoredResponse]]:
    """Sample and score every prompt's group (list per prompt, in prompt order)."""
    reqs = requests_for(prompts, algo, step)
    outs = engine.generate(reqs, sampling)
    groups: list[list[ScoredResponse]] = [[] for _ in prompts]
    for req, comps in zip(reqs, outs, strict=True):
        idx = int(req.request_id.split("-")[1][1:])
        for c in comps:
            groups[idx].append(_scored(idx, req.mode, c, tokenizer, prompts[idx], score))
    return groups


def cut_at_vision_tokens(c: Completion, banned: set[int]) -> bool:
    """The trainer would try to put image features at an image placeholder token in a response.
    The vLLM engine never samples them (``VLLMRolloutEngine`` biases them away); an engine that
    does gets the response cut before the first one (it then counts as unfinished)."""
    for j, t in enumerate(c.token_ids):
        if t in banned:
            c.token_ids = c.token_ids[:j]
            c.logprobs = c.logprobs[:j] if c.logprobs else c.logprobs
            c.finish_reason = "length"
            return True
    return False


def _scored(
    idx: int, mode: str, c: Completion, tokenizer: Any, prompt: PromptSample, score: ScoreFn
) -> ScoredResponse:
    cut = cut_at_vision_tokens(c, vision_token_ids(tokenizer))
    if cut:
        c.text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
    prefill_text = tokenizer.decode(c.prefill_token_ids) if c.prefill_token_ids else ""
    text = prefill_text + c.text
    finished = c.finish_reason == "stop"
    reward, correct, comps = score(text, prompt, finished)
    return ScoredResponse(
        prompt_index=idx,
        forced_mode=mode,
        prefill_ids=list(c.prefill_token_ids),
        response_ids=list(c.token_ids),
        engine_logprobs=list(c.logprobs) if c.logprobs else [float("nan")] * len(c.token_ids),
        text=text,
        finished=finished,
        reward=reward,
        correct=correct,
        thinking=is_thinking(text),
        components=comps,
        vision_cut=cut,
    )


def force_rethinking(
    engine: RolloutEngine,
    prompts: Sequence[PromptSample],
    groups: list[list[ScoredResponse]],
    rl: RLConfig,
    sampling: SamplingConfig,
    tokenizer: Any,
    score: ScoreFn,
    rng: random.Random,
) -> dict[str, float]:
    """VL-Rethinker's forced rethinking, in place on ``groups``; returns acceptance metrics.

    Each continuation asks for the plan's budget (what its original response left of
    ``max_new_tokens``), capped so that prefix + trigger + continuation stay within
    ``max_new_tokens``: the request then fits the context wherever the original did, and the
    swapped-in response fits the trainer's ``seq_length``. A response whose prefix and trigger
    leave no room is marked ``rejected:low_budget`` and not continued.
    """
    rt = rl.rethink
    plans = []
    for gi, group in enumerate(groups):
        acc = sum(r.correct for r in group) / max(len(group), 1)
        for ri, r in enumerate(group):
            response_text = tokenizer.decode(r.response_ids, skip_special_tokens=True)
            plan = plan_rethink(
                response_text,
                num_tokens=len(r.response_ids),
                max_tokens=sampling.max_new_tokens,
                finished=r.finished,
                correct=r.correct,
                group_accuracy=acc,
                rng=rng,
                min_budget=rt.min_budget_tokens,
                drop_prob=rt.drop_prob,
                truncate_prob=rt.truncate_prob,
                temperature=rt.temperature,
                max_continuation_tokens=sampling.max_new_tokens,
            )
            if plan.eligible:
                plans.append((gi, ri, plan))
    if not plans:
        return {"rethink/attempted": 0.0, "rethink/accepted": 0.0, "rethink/acceptance": 0.0}
    reqs, prefixes, kept_plans = [], [], []
    for gi, ri, plan in plans:
        r = groups[gi][ri]
        prefix_ids = tokenizer.encode(plan.continuation_prompt, add_special_tokens=False)
        # The plan's budget (what the original response left), and never more than keeps
        # prefix + trigger + continuation within max_new_tokens: the trigger's own tokens
        # count, so a continuation fits the context wherever its original response did.
        budget = min(plan.max_new_tokens, sampling.max_new_tokens - len(prefix_ids))
        if budget < 1:
            r.rethink = "rejected:low_budget"
            continue
        prompt_ids = list(prompts[gi].prompt_ids) + r.prefill_ids + prefix_ids
        p = prompts[gi]
        images = (
            PreprocessedImages(p.pixel_values, p.image_grid_thw)
            if p.pixel_values is not None and p.image_grid_thw is not None
            else None
        )
        reqs.append(GenerationRequest(f"rethink-{gi}-{ri}", prompt_ids, images, "auto", 1, budget))
        prefixes.append(prefix_ids)
        kept_plans.append((gi, ri, plan))
    cont_sampling = SamplingConfig(
        temperature=rt.temperature,
        top_p=sampling.top_p,
        max_new_tokens=sampling.max_new_tokens,  # each request carries its own budget
        seed=None if sampling.seed is None else sampling.seed + 7919,
        stop_token_ids=sampling.stop_token_ids,
        # Continuations are auto-mode requests (their prompts end with the trigger, not with a
        # prefill), so the forced-mode rule does not fire; passed on for consistency.
        think_rule=sampling.think_rule,
    )
    outs = engine.generate(reqs, cont_sampling) if reqs else []
    kept_per_prompt: dict[int, int] = {}
    accepted = 0
    for (gi, ri, plan), prefix_ids, comps in zip(kept_plans, prefixes, outs, strict=True):
        c = comps[0]
        if cut_at_vision_tokens(c, vision_token_ids(tokenizer)):
            c.text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
        r = groups[gi][ri]
        full_text = tokenizer.decode(r.prefill_ids) + plan.continuation_prompt + c.text
        reward, correct, compscores = score(full_text, prompts[gi], c.finish_reason == "stop")
        verdict = accept_rethink(
            c.text,
            len(c.token_ids),
            correct,
            kept_per_prompt.get(gi, 0),
            min_tokens=rt.min_continuation_tokens,
        )
        if not verdict.accept:
            r.rethink = f"rejected:{verdict.reason}"
            continue
        kept_per_prompt[gi] = kept_per_prompt.get(gi, 0) + 1
        accepted += 1
        groups[gi][ri] = ScoredResponse(
            prompt_index=gi,
            forced_mode=r.forced_mode,
            prefill_ids=r.prefill_ids,
            response_ids=prefix_ids + list(c.token_ids),
            # The re-tokenised prefix was not sampled in this form: no engine log-probs.
            engine_logprobs=[float("nan")] * len(prefix_ids) + list(c.logprobs),
            text=full_text,
            finished=c.finish_reason == "stop",
            reward=reward,
            correct=correct,
            thinking=is_thinking(full_text),
            rethink="accepted",
            components=compscores,
        )
    return {
        "rethink/attempted": float(len(kept_plans)),
        "rethink/accepted": float(accepted),
        "rethink/acceptance": accepted / max(len(kept_plans), 1),
    }
