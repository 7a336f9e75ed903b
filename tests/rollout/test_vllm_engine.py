"""End-to-end tests of the vLLM rollout engine on a tiny random Qwen2.5-VL (CPU, fp32).

One engine serves the whole session (see conftest.py); tests that change its weights restore
them before they return, and every test reads the current policy version instead of assuming
one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_autothink.modes import PREFILLS
from megatron_autothink.rollout import (
    EngineStartError,
    GenerationRequest,
    PreprocessedImages,
    RequestTooLongError,
    RolloutError,
    SamplingConfig,
    StaleWeightsError,
    WeightUpdateError,
    format_parity,
    logprob_parity,
)
from megatron_autothink.rollout.images import expand_image_pads, preprocess_images
from tests.rollout.harness import (
    chat_prompt,
    hf_token_logprobs,
    megatron_model_from_hf,
    megatron_token_logprobs,
)

pytestmark = pytest.mark.vllm

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12, seed=0)


def noise_image(seed: int, size: tuple[int, int] = (112, 84)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def tokens_and_logprobs(groups: list[list[Any]]) -> list[tuple[list[int], list[float]]]:
    return [(c.token_ids, c.logprobs) for group in groups for c in group]


def check_parity(engine_lp: list[list[float]], trainer_lp: list[list[float]], what: str) -> None:
    report = logprob_parity(engine_lp, trainer_lp)
    print(f"\n[parity {what}] {format_parity(report)}")
    # Goal from the brief: median ratio within 1% in fp32 on CPU; the tails are checked too.
    assert abs(report["ratio_median"] - 1) < 0.01, report
    assert report["max_abs_diff"] < 1e-3, report


def test_modes_prefill_follows_and_is_reported(engine: Any, hf_model: Any) -> None:
    tok = engine.tokenizer
    prompt = chat_prompt(tok, "solve 12 + 7")
    requests = [GenerationRequest(f"m-{m}", prompt, mode=m) for m in ("auto", "long", "short")]
    groups = engine.generate(requests, GREEDY)
    for request, (completion,) in zip(requests, groups, strict=True):
        expected = tok.encode(PREFILLS[request.mode], add_special_tokens=False)
        assert completion.prefill_token_ids == expected
        assert completion.mode == request.mode
        assert len(completion.token_ids) == len(completion.logprobs) > 0
        # The completion continues prompt + prefill: each greedy token is the transformers argmax
        # after exactly that context (teacher-forced on the engine's tokens).
        hf_lp = hf_token_logprobs(hf_model, prompt, [completion])[0]
        context = torch.tensor([prompt + completion.prefill_token_ids + completion.token_ids])
        logits = hf_model(input_ids=context, use_cache=False).logits[0]
        start = len(prompt) + len(completion.prefill_token_ids) - 1
        argmax = logits[start : start + len(completion.token_ids)].argmax(-1).tolist()
        assert argmax == completion.token_ids, request.mode
        np.testing.assert_allclose(completion.logprobs, hf_lp, atol=1e-4)
    assert groups[1][0].prefill_token_ids[0] == tok.convert_tokens_to_ids("<think>")
    assert tok.convert_tokens_to_ids("</think>") in groups[2][0].prefill_token_ids
    # The prefill changes what the model says next.
    assert len({tuple(g[0].token_ids) for g in groups}) > 1


def test_n_samples_and_seed_reproducibility(engine: Any) -> None:
    tok = engine.tokenizer
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=1234)
    req = GenerationRequest("seeded", chat_prompt(tok, "tell me a story"), n=4)
    other = GenerationRequest("other", chat_prompt(tok, "another prompt"), n=2, mode="long")

    first = engine.generate([req], sampling)
    assert len(first) == 1 and len(first[0]) == 4
    assert len({tuple(c.token_ids) for c in first[0]}) > 1, "the n samples should differ"
    again = engine.generate([req], sampling)
    assert tokens_and_logprobs(again) == tokens_and_logprobs(first)
    # Seeds derive from (seed, request_id): batch composition does not change a request's samples.
    batched = engine.generate([other, req], sampling)
    assert tokens_and_logprobs([batched[1]]) == tokens_and_logprobs(first)
    reseeded = engine.generate([req], SamplingConfig(temperature=1.0, max_new_tokens=16, seed=99))
    assert tokens_and_logprobs(reseeded) != tokens_and_logprobs(first)


def test_seeded_sampling_survives_chunked_prefill(engine: Any) -> None:
    """Issue #18 defect 0: a batch whose prefills exceed the scheduler's token budget.

    The last request straddles the budget, so its first step is a partial prefill whose sampled
    token vLLM discards and whose generator it rewinds; on CPU that rewind raised "CPU Generator
    does not use offset". Its samples must equal those it gets alone (the discarded draw left no
    trace in its random stream), and the whole batch must be reproducible.
    """
    tok = engine.tokenizer
    budget = engine.max_num_batched_tokens
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=5)

    def prompt(i: int, reps: int = 95) -> list[int]:
        return chat_prompt(tok, f"chunk {i} " + "ka ri to mu " * reps)

    length = len(prompt(0))
    assert 300 < length < engine.max_model_len - 8
    fillers = budget // length
    checked = GenerationRequest("straddles", prompt(999), n=2)
    # The checked request starts inside the budget and ends beyond it: a partial prefill.
    assert fillers * length < budget < fillers * length + len(checked.prompt_token_ids)
    batch = [GenerationRequest(f"fill-{i}", prompt(i)) for i in range(fillers)] + [checked]
    first = engine.generate(batch, sampling)
    assert len(first) == fillers + 1 and all(c.token_ids for g in first for c in g)
    again = engine.generate(batch, sampling)
    assert [c.token_ids for g in again for c in g] == [c.token_ids for g in first for c in g]
    (alone,) = engine.generate([checked], sampling)
    assert [c.token_ids for c in alone] == [c.token_ids for c in first[-1]]
    for a, b in zip(alone, first[-1], strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_stop_token_is_kept_and_reported(engine: Any) -> None:
    prompt = chat_prompt(engine.tokenizer, "stop early")
    (greedy,) = engine.generate([GenerationRequest("s", prompt)], GREEDY)[0]
    stop = greedy.token_ids[2]
    expected_len = greedy.token_ids.index(stop) + 1
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=12, stop_token_ids=(stop,))
    (stopped,) = engine.generate([GenerationRequest("s", prompt)], sampling)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == greedy.token_ids[:expected_len]
    assert len(stopped.logprobs) == expected_len
    assert greedy.finish_reason == "length"


def _probe_requests(engine: Any, seed_image: int = 0) -> list[GenerationRequest]:
    tok = engine.tokenizer
    return [
        GenerationRequest("probe-text", chat_prompt(tok, "weights probe"), mode="long"),
        GenerationRequest(
            "probe-image",
            chat_prompt(tok, "describe", num_images=1),
            images=[noise_image(seed_image)],
        ),
    ]


def test_weight_update_changes_outputs_and_round_trip_restores_them(
    engine: Any, hf_model: Any, tiny_vl_dir: Path
) -> None:
    from safetensors.torch import load_file

    requests = _probe_requests(engine)
    before = tokens_and_logprobs(engine.generate(requests, GREEDY))

    # New weights in transformers' in-memory names (model.language_model.*, model.visual.*),
    # streamed lazily: a trainer exporting HF weights produces exactly this.
    state = hf_model.state_dict()
    generator = torch.Generator().manual_seed(0)
    perturbed = (
        (name, t + 0.05 * torch.randn(t.shape, generator=generator)) for name, t in state.items()
    )
    v1 = engine.policy_version + 1
    update = engine.update_weights(perturbed, version=v1)
    assert engine.policy_version == update.version == v1
    assert update.num_tensors == len(state)
    assert update.num_bytes == sum(t.numel() * t.element_size() for t in state.values())
    assert update.num_buckets > 1 and update.seconds > 0
    after = engine.generate(requests, GREEDY)
    assert all(c.policy_version == v1 for g in after for c in g)
    assert tokens_and_logprobs(after) != before
    # The image request must change too: the vision tower was updated and its cache reset.
    assert tokens_and_logprobs([after[1]]) != before[1:]

    # Back to the original, this time in checkpoint names (visual.*, model.layers.*).
    restored = load_file(str(tiny_vl_dir / "model.safetensors"))
    engine.update_weights(iter(restored.items()), version=v1 + 1)
    assert tokens_and_logprobs(engine.generate(requests, GREEDY)) == before


def test_incomplete_update_is_refused_until_a_complete_one(engine: Any, tiny_vl_dir: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(tiny_vl_dir / "model.safetensors"))
    requests = _probe_requests(engine)
    before = tokens_and_logprobs(engine.generate(requests, GREEDY))
    version = engine.policy_version
    half = list(weights.items())[: len(weights) // 2]
    with pytest.raises(WeightUpdateError, match="without a tensor"):
        engine.update_weights(iter(half), version=version + 1)
    assert engine.policy_version == version  # not advanced
    with pytest.raises(WeightUpdateError, match="refusing to generate"):
        engine.generate(requests, GREEDY)

    def producer_dies() -> Iterator[tuple[str, torch.Tensor]]:
        yield from list(weights.items())[:10]
        raise RuntimeError("trainer died mid-stream")

    with pytest.raises(WeightUpdateError, match="trainer died mid-stream"):
        engine.update_weights(producer_dies(), version=version + 1)
    with pytest.raises(WeightUpdateError, match="refusing to generate"):
        engine.generate(requests, GREEDY)
    engine.update_weights(iter(weights.items()), version=version + 2)
    assert tokens_and_logprobs(engine.generate(requests, GREEDY)) == before


def test_policy_version_refusal(engine: Any) -> None:
    request = GenerationRequest("v", chat_prompt(engine.tokenizer, "version"))
    current = engine.policy_version
    try:
        engine.require_version(current + 1)
        with pytest.raises(StaleWeightsError, match=f"holds policy version {current}"):
            engine.generate([request], GREEDY)
        engine.require_version(current)
        assert engine.generate([request], GREEDY)[0][0].policy_version == current
    finally:
        engine.require_version(None)
    with pytest.raises(ValueError, match="must be greater"):
        engine.update_weights(iter([]), version=current)


def test_logprob_parity_text(engine: Any, hf_model: Any) -> None:
    tok = engine.tokenizer
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=24, seed=7)
    requests = [
        GenerationRequest(f"t{i}-{mode}", chat_prompt(tok, text), mode=mode, n=3)
        for i, text in enumerate(["what is 3 * 4?", "name a colour"])
        for mode in ("auto", "long", "short")
    ]
    groups = engine.generate(requests, sampling)
    engine_lp, trainer_lp = [], []
    for request, group in zip(requests, groups, strict=True):
        engine_lp += [c.logprobs for c in group]
        trainer_lp += hf_token_logprobs(hf_model, request.prompt_token_ids, group)
    check_parity(engine_lp, trainer_lp, "text")


def test_logprob_parity_image(engine: Any, hf_model: Any, tiny_vl_dir: Path) -> None:
    tok = engine.tokenizer
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=24, seed=11)
    two = preprocess_images(str(tiny_vl_dir), [noise_image(1), noise_image(2, (84, 112))])
    requests = [
        # Preprocessed pixels, one image, thinking forced.
        GenerationRequest(
            "i-pre",
            chat_prompt(tok, "what is shown?", 1),
            images=preprocess_images(str(tiny_vl_dir), [noise_image(3)]),
            mode="long",
            n=3,
        ),
        # Two images of different shapes in one prompt.
        GenerationRequest("i-two", chat_prompt(tok, "compare", 2), images=two, n=3),
        # PIL input, preprocessed inside the engine.
        GenerationRequest(
            "i-pil", chat_prompt(tok, "caption", 1), images=[noise_image(4)], mode="short", n=3
        ),
    ]
    groups = engine.generate(requests, sampling)
    engine_lp, trainer_lp = [], []
    for request, group in zip(requests, groups, strict=True):
        images = request.images
        if images is not None and not isinstance(images, PreprocessedImages):
            images = preprocess_images(str(tiny_vl_dir), list(images))
        engine_lp += [c.logprobs for c in group]
        trainer_lp += hf_token_logprobs(hf_model, request.prompt_token_ids, group, images)
    check_parity(engine_lp, trainer_lp, "image")


def test_logprob_parity_vs_megatron_trainer(engine: Any, tiny_vl_dir: Path) -> None:
    """vLLM vs the megatron trainer, as in an RL step: the engine gets its weights from a live
    megatron model (``iter_hf_weights``, the RL weight sync), samples text and image prompts,
    and megatron rescores the sampled tokens through ``pack_sequences`` -> ``compute_logprobs``.
    """
    from safetensors.torch import load_file

    from megatron_autothink.compat import cpu as cpu_compat
    from megatron_autothink.rl.rollout import cut_at_vision_tokens
    from megatron_autothink.rollout.types import vision_token_ids
    from megatron_autothink.weights.gather import iter_hf_weights

    tok = engine.tokenizer
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    probe = _probe_requests(engine)
    before = tokens_and_logprobs(engine.generate(probe, GREEDY))
    patched_before = cpu_compat.cpu_mode_active()
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=32, seed=23)
    one = preprocess_images(str(tiny_vl_dir), [noise_image(30)])
    kinds = {
        "text": [
            GenerationRequest(f"mt{i}-{mode}", chat_prompt(tok, text), mode=mode, n=3)
            for i, text in enumerate(["what is 3 * 4?", "name a colour"])
            for mode in ("auto", "long", "short")
        ],
        "image": [
            GenerationRequest(f"mi-one-{m}", chat_prompt(tok, "what?", 1), one, mode=m, n=3)
            for m in ("auto", "long", "short")
        ]
        + [
            GenerationRequest(
                "mi-two",
                chat_prompt(tok, "compare", 2),
                preprocess_images(str(tiny_vl_dir), [noise_image(31), noise_image(32, (84, 112))]),
                n=3,
            ),
            # The trainer's prompt format: pads already expanded to the image's token count.
            GenerationRequest(
                "mi-expanded",
                expand_image_pads(chat_prompt(tok, "caption", 1), pad, one.num_tokens()),
                one,
                n=3,
            ),
        ],
    }
    try:
        with megatron_model_from_hf(tiny_vl_dir) as (chunks, cfg, ctx):
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():  # new weights: the engine can only match them through the sync
                for p in (p for c in chunks for p in c.parameters()):
                    p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p.device))
            stream = iter_hf_weights(chunks, cfg.model, ctx, names="checkpoint")
            engine.update_weights(stream, version=engine.policy_version + 1)
            assert tokens_and_logprobs(engine.generate(probe, GREEDY)) != before
            for what, requests in kinds.items():
                groups = engine.generate(requests, sampling)
                for completion in (c for g in groups for c in g):  # as the RL trainer does
                    cut_at_vision_tokens(completion, vision_token_ids(tok))
                trainer_lp = megatron_token_logprobs(
                    chunks,
                    ctx,
                    requests,
                    groups,
                    image_token_id=pad,
                    pad_id=tok.pad_token_id,
                    seq_length=engine.max_model_len,
                )
                check_parity([c.logprobs for g in groups for c in g], trainer_lp, f"mcore {what}")
    finally:
        # Other tests share the engine (and the process): original weights, no CPU patches.
        restored = load_file(str(tiny_vl_dir / "model.safetensors"))
        engine.update_weights(iter(restored.items()), version=engine.policy_version + 1)
        if not patched_before:
            cpu_compat.deactivate()
    assert tokens_and_logprobs(engine.generate(probe, GREEDY)) == before


def test_image_changes_output_and_input_forms_agree(engine: Any, tiny_vl_dir: Path) -> None:
    tok = engine.tokenizer
    prompt = chat_prompt(tok, "what is in the picture?", 1)
    pre_a = preprocess_images(str(tiny_vl_dir), [noise_image(10)])
    pre_b = preprocess_images(str(tiny_vl_dir), [noise_image(20)])
    expanded = expand_image_pads(
        prompt, tok.convert_tokens_to_ids("<|image_pad|>"), pre_a.num_tokens()
    )
    requests = [
        GenerationRequest("a-pre", prompt, images=pre_a),
        GenerationRequest("b-pre", prompt, images=pre_b),
        GenerationRequest("a-pil", prompt, images=[noise_image(10)]),
        GenerationRequest("a-expanded", expanded, images=pre_a),  # trainer-format prompt
    ]
    a_pre, b_pre, a_pil, a_expanded = tokens_and_logprobs(engine.generate(requests, GREEDY))
    assert a_pre != b_pre, "a different image must change the output"
    assert a_pil == a_pre, "PIL input must equal its preprocessed form"
    assert a_expanded == a_pre, "an already expanded pad run must equal a single pad"


def test_request_errors_are_clear_and_leave_the_engine_usable(engine: Any) -> None:
    tok = engine.tokenizer
    long_prompt = chat_prompt(tok, "word " * 300)
    too_long = SamplingConfig(temperature=0.0, max_new_tokens=engine.max_model_len)
    t0 = time.perf_counter()
    with pytest.raises(RequestTooLongError, match="max_model_len is 512"):
        engine.generate(
            [GenerationRequest("ok", [1, 2, 3]), GenerationRequest("x", long_prompt)], too_long
        )
    with pytest.raises(RequestTooLongError, match="image"):
        big = [noise_image(5, (112, 112))] * 4
        engine.generate(
            [GenerationRequest("img", chat_prompt(tok, "x", 4), images=big)],
            SamplingConfig(max_new_tokens=engine.max_model_len - 40),
        )
    with pytest.raises(ValueError, match="placeholder"):
        engine.generate(
            [GenerationRequest("m", chat_prompt(tok, "x", 2), images=[noise_image(0)])], GREEDY
        )
    with pytest.raises(ValueError, match="no images"):
        engine.generate([GenerationRequest("m", chat_prompt(tok, "x", 1))], GREEDY)
    assert time.perf_counter() - t0 < 10
    assert engine.generate([GenerationRequest("fine", chat_prompt(tok, "x"))], GREEDY)[0][
        0
    ].token_ids


def test_sleep_is_a_tracked_noop_on_cpu(engine: Any) -> None:
    request = GenerationRequest("z", chat_prompt(engine.tokenizer, "sleepy"))
    before = engine.generate([request], GREEDY)
    engine.sleep()
    try:
        with pytest.raises(RolloutError, match="asleep"):
            engine.generate([request], GREEDY)
    finally:
        engine.wake_up()
    assert tokens_and_logprobs(engine.generate([request], GREEDY)) == tokens_and_logprobs(before)
    # Woken part by part (a colocated sync): weights alone allow a weight update, not generation.
    engine.sleep()
    try:
        with pytest.raises(RolloutError, match="before update_weights"):
            engine.update_weights(iter([]), version=engine.policy_version + 1)
        engine.wake_up(["weights"])
        with pytest.raises(RolloutError, match=r"asleep \(kv_cache\)"):
            engine.generate([request], GREEDY)
        with pytest.raises(ValueError, match="unknown memory part"):
            engine.wake_up(["activations"])
    finally:
        engine.wake_up(["kv_cache"])
    assert tokens_and_logprobs(engine.generate([request], GREEDY)) == tokens_and_logprobs(before)


@pytest.mark.parametrize("problem", ["missing", "no_config", "bad_json", "bad_model_type"])
def test_bad_model_dir_fails_fast(tmp_path: Path, tiny_vl_dir: Path, problem: str) -> None:
    from megatron_autothink.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

    model_dir = tmp_path / "model"
    if problem != "missing":
        model_dir.mkdir()
        for f in tiny_vl_dir.iterdir():
            (model_dir / f.name).symlink_to(f)
        (model_dir / "config.json").unlink()
        if problem == "bad_json":
            (model_dir / "config.json").write_text("{not json")
        elif problem == "bad_model_type":
            (model_dir / "config.json").write_text('{"model_type": "no_such_model"}')
    t0 = time.perf_counter()
    with pytest.raises(EngineStartError) as info:
        VLLMRolloutEngine(VLLMEngineConfig(model_dir=str(model_dir), start_timeout_s=60))
    elapsed = time.perf_counter() - t0
    print(f"\n[{problem}] {elapsed:.2f} s: {str(info.value)[:160]}")
    assert str(model_dir) in str(info.value)
    assert elapsed < 30
