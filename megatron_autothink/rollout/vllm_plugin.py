"""vLLM general plugin (entry point ``vllm.general_plugins``, declared in pyproject.toml).

vLLM runs every general plugin in each process it starts. In multiprocess mode the engine core
and its workers are fresh interpreters that never imported this package, so without the plugin
they would not know our torchvision-free Qwen2.5-VL architecture
(:mod:`megatron_autothink.rollout.vllm_qwen2_5_vl`). The import is deferred to the call so that
merely discovering entry points stays cheap.
"""

from __future__ import annotations


def register() -> None:
    """Register our Qwen2.5-VL architecture with vLLM's model registry (idempotent)."""
    from megatron_autothink.rollout import vllm_qwen2_5_vl

    vllm_qwen2_5_vl.register()
