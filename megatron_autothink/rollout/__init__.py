"""Rollout side of megatron-autothink: one engine interface, implemented on vLLM.

Import cost: this package does not import vLLM; :class:`VLLMRolloutEngine` imports it when an
engine is constructed.
"""

from megatron_autothink.rollout.engine import (
    EngineStartError,
    RequestTooLongError,
    RolloutEngine,
    RolloutError,
    StaleWeightsError,
    WeightUpdateError,
    colocated_weight_sync,
    iter_weight_buckets,
)
from megatron_autothink.rollout.parity import format_parity, logprob_parity
from megatron_autothink.rollout.types import (
    Completion,
    GenerationRequest,
    PreprocessedImages,
    SamplingConfig,
    WeightUpdate,
)
from megatron_autothink.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

__all__ = [
    "Completion",
    "EngineStartError",
    "GenerationRequest",
    "PreprocessedImages",
    "RequestTooLongError",
    "RolloutEngine",
    "RolloutError",
    "SamplingConfig",
    "StaleWeightsError",
    "VLLMEngineConfig",
    "VLLMRolloutEngine",
    "WeightUpdate",
    "WeightUpdateError",
    "colocated_weight_sync",
    "format_parity",
    "iter_weight_buckets",
    "logprob_parity",
]
