"""Shared fixtures: ONE tiny random Qwen2.5-VL checkpoint and ONE vLLM engine per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.rollout.harness import build_tiny_qwen2_5_vl

# Peaky next-token distributions (entropy ~2.8 nats instead of ~ln V): parity and "outputs
# changed" checks are meaningless on a near-uniform random model.
INIT_RANGE = 0.3


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Tied embeddings as in our recipes: a tied head is packed separately on CPU and once
    # missed weight updates (vllm_worker._repack_tied_heads).
    return build_tiny_qwen2_5_vl(
        tmp_path_factory.mktemp("tiny_qwen2_5_vl"),
        initializer_range=INIT_RANGE,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="session")
def hf_model(tiny_vl_dir: Path) -> Any:
    """The "trainer side": transformers' fp32 forward on the same weights."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_vl_dir, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def engine(tiny_vl_dir: Path) -> Iterator[Any]:
    pytest.importorskip("vllm")
    from megatron_autothink.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

    config = VLLMEngineConfig(
        model_dir=str(tiny_vl_dir),
        dtype="float32",
        max_model_len=512,
        max_num_seqs=64,
        weight_bucket_mb=1,  # the 4.4 MB model travels in several buckets, splitting layers
        start_timeout_s=300,
        # One torch thread: CI boxes have 2 shared cores, and OpenMP threads waiting for each
        # other at every op made generation ~6x slower there.
        cpu_threads=1,
    )
    with VLLMRolloutEngine(config) as eng:
        yield eng
