"""Run the real megatron-core code paths on a machine without CUDA.

megatron-core (0.16 - 0.19) assumes a GPU in a handful of places that have nothing to do with the
maths: buffers allocated on ``torch.cuda.current_device()``, the CUDA RNG tracker that forks the
model-parallel random state, ``device="cuda"`` token counters in the pipeline schedules and a
tensor-type assert in the distributed optimizer. Everything else (tensor/pipeline parallel layers,
gloo collectives, DDP buckets, the distributed optimizer, dist-checkpointing) is device-agnostic.

This module patches exactly those places, and only when CUDA is absent: :func:`activate` is a no-op
on a GPU machine, so the GPU path is never touched. Each patch is a :class:`Patch` with the
megatron-core call it covers; ``tests/compat/test_cpu.py`` disables them one at a time and checks
that the covered call then fails, so a patch that stops being needed is noticed.

Patches (see ``PATCHES``):

``current_device``
    ``torch.cuda.current_device()`` -> ``torch.device("cpu")``. Covers buffer allocation in
    ``tensor_parallel.layers`` / ``mappings`` (TP all-gather outputs), rotary ``inv_freq``
    (``RotaryEmbedding.__init__``), DDP grad buffers (``param_and_grad_buffer``) and the
    distributed optimizer's shard buffers.
``cuda_rng``
    ``torch.cuda.get_rng_state/set_rng_state/manual_seed`` and megatron's private
    ``tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state`` -> the CPU generator.
    Covers ``model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker.add/fork`` (without the
    private setters the tracker's ``fork()`` silently does nothing on CPU), and
    ``tensor_parallel.checkpoint`` (activation recompute, ``model.recompute``), which saves and
    restores the CUDA RNG state around the recomputed forward.
``device_kwarg``
    Tensor factories (``torch.zeros``, ``torch.tensor``, ...), ``Tensor.to`` and ``Tensor.cuda``
    map ``device="cuda"`` / ``cuda:N`` / an int device to the CPU. Covers the literal
    ``device="cuda"`` tensors in DDP's grad-buffer set-up and the token counters in
    ``pipeline_parallel.schedules.forward_backward_*``.
``cuda_tensor_type``
    ``Tensor.type()`` reports ``torch.cuda.FloatTensor`` (and friends) for CPU tensors. Covers the
    type assert in ``DistributedOptimizer._build_model_and_main_param_groups``.
``sync_noops``
    ``torch.cuda.synchronize`` / ``empty_cache`` / memory queries become no-ops (called by
    ``dist_checkpointing.save`` and by our own logging).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["PATCHES", "Patch", "activate", "cpu_mode_active", "deactivate", "needs_cpu_mode"]


def needs_cpu_mode() -> bool:
    """True when no CUDA device is usable: the only case in which we patch anything."""
    return not torch.cuda.is_available()


@dataclass
class Patch:
    """One monkey-patch: what it replaces and which megatron-core call needs it."""

    name: str
    covers: str
    apply: Callable[[], None]
    revert: Callable[[], None]
    active: bool = field(default=False)


_saved: dict[tuple[Any, str], Any] = {}


def _set(obj: Any, attr: str, value: Any) -> None:
    key = (obj, attr)
    if key not in _saved:
        _saved[key] = getattr(obj, attr)
    setattr(obj, attr, value)


def _restore(obj: Any, attr: str) -> None:
    key = (obj, attr)
    if key in _saved:
        setattr(obj, attr, _saved.pop(key))


# --- current_device ---------------------------------------------------------------------------


def _apply_current_device() -> None:
    _set(torch.cuda, "current_device", lambda: torch.device("cpu"))


def _revert_current_device() -> None:
    _restore(torch.cuda, "current_device")


# --- cuda_rng ---------------------------------------------------------------------------------


def _cpu_manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which we may have patched.
    torch.default_generator.manual_seed(int(seed))


def _apply_cuda_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    _set(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    _set(
        torch.cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state)
    )
    _set(torch.cuda, "manual_seed", _cpu_manual_seed)
    _set(torch.cuda, "manual_seed_all", _cpu_manual_seed)
    _set(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _set(mrandom, "_set_cuda_rng_state", lambda new_state, *a, **k: torch.set_rng_state(new_state))


def _revert_cuda_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    for attr in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all"):
        _restore(torch.cuda, attr)
    _restore(mrandom, "_get_cuda_rng_state")
    _restore(mrandom, "_set_cuda_rng_state")


# --- device_kwarg -----------------------------------------------------------------------------


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


_CPU = torch.device("cpu")

# The tensor factories megatron-core calls with a literal CUDA device (grep of 0.16: tensor,
# zeros, ones, empty, empty_like, randn) plus their siblings, so a new call site is covered too.
_FACTORIES = (
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "eye",
    "linspace",
    "rand",
    "randn",
    "randint",
    "randperm",
    "empty_strided",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "rand_like",
    "randn_like",
)


def _on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a CUDA ``device=`` keyword rewritten to the CPU."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    return wrapper


def _apply_device_kwarg() -> None:
    # Why wrappers and not a TorchFunctionMode (the first version): a mode runs Python for every
    # torch call on its thread, ~6 us each; it cost 10% of a tiny CPU train step and slowed an
    # in-process vLLM engine the same way. Wrapping the factories costs only their own calls.
    for name in _FACTORIES:
        _set(torch, name, _on_cpu(getattr(torch, name)))
    to = torch.Tensor.to

    def _to(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args and _is_cuda_device(args[0]):
            args = (_CPU, *args[1:])
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs["device"] = _CPU
        return to(self, *args, **kwargs)

    _set(torch.Tensor, "to", _to)
    _set(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)


def _revert_device_kwarg() -> None:
    for name in _FACTORIES:
        _restore(torch, name)
    _restore(torch.Tensor, "to")
    _restore(torch.Tensor, "cuda")


# --- cuda_tensor_type -------------------------------------------------------------------------

_CPU_TO_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
}


def _apply_cuda_tensor_type() -> None:
    orig = torch.Tensor.type

    def _type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any) -> Any:
        if dtype is None and not kw:
            name = orig(self)
            return _CPU_TO_CUDA_TYPE.get(name, name)
        return orig(self, dtype, non_blocking, **kw)

    _set(torch.Tensor, "type", _type)


def _revert_cuda_tensor_type() -> None:
    _restore(torch.Tensor, "type")


# --- sync_noops -------------------------------------------------------------------------------


def _apply_sync_noops() -> None:
    _set(torch.cuda, "synchronize", lambda device=None: None)
    _set(torch.cuda, "empty_cache", lambda: None)
    _set(torch.cuda, "memory_allocated", lambda device=None: 0)
    _set(torch.cuda, "max_memory_allocated", lambda device=None: 0)


def _revert_sync_noops() -> None:
    for attr in ("synchronize", "empty_cache", "memory_allocated", "max_memory_allocated"):
        _restore(torch.cuda, attr)


PATCHES: dict[str, Patch] = {
    p.name: p
    for p in (
        Patch(
            "current_device",
            "tensor_parallel.layers/mappings buffers, RotaryEmbedding.__init__, DDP grad buffers",
            _apply_current_device,
            _revert_current_device,
        ),
        Patch(
            "cuda_rng",
            "tensor_parallel.model_parallel_cuda_manual_seed, CudaRNGStatesTracker.add/fork",
            _apply_cuda_rng,
            _revert_cuda_rng,
        ),
        Patch(
            "device_kwarg",
            "literal device='cuda' tensors: DDP grad-buffer set-up, schedules' token counters",
            _apply_device_kwarg,
            _revert_device_kwarg,
        ),
        Patch(
            "cuda_tensor_type",
            "DistributedOptimizer._build_model_and_main_param_groups type assert",
            _apply_cuda_tensor_type,
            _revert_cuda_tensor_type,
        ),
        Patch(
            "sync_noops",
            "torch.cuda.synchronize in dist_checkpointing.save; memory queries in logging",
            _apply_sync_noops,
            _revert_sync_noops,
        ),
    )
}


_skipped: set[str] = set()


def activate(skip: tuple[str, ...] = (), force: bool = False) -> list[str]:
    """Apply the CPU patches (only without CUDA, unless ``force``); return the names applied.

    ``skip`` leaves named patches out, also for later calls in this process; the tests use it
    to prove that each one is needed.
    """
    if not (force or needs_cpu_mode()):
        return []
    _skipped.update(skip)
    applied = []
    for patch in PATCHES.values():
        if patch.name in _skipped or patch.active:
            continue
        patch.apply()
        patch.active = True
        applied.append(patch.name)
    return applied


def deactivate() -> None:
    """Undo every applied patch (tests)."""
    for patch in reversed(list(PATCHES.values())):
        if patch.active:
            patch.revert()
            patch.active = False


def cpu_mode_active() -> bool:
    return any(p.active for p in PATCHES.values())
