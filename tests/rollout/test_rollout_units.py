"""Fast unit tests of the rollout package that need no vLLM engine."""

from __future__ import annotations

import doctest
from collections.abc import Iterable, Iterator, Sequence

import pytest
import torch

from megatron_autothink.rollout import (
    Completion,
    GenerationRequest,
    PreprocessedImages,
    RolloutEngine,
    SamplingConfig,
    StaleWeightsError,
    WeightUpdate,
    iter_weight_buckets,
    logprob_parity,
)
from megatron_autothink.rollout import engine as engine_module
from megatron_autothink.rollout import images as images_module
from megatron_autothink.rollout import parity as parity_module
from megatron_autothink.rollout import vllm_engine as vllm_engine_module
from megatron_autothink.rollout.images import collapse_image_pads, expand_image_pads
from megatron_autothink.rollout.vllm_engine import request_seed


@pytest.mark.parametrize(
    "module", [engine_module, images_module, parity_module, vllm_engine_module]
)
def test_doctests(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0


def test_buckets_are_bounded_lazy_and_complete() -> None:
    pulled: list[str] = []

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for i, numel in enumerate([100, 100, 300, 50, 50, 50]):
            pulled.append(f"w{i}")
            yield f"w{i}", torch.zeros(numel)  # 4 bytes per element

    buckets = iter_weight_buckets(stream(), bucket_bytes=800)
    first = next(buckets)
    assert [n for n, _ in first] == ["w0", "w1"]
    assert pulled == ["w0", "w1", "w2"], "only one tensor beyond the bucket may be pulled"
    rest = list(buckets)
    assert [[n for n, _ in b] for b in rest] == [["w2"], ["w3", "w4", "w5"]]
    # A tensor bigger than the bucket travels alone.
    big = list(iter_weight_buckets([("a", torch.zeros(10)), ("b", torch.zeros(1000))], 16))
    assert [[n for n, _ in b] for b in big] == [["a"], ["b"]]
    with pytest.raises(ValueError):
        list(iter_weight_buckets([], 0))


def test_logprob_parity_figures() -> None:
    engine = [[-1.0, -2.0], [-0.5]]
    trainer = [[-1.0, -2.1], [-0.4]]
    report = logprob_parity(engine, trainer)
    assert report["num_tokens"] == 3
    assert report["max_abs_diff"] == pytest.approx(0.1)
    assert report["mean_abs_diff"] == pytest.approx(0.2 / 3)
    assert report["ratio_median"] == pytest.approx(1.0)
    assert report["ratio_max"] == pytest.approx(torch.tensor(0.1).exp().item())
    assert report["ratio_min"] == pytest.approx(torch.tensor(-0.1).exp().item())
    assert report["ratio_p90"] <= report["ratio_p99"] <= report["ratio_max"]
    assert report["ratio_min"] <= report["ratio_p1"] <= report["ratio_p10"] <= 1.0
    with pytest.raises(ValueError, match="sequence 0"):
        logprob_parity([[-1.0]], [[-1.0, -2.0]])
    with pytest.raises(ValueError):
        logprob_parity([[-1.0]], [])
    with pytest.raises(ValueError, match="no tokens"):
        logprob_parity([[]], [[]])


def test_image_pad_collapse_and_expand_round_trip() -> None:
    pad = 7
    expanded = [1, 3, pad, pad, pad, 4, 2, 3, pad, 4]
    collapsed, runs = collapse_image_pads(expanded, pad)
    assert collapsed == [1, 3, pad, 4, 2, 3, pad, 4] and runs == 2
    assert expand_image_pads(collapsed, pad, [3, 1]) == expanded
    assert expand_image_pads(expanded, pad, [3, 1]) == expanded
    with pytest.raises(ValueError, match="2 image pad runs but 1 images"):
        expand_image_pads(expanded, pad, [3])


def test_request_seed_is_stable_distinct_and_in_range() -> None:
    seeds = {request_seed(0, f"r{i}") for i in range(1000)}
    assert len(seeds) == 1000
    assert all(0 <= s < 2**31 - 2**20 for s in seeds)
    assert request_seed(1, "r0") != request_seed(0, "r0") == request_seed(0, "r0")


def test_type_validation() -> None:
    with pytest.raises(ValueError, match="mode"):
        GenerationRequest("x", [1], mode="medium")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        GenerationRequest("x", [1], n=0)
    with pytest.raises(ValueError, match="empty prompt"):
        GenerationRequest("x", [])
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    grid = torch.tensor([[1, 4, 4], [1, 2, 6]])
    images = PreprocessedImages(torch.zeros(28, 1176), grid)
    assert images.num_images == 2 and images.num_tokens() == [4, 3]
    with pytest.raises(ValueError, match="describes 28 patches"):
        PreprocessedImages(torch.zeros(27, 1176), grid)
    with pytest.raises(ValueError, match=r"\[M, 3\]"):
        PreprocessedImages(torch.zeros(16, 1176), torch.tensor([1, 4, 4]))
    update = WeightUpdate(
        version=1, num_tensors=2, num_bytes=2_000_000_000, num_buckets=1, seconds=2
    )
    assert update.gbytes_per_second == pytest.approx(1.0)


class _FakeEngine(RolloutEngine):
    """Minimal backend: echoes the prompt; used to test the shared ABC behaviour."""

    def __init__(self) -> None:
        super().__init__(initial_version=3)
        self.closed = 0

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingConfig
    ) -> list[list[Completion]]:
        self._check_can_generate()
        return [
            [Completion(r.prompt_token_ids, [0.0] * len(r.prompt_token_ids), "", "length")]
            for r in requests
        ]

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> WeightUpdate:
        self._check_new_version(version)
        n = sum(1 for _ in named_tensors)
        self._set_version(version)
        return WeightUpdate(version, n, 0, 1, 0.0)

    def sleep(self) -> None:
        pass

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        pass

    def shutdown(self) -> None:
        self.closed += 1


def test_engine_abc_versions_and_context_manager() -> None:
    request = [GenerationRequest("r", [1, 2])]
    with _FakeEngine() as engine:
        assert isinstance(engine, _FakeEngine) and engine.policy_version == 3
        engine.require_version(4)
        with pytest.raises(StaleWeightsError, match="holds policy version 3 but the trainer"):
            engine.generate(request, SamplingConfig())
        with pytest.raises(ValueError, match="greater"):
            engine.update_weights([], version=3)
        engine.update_weights([("w", torch.zeros(1))], version=4)
        assert engine.generate(request, SamplingConfig())[0][0].token_ids == [1, 2]
        engine.require_version(None)
        engine._invalidate_weights("test")
        with pytest.raises(RuntimeError, match="refusing to generate: test"):
            engine.generate(request, SamplingConfig())
        engine.update_weights([], version=5)
        assert engine.generate(request, SamplingConfig())
    assert engine.closed == 1


def test_engine_process_gpu_follows_visible_devices() -> None:
    from megatron_autothink.rollout.engine import EngineStartError
    from megatron_autothink.rollout.vllm_engine import child_visible_devices

    assert child_visible_devices(0, "") == "0"
    assert child_visible_devices(3, " 2, 7 ,1,0") == "0"
    with pytest.raises(EngineStartError, match="not among CUDA_VISIBLE_DEVICES"):
        child_visible_devices(2, "4,5")


def test_colocated_sync_wakes_weights_then_frees_trainer_memory_then_kv_cache() -> None:
    """Issue #18 defect 10 (call order only: CPU has no sleep mode; GPU memory unverified)."""
    from megatron_autothink.rollout import colocated_weight_sync
    from tests.rollout.harness import ScriptedEngine

    engine = ScriptedEngine({})
    engine.sleep()
    update = colocated_weight_sync(
        engine,
        [("w", torch.zeros(2))],
        version=1,
        release_trainer_memory=lambda: engine.events.append("trainer frees its caches"),
    )
    assert engine.events == [
        "sleep",
        "wake_up:weights",
        "update_weights",
        "trainer frees its caches",
        "wake_up:kv_cache",
    ]
    assert update.version == engine.policy_version == 1 and update.num_tensors == 1
