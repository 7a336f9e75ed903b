"""The one rollout interface used by RL training and by evaluation.

:class:`RolloutEngine` is an ABC rather than a Protocol because the policy-version bookkeeping
(``policy_version``, ``require_version``, the stale-weights refusal) and the context-manager
behaviour must be identical for every backend; only generation, weight loading and memory
release are backend specific. The only backend today is
:class:`megatron_autothink.rollout.vllm_engine.VLLMRolloutEngine`.

Typical RL step (colocated trainer and rollout)::

    with VLLMRolloutEngine(VLLMEngineConfig(model_dir)) as engine:
        for step in range(num_steps):
            engine.require_version(step)        # on-policy: refuse stale weights
            groups = engine.generate(requests, sampling)
            engine.sleep()                      # give the GPU memory to the trainer
            ... train ...
            colocated_weight_sync(engine, trainer.export_hf_weights(), step + 1,
                                  release_trainer_memory=torch.cuda.empty_cache)

**Wake-up order of a colocated sync** (issue #18, defect 10): the trainer's parameters,
gradients and optimizer states are still resident when the new weights are pushed, so waking
the whole engine then (weights *and* the KV cache, which takes most of vLLM's memory share) is
where colocated runs run out of memory. :func:`colocated_weight_sync` wakes the weights only,
pushes them, lets the trainer release its cached blocks, and only then wakes the KV cache, the
order verl and OpenRLHF use. CPU has no sleep mode, so only the order of calls is tested; the
GPU memory effect is unverified (no GPU machine with CUDA vLLM).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Self

import torch

from megatron_autothink.rollout.types import (
    Completion,
    GenerationRequest,
    SamplingConfig,
    WeightUpdate,
)

MEMORY_PARTS: tuple[str, ...] = ("weights", "kv_cache")
"""What :meth:`RolloutEngine.sleep` releases and :meth:`RolloutEngine.wake_up` can wake one by
one (vLLM's sleep-mode tags)."""


def check_memory_parts(tags: Sequence[str] | None) -> set[str]:
    """``tags`` as a set, all of :data:`MEMORY_PARTS` for ``None``; unknown tags raise.

    Example:
        >>> sorted(check_memory_parts(None)), check_memory_parts(["weights"])
        (['kv_cache', 'weights'], {'weights'})
    """
    if tags is None:
        return set(MEMORY_PARTS)
    unknown = set(tags) - set(MEMORY_PARTS)
    if unknown:
        raise ValueError(f"unknown memory part(s) {sorted(unknown)}; known: {list(MEMORY_PARTS)}")
    return set(tags)


class RolloutError(RuntimeError):
    """Base class of the errors the rollout engine raises on purpose."""


class EngineStartError(RolloutError):
    """The engine could not be started (bad model directory, unsupported model, timeout...)."""


class StaleWeightsError(RolloutError):
    """Generation was refused because the engine does not hold the policy version required."""


class RequestTooLongError(RolloutError, ValueError):
    """A request's prompt (+ prefill + image tokens) + ``max_new_tokens`` exceeds the context."""


class WeightUpdateError(RolloutError):
    """A weight update failed or was incomplete; the engine refuses to generate until the next
    successful update because its weights may be a mix of two versions."""


def iter_weight_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of named tensors into buckets of at most ``bucket_bytes`` bytes.

    The input is consumed lazily, so the consumer holds at most one bucket of tensors at a time:
    if the producer (e.g. the trainer gathering tensor-parallel shards and renaming them to HF
    names) also yields lazily, the full model is never materialised a second time. A tensor
    larger than the bucket forms a bucket of its own.

    Example:
        >>> ts = [(f"w{i}", torch.zeros(256)) for i in range(5)]  # 1 KiB each (fp32)
        >>> [len(b) for b in iter_weight_buckets(ts, bucket_bytes=2048)]
        [2, 2, 1]

    Args:
        named_tensors: ``(name, tensor)`` pairs in any order (layer order is best: vLLM
            processes a layer as soon as all its tensors arrived).
        bucket_bytes: Maximum bytes per bucket (``> 0``).

    Yields:
        Lists of ``(name, tensor)`` pairs.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


class RolloutEngine(ABC):
    """Generates completions with a policy whose weights the trainer pushes in.

    Subclasses implement :meth:`generate`, :meth:`update_weights`, :meth:`sleep`,
    :meth:`wake_up` and :meth:`shutdown`; they call :meth:`_check_can_generate` at the start of
    ``generate`` and :meth:`_set_version` after a successful weight update.

    Args:
        initial_version: Policy version of the weights the engine starts with (those in the
            model directory).
    """

    def __init__(self, initial_version: int = 0) -> None:
        self._policy_version = initial_version
        self._required_version: int | None = None
        # Why the weights cannot be used (failed/incomplete update, sleep level 2); None if fine.
        self._invalid_weights_reason: str | None = None

    # ----------------------------------------------------------------- versions
    @property
    def policy_version(self) -> int:
        """Version of the weights the engine currently generates with."""
        return self._policy_version

    def require_version(self, version: int | None) -> None:
        """Demand that subsequent generations use policy ``version`` or newer.

        The trainer calls this before an on-policy rollout; ``generate`` then raises
        :class:`StaleWeightsError` instead of silently sampling from an older policy (e.g. when a
        weight push was skipped or failed). ``None`` lifts the requirement (e.g. evaluation of
        whatever is loaded).

        Args:
            version: Minimum policy version, or ``None``.
        """
        self._required_version = version

    def _check_can_generate(self) -> None:
        """Raise if the weights are unusable or older than the version the trainer demanded."""
        if self._invalid_weights_reason is not None:
            raise WeightUpdateError(
                f"refusing to generate: {self._invalid_weights_reason}. Push a complete weight "
                "update before generating."
            )
        required = self._required_version
        if required is not None and self._policy_version < required:
            raise StaleWeightsError(
                f"refusing to generate with stale weights: the engine holds policy version "
                f"{self._policy_version} but the trainer requires version {required}. Call "
                f"update_weights(..., version={required}) first, or require_version(None) to "
                "accept any version."
            )

    def _check_new_version(self, version: int) -> None:
        """Versions only move forward, so an out-of-order push is caught, not applied."""
        if version <= self._policy_version:
            raise ValueError(
                f"weight update version {version} must be greater than the current policy "
                f"version {self._policy_version}"
            )

    def _set_version(self, version: int) -> None:
        self._policy_version = version
        self._invalid_weights_reason = None

    def _invalidate_weights(self, reason: str) -> None:
        """Make ``generate`` refuse to run until the next successful weight update."""
        self._invalid_weights_reason = reason

    # ----------------------------------------------------------------- backend API
    @abstractmethod
    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingConfig
    ) -> list[list[Completion]]:
        """Sample ``request.n`` completions for every request.

        Args:
            requests: Prompts; all are validated (length, images) before any is run.
            sampling: Sampling settings shared by all requests.

        Returns:
            ``result[i][j]`` is the ``j``-th completion of ``requests[i]``.

        Raises:
            StaleWeightsError: The required policy version is not loaded.
            RequestTooLongError: A request does not fit in the model's context.
        """

    @abstractmethod
    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> WeightUpdate:
        """Load new policy weights, streamed in buckets, and reset all derived caches.

        Args:
            named_tensors: ``(hf_name, tensor)`` pairs in Hugging Face checkpoint names,
                consumed lazily (one bucket at a time).
            version: New policy version; must be greater than :attr:`policy_version`.

        Returns:
            What was transferred and how long it took.

        Raises:
            WeightUpdateError: The update failed or did not cover every parameter.
        """

    @abstractmethod
    def sleep(self) -> None:
        """Release accelerator memory (weights offloaded, KV cache dropped) for training."""

    @abstractmethod
    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-acquire the memory released by :meth:`sleep`: all of it (``None``) or only the
        :data:`MEMORY_PARTS` named in ``tags``. ``generate`` needs every part awake,
        ``update_weights`` only ``"weights"``."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine and free its resources; idempotent."""

    # ----------------------------------------------------------------- context manager
    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


def colocated_weight_sync(
    engine: RolloutEngine,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    version: int,
    *,
    release_trainer_memory: Callable[[], None],
) -> WeightUpdate:
    """Push new weights into a sleeping colocated engine, waking its memory in the safe order.

    Weights first (the update needs them), then the push, then ``release_trainer_memory``
    (e.g. ``torch.cuda.empty_cache``: the gathered weight buckets are freed by now), and the KV
    cache last, once that memory has been given back. See the module docstring (the order is
    pinned by ``tests/rollout/test_rollout_units.py``).
    """
    engine.wake_up(["weights"])
    update = engine.update_weights(named_tensors, version=version)
    release_trainer_memory()
    engine.wake_up(["kv_cache"])
    return update
