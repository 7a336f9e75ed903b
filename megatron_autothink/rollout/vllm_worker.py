"""vLLM worker extension: streamed, bucketed in-place weight updates.

vLLM mixes :class:`WeightSyncWorkerExtension` into its worker class (``worker_extension_cls``);
the engine drives it with ``LLM.collective_rpc("autothink_...")``.

Why not ``model.load_weights`` directly: on CPU (and with quantisation on GPU) vLLM repacks
weights after loading, so the live parameters are no longer in checkpoint layout and a plain
``load_weights`` fails or writes garbage. vLLM's own ``Worker.reload_weights(weights_iterator=...,
is_checkpoint_format=True)`` handles this with *layerwise reloading*: every layer is put back in
checkpoint layout on the meta device, incoming tensors are buffered per layer and, as soon as a
layer has all its tensors, it is materialised, loaded, post-processed (repacked) and copied into
the original storage. ``reload_weights`` does that for one iterator inside one call; we split the
very same three steps (``initialize_layerwise_reload`` -> ``model.load_weights`` per bucket ->
``finalize_layerwise_reload``) across RPCs so that the trainer can stream buckets, also across
processes where an iterator cannot be passed. Memory: one bucket plus the layers still waiting for
tensors (one layer when tensors arrive in layer order).

Transport of a bucket: in-process engines receive the tensors themselves (no copy); multiprocess
engines receive safetensors bytes (tensors cannot be pickled through vLLM's RPC).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from megatron_autothink.rollout import vllm_cpu_seeds, vllm_qwen2_5_vl

if TYPE_CHECKING:
    from torch import nn

# vLLM imports the worker extension in every worker process before it builds the model, so
# registering here makes our Qwen2.5-VL architecture known in spawned workers too.
vllm_qwen2_5_vl.register()
# Same place, same reason: seeded sampling of partially prefilled requests on CPU.
vllm_cpu_seeds.install()

WorkerPayload = list[tuple[str, torch.Tensor]] | bytes
"""A bucket as the worker receives it: tensors (in-process) or safetensors bytes."""


def encode_bucket(bucket: list[tuple[str, torch.Tensor]]) -> bytes:
    """Serialise a bucket for a multiprocess engine (safetensors, CPU, contiguous)."""
    from safetensors.torch import save

    return save({name: t.detach().to("cpu").contiguous() for name, t in bucket})


def decode_bucket(payload: WorkerPayload) -> list[tuple[str, torch.Tensor]]:
    """Inverse of :func:`encode_bucket`; tensors pass through unchanged."""
    if isinstance(payload, bytes | bytearray):
        from safetensors.torch import load

        return list(load(bytes(payload)).items())
    return payload


class WeightSyncWorkerExtension:
    """Methods added to vLLM's worker; ``self`` is the worker (``model_runner``,
    ``vllm_config`` come from it). Names are prefixed to avoid clashes with worker methods."""

    # Set by the worker class vLLM mixes us into.
    model_runner: Any
    vllm_config: Any

    def _autothink_model(self) -> nn.Module:
        return self.model_runner.get_model()

    def autothink_begin_weight_update(self) -> int:
        """Put every layer in layerwise-reload state; returns the number of parameters."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import (
            initialize_layerwise_reload,
        )

        model = self._autothink_model()
        expected = {name for name, _ in model.named_parameters()}
        self._autothink_expected = expected
        self._autothink_loaded: set[str] = set()
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(model)
        return len(expected)

    def autothink_load_weights(self, payload: WorkerPayload) -> int:
        """Load one bucket (HF checkpoint names); returns the number of tensors in it."""
        from vllm.config import set_current_vllm_config

        weights = decode_bucket(payload)
        with set_current_vllm_config(self.vllm_config):
            loaded = self._autothink_model().load_weights(weights)  # type: ignore[operator]
        if loaded is not None:
            self._autothink_loaded.update(loaded)
        return len(weights)

    def autothink_finish_weight_update(self) -> list[str]:
        """Process the layers still pending, drop caches derived from the old weights.

        Returns:
            Parameters that received no tensor during this update (sorted vLLM names); empty
            when the update was complete. Layers that got nothing keep their old weights.
        """
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import (
            finalize_layerwise_reload,
        )

        model = self._autothink_model()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.vllm_config.model_config)
            _repack_tied_heads(model)
        # Encoder outputs (image embeddings) and processed-input caches were computed with the
        # old vision tower; vLLM's reload_weights resets the same ones.
        self.model_runner.reset_encoder_cache()
        self.model_runner.reset_mm_cache()
        missing = sorted(self._autothink_expected - self._autothink_loaded)
        del self._autothink_expected, self._autothink_loaded
        return missing


def _repack_tied_heads(model: nn.Module) -> int:
    """Re-pack output heads whose weight is tied to the input embedding (CPU only).

    On CPU, vLLM packs every GEMM weight for its kernels once after loading; the packed copy
    lives in the layer's ``cpu_linear`` closure, not in a parameter. A tied ``lm_head`` shares
    the embedding's parameter but receives no tensor of its own in a reload (checkpoints have no
    ``lm_head.weight`` when it is tied), so layerwise reloading never re-processes it: the
    embedding lookups would use the new weights and the logits the packed old ones. Packing
    again from the (updated, shared) parameter fixes that; GPUs have no packed copies.

    Returns:
        The number of heads re-packed.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    n = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            isinstance(module, ParallelLMHead)
            and hasattr(module, "cpu_linear")
            and isinstance(weight, torch.Tensor)
            and weight.numel() > 0
        ):
            module.quant_method.process_weights_after_loading(module)
            n += 1
    return n
