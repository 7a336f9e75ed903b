"""Seeded sampling for every batch shape on vLLM's CPU runner (issue #18, defect 0).

**The failure.** Every request of ours carries its own seed
(:func:`~megatron_autothink.rollout.vllm_engine.request_seed`), so vLLM gives it its own
``torch.Generator``. When a step only *partially* prefills a request (its prompt did not fit in
the scheduler's token budget, or the encoder budget cut it before an image, or a preempted
request is resumed in chunks), the runner still samples a token for it and throws that token
away. To keep the request's random stream independent of how its prefill was chunked, vLLM then
rewinds the generator: ``gen.set_offset(gen.get_offset() - 4)`` in
``GPUModelRunner._bookkeeping_sync``. That is a Philox (CUDA) operation; the CPU generator
(Mersenne Twister) has no offset and raises ``RuntimeError: CPU Generator does not use offset``,
killing the whole generate call. A BPO step of 8 prompts x 8 samples x 300 prompt tokens is
already ~19k prefill tokens against the CPU default budget of 4096.

**The fix, and why this one.** Around the sampler, for exactly the requests whose token will be
discarded, we save the generator's full state (``get_state``) and put it back instead of the
offset rewind (``set_state``). That is the same semantics as vLLM's rewind, the discarded draw
never happened, so a request's samples stay identical whatever else shares its batch (tested:
``tests/rollout/test_vllm_engine.py::test_seeded_sampling_survives_chunked_prefill``). Options
rejected:

* raising ``max_num_batched_tokens`` to ``max_model_len * max_num_seqs`` or disabling chunked
  prefill: vLLM's start-up profiling runs a dummy batch of the full budget (gigabytes of
  activations at 16k x 256), and neither covers the other two causes above (encoder-budget cuts
  of image prompts, chunked resumption after preemption);
* submitting in waves that fit the budget: same gaps, slower, and the waves' boundaries would
  depend on prompt lengths;
* dropping per-request seeds: rollouts must be reproducible from ``(seed, request_id)``.

**Scope.** Installed on CPU only (:func:`install`, called where vLLM imports our worker
extension, so in-process and spawned workers both get it). On GPU nothing is patched: CUDA
generators support the offset rewind. The wrapped methods are vLLM internals
(``_sample``, ``_bookkeeping_sync``, ``discard_request_mask``, ``input_batch.generators``,
vLLM 0.32); :func:`install` refuses to patch, with a warning, when any of them is missing, and
the test above then fails instead of the rollouts silently losing reproducibility.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

_FLAG = "_autothink_cpu_seed_rewind"


def saved_generator_states(runner: Any) -> dict[int, tuple[torch.Generator, torch.Tensor]]:
    """States of the CPU generators of the requests whose sampled token this step discards.

    ``runner.discard_request_mask`` is filled while the step's inputs are prepared, before the
    sampler runs, so it already says which requests are only partially prefilled.
    """
    batch = runner.input_batch
    discard = getattr(runner, "discard_request_mask", None)
    if discard is None:
        return {}
    mask = discard.np[: batch.num_reqs]
    states = {}
    for i in np.nonzero(mask)[0]:
        gen = batch.generators.get(int(i))
        if gen is not None and gen.device.type == "cpu":
            states[int(i)] = (gen, gen.get_state())
    return states


def install() -> bool:
    """Patch vLLM's CPU model runner (idempotent); False when its internals do not match."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if getattr(CPUModelRunner, _FLAG, False):
        return True
    if not all(hasattr(CPUModelRunner, m) for m in ("_sample", "_bookkeeping_sync")):
        logger.warning(
            "vLLM's CPU model runner has no _sample/_bookkeeping_sync: seeded sampling of "
            "partially prefilled requests is not patched and may raise 'CPU Generator does not "
            "use offset' (megatron_autothink.rollout.vllm_cpu_seeds)"
        )
        return False
    original_sample = CPUModelRunner._sample
    original_bookkeeping = CPUModelRunner._bookkeeping_sync

    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._autothink_saved_states = saved_generator_states(self)
        return original_sample(self, *args, **kwargs)

    def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        saved: dict[int, tuple[torch.Generator, torch.Tensor]]
        saved = getattr(self, "_autothink_saved_states", {})
        self._autothink_saved_states = {}  # one step's states serve that step only
        generators = self.input_batch.generators
        hidden = {}
        for i, (gen, state) in saved.items():
            if generators.get(i) is not gen:  # the batch changed since the sampler ran
                continue
            gen.set_state(state)  # the discarded draw never happened
            hidden[i] = generators.pop(i)  # so vLLM's offset rewind does not see it
        try:
            return original_bookkeeping(self, *args, **kwargs)
        finally:
            generators.update(hidden)

    CPUModelRunner._sample = _sample  # type: ignore[method-assign]
    CPUModelRunner._bookkeeping_sync = _bookkeeping_sync  # type: ignore[method-assign]
    setattr(CPUModelRunner, _FLAG, True)
    return True
