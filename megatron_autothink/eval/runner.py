"""Evaluation of one model in several thinking modes on a held-out split.

Every test prompt is answered once per mode by the vLLM rollout engine (the same engine and
prefills RL uses: ``auto`` adds nothing, ``long`` prefills ``<think>\\n``, ``short`` the empty
think block), at the run's ``rollout.eval_temperature`` (greedy, 0, unless the recipe says
otherwise; seeded per request when above 0), scored by the same ``rl.rewards.Rubric`` RL trains
with, built from the evaluated run's ``rl.rewards`` (defaults for a bare HF directory:
math-verify on the extracted answer, multiple choice by letter, no accuracy without EOS), and
aggregated per difficulty. The forced modes are decoded under the engine's forced-mode rule
(``rollout.think_rule``): ``long`` may not close its think block (or stop) before
``min_think_tokens`` content tokens, ``short`` may not open a ``<think>``; the run's
``rollout.min_think_tokens`` / ``rollout.ban_think_in_short``, else the defaults (8, on), so a
long-mode thinking rate below 100 % means an answer cut by the budget, not a closed block. Token
counts are whole assistant turns, prefill included, so that
auto mode's self-written empty think block and short mode's prefilled one count alike.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_autothink.config import RewardWeights
from megatron_autothink.data.batch import PromptSample
from megatron_autothink.eval.model import resolve_model
from megatron_autothink.eval.summary import EvalRecord, format_markdown, goal_checks, summarize
from megatron_autothink.modes import MODES, ThinkingMode, is_thinking
from megatron_autothink.rl.rewards import Rubric
from megatron_autothink.rl.rollout import cut_at_vision_tokens
from megatron_autothink.rollout.types import (
    GenerationRequest,
    PreprocessedImages,
    SamplingConfig,
    ThinkRuleSettings,
    vision_token_ids,
)

log = logging.getLogger(__name__)


def parse_modes(text: str) -> list[ThinkingMode]:
    """``"auto,long"`` -> ``["auto", "long"]``; unknown names raise ``ValueError``."""
    out: list[ThinkingMode] = []
    for m in (x.strip() for x in text.split(",") if x.strip()):
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
        out.append(m)  # type: ignore[arg-type]
    if not out:
        raise ValueError("no modes given")
    return out


def load_prompts(
    data: str, tokenizer: Any, image_cfg: Any, *, split: str, limit: int | None
) -> list[PromptSample]:
    """One deterministic pass over ``split`` (at most ``limit`` prompts)."""
    from megatron_autothink.data.loader import PromptLoaderConfig, build_prompt_loader

    loader = build_prompt_loader(
        PromptLoaderConfig(path=data, split=split, training=False, batch_size=16, image=image_cfg),
        tokenizer,
        dp_rank=0,
        dp_world_size=1,
    )
    prompts: list[PromptSample] = []
    for batch in loader:
        prompts.extend(batch)
        if limit is not None and len(prompts) >= limit:
            return prompts[:limit]
    return prompts


def _image_config(hf_dir: Path, run_cfg: Any) -> Any:
    """The preprocessing the model was trained with: the run's, else the HF dir's."""
    from megatron_autothink.data.image_processing import ImageProcessingConfig, image_config

    if run_cfg is not None:
        return image_config(run_cfg)
    pp = hf_dir / "preprocessor_config.json"
    if not pp.is_file():
        return ImageProcessingConfig()
    c = json.loads(pp.read_text())
    default = ImageProcessingConfig()
    return ImageProcessingConfig(
        min_pixels=int(c.get("min_pixels", default.min_pixels)),
        max_pixels=int(c.get("max_pixels", default.max_pixels)),
        patch_size=int(c.get("patch_size", 14)),
        temporal_patch_size=int(c.get("temporal_patch_size", 2)),
        merge_size=int(c.get("merge_size", 2)),
    )


def eval_think_rule(min_think_tokens: int | None, run_cfg: Any) -> ThinkRuleSettings:
    """The forced-mode rule to answer with: ``min_think_tokens`` when given, else the run's
    ``rollout`` settings (what its RL rollouts were decoded with), else the defaults.

    >>> eval_think_rule(None, None), eval_think_rule(0, None).min_think_tokens
    (ThinkRuleSettings(min_think_tokens=8, ban_think_in_short=True), 0)
    """
    rule = ThinkRuleSettings() if run_cfg is None else ThinkRuleSettings.of(run_cfg.rollout)
    if min_think_tokens is None:
        return rule
    return dataclasses.replace(rule, min_think_tokens=min_think_tokens)


def eval_temperature(requested: float | None, run_cfg: Any) -> float:
    """The temperature to answer with: the one asked for, else the run's
    ``rollout.eval_temperature``, else 0 (greedy; a bare HF directory has no run config)."""
    if requested is not None:
        return requested
    return float(run_cfg.rollout.eval_temperature) if run_cfg is not None else 0.0


def generate_records(
    engine: Any,
    prompts: Sequence[PromptSample],
    modes: Sequence[ThinkingMode],
    tokenizer: Any,
    *,
    max_new_tokens: int,
    rewards: RewardWeights | None = None,
    temperature: float = 0.0,
    think_rule: ThinkRuleSettings | None = None,
) -> list[EvalRecord]:
    """Answer every prompt once in every mode (greedy at ``temperature`` 0) and score the answers
    with ``Rubric(rewards)`` (default weights when None). ``think_rule``: the forced-mode rule's
    settings (None: the defaults, rule on)."""
    score = Rubric(rewards or RewardWeights())
    banned = vision_token_ids(tokenizer)
    reqs = []
    for i, p in enumerate(prompts):
        images = (
            PreprocessedImages(p.pixel_values, p.image_grid_thw)
            if p.pixel_values is not None and p.image_grid_thw is not None
            else None
        )
        for mode in modes:
            reqs.append(GenerationRequest(f"eval-{i}-{mode}", list(p.prompt_ids), images, mode, 1))
    sampling = SamplingConfig(
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=0,
        logprobs=False,
        think_rule=think_rule or ThinkRuleSettings(),
    )
    outs = engine.generate(reqs, sampling)
    records = []
    for req, comps in zip(reqs, outs, strict=True):
        p = prompts[int(req.request_id.split("-")[1])]
        c = comps[0]
        if cut_at_vision_tokens(c, banned):  # same guard as RL rollouts
            c.text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
        text = (tokenizer.decode(c.prefill_token_ids) if c.prefill_token_ids else "") + c.text
        _, correct, _ = score(text, p, c.finish_reason == "stop")
        records.append(
            EvalRecord(
                id=p.id,
                difficulty=int(p.difficulty) if p.difficulty is not None else 0,
                mode=req.mode,
                response=text,
                correct=bool(correct),
                thinking=is_thinking(text),
                num_tokens=len(c.prefill_token_ids) + len(c.token_ids),  # the whole turn
            )
        )
    return records


def write_outputs(out: Path, records: Sequence[EvalRecord], summary: dict[str, Any]) -> None:
    """``samples.jsonl``, ``summary.json`` and ``summary.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    md = format_markdown(summary, f"Eval of {summary.get('model', '?')}")
    goals = summary.get("goals") or {}
    if goals:
        md += "\nR-4B targets (auto mode): " + json.dumps(goals.get("goals_met", {})) + "\n"
    (out / "summary.md").write_text(md)


def evaluate(
    model: str | Path,
    data: str,
    *,
    modes: Sequence[ThinkingMode] = MODES,
    split: str = "test",
    limit: int | None = None,
    out: str | Path = "eval_out",
    max_new_tokens: int = 96,
    max_model_len: int = 1024,
    rewards: RewardWeights | None = None,
    temperature: float | None = None,
    min_think_tokens: int | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (HF dir or training checkpoint) on ``data``'s ``split``.

    Args:
        model: HF directory, ``checkpoints/<stage>/iter_N``, or a stage folder (latest iter).
        data: Prepared shard folder (``autothink prep``).
        modes: Thinking modes to answer in.
        split: Split part to read (one deterministic pass).
        limit: Evaluate only the first ``limit`` prompts.
        out: Output folder (samples.jsonl, summary.json, summary.md; ``hf/`` for exports).
        max_new_tokens: Generation budget per answer (prefill not counted).
        max_model_len: vLLM context length (prompt + image tokens + answer).
        rewards: Reward weights and grading options to score with; None: the training run's
            ``rl.rewards`` when ``model`` is a training checkpoint, else the defaults.
        temperature: Sampling temperature; ``None`` takes ``rollout.eval_temperature`` of the
            training run the model comes from, 0 (greedy) when there is none.
        min_think_tokens: The forced-mode rule's minimum (:func:`eval_think_rule`); ``None``
            takes the run's ``rollout.min_think_tokens``, 8 without a run; 0 evaluates the
            prefill alone (the think block may close at once).

    Returns:
        The summary dict (``summarize`` output plus ``model``, ``split``, ``goals``, timing).
    """
    from megatron_autothink.data.tokenizer import load_tokenizer
    from megatron_autothink.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

    t0 = time.perf_counter()
    out = Path(out)
    resolved = resolve_model(model, out)
    tokenizer = load_tokenizer(str(resolved.hf_dir))
    prompts = load_prompts(
        data,
        tokenizer,
        _image_config(resolved.hf_dir, resolved.run_cfg),
        split=split,
        limit=limit,
    )
    if not prompts:
        raise ValueError(f"{data}: split {split!r} has no prompts with an answer")
    temperature = eval_temperature(temperature, resolved.run_cfg)
    think_rule = eval_think_rule(min_think_tokens, resolved.run_cfg)
    engine = VLLMRolloutEngine(
        VLLMEngineConfig(
            model_dir=str(resolved.hf_dir),
            dtype="float32",  # tiny models on CPU; exact greedy decoding
            max_model_len=max_model_len,
            seed=0,
            cpu_threads=1,  # shared CPU cores: one thread is several times faster
        )
    )
    try:
        t_gen = time.perf_counter()
        if rewards is None and resolved.run_cfg is not None:
            rewards = resolved.run_cfg.rl.rewards
        records = generate_records(
            engine,
            prompts,
            modes,
            tokenizer,
            max_new_tokens=max_new_tokens,
            rewards=rewards,
            temperature=temperature,
            think_rule=think_rule,
        )
        t_gen = time.perf_counter() - t_gen
    finally:
        engine.shutdown()
    summary = summarize(records)
    summary.update(
        {
            "model": str(model),
            "data": data,
            "split": split,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "min_think_tokens": think_rule.min_think_tokens,
            "ban_think_in_short": think_rule.ban_think_in_short,
            "goals": goal_checks(summary),
            "time_s": {"total": time.perf_counter() - t0, "generate": t_gen},
        }
    )
    write_outputs(out, records, summary)
    log.info("eval of %s: %d prompts x %d modes in %.1fs", model, len(prompts), len(modes), t_gen)
    return summary
