"""Atomic, verifiable megatron dist-checkpoints with everything needed to resume exactly.

Layout of one checkpoint ``<root>/iter_0000100/``::

    dist/            megatron dist-checkpoint: model chunks + distributed optimizer (+ extra
                     sharded objects such as the SSR buffer); reshardable across TP/PP.
    rank_00000.pt    per-rank state: RNG (python, numpy, torch, megatron tracker), data-loader
                     state, anything rank-local the caller adds. Plain tensors/containers only,
                     loaded with ``weights_only=True``.
    meta.json        step, world layout, resolved config, and a manifest (size + CRC32 of every
                     file), written last by rank 0.

A save goes to ``iter_0000100.tmp`` and is renamed only after every rank has finished and the
manifest is written, then ``latest`` is replaced atomically. A crash mid-save therefore leaves a
``.tmp`` folder that is ignored (and removed at the next save), never a ``latest`` that does not
load. At load time the manifest is checked first; a checkpoint that fails the check or fails to
load is reported and the previous one is tried.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from megatron_autothink.checkpoint_io import (
    CheckpointError,
    describe_load_error,
    load_dist,
    manifest,
    read_json,
    save_dist,
    verify_manifest,
)
from megatron_autothink.fileio import atomic_write_text
from megatron_autothink.parallel import ParallelContext, serial_gloo_workers
from megatron_autothink.train.setup import OptimizerBundle, inner_optimizers

if TYPE_CHECKING:
    from megatron_autothink.config import AutothinkConfig

log = logging.getLogger(__name__)

_ITER_RE = re.compile(r"^iter_(\d{8})$")
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def checkpoint_root(cfg: AutothinkConfig) -> Path:
    """Where a run's stages checkpoint (``<root>/<stage name>/``): ``checkpoint.dir``, else
    ``<logging.run_dir>/checkpoints``."""
    return Path(cfg.checkpoint.dir or Path(cfg.logging.run_dir) / "checkpoints")


def _barrier(ctx: ParallelContext) -> None:
    if dist.is_initialized() and ctx.world_size > 1:
        dist.barrier()


def rng_state() -> dict[str, Any]:
    """Every RNG the step touches, as plain containers (weights_only-loadable)."""
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """Restore every RNG of :func:`rng_state` on exit: for set-up that runs at every (re)start
    of a stage (building the KL reference model draws initial weights, an in-process vLLM
    engine re-seeds torch), so that a resumed stage continues the checkpoint's random streams
    exactly as the uninterrupted run continued its own."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def _model_state(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """Sharded model state; one key per virtual pipeline chunk like megatron (model, model0..)."""
    mods = [getattr(c, "module", c) for c in chunks]
    if len(mods) == 1:
        return {"model": mods[0].sharded_state_dict()}  # type: ignore[operator]
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(mods)}  # type: ignore[operator]


def _load_model_state(chunks: list[torch.nn.Module], loaded: dict[str, Any]) -> None:
    """Load what :func:`_model_state` described back into the chunks (call under no_grad)."""
    mods = [getattr(c, "module", c) for c in chunks]
    if len(mods) == 1:
        mods[0].load_state_dict(loaded["model"])
        return
    for i, m in enumerate(mods):
        m.load_state_dict(loaded[f"model{i}"])


def _ensure_optimizer_state(opt: OptimizerBundle) -> None:
    """torch's Adam creates its state lazily at the first step; megatron's distributed optimizer
    needs it to exist to describe (save or load) its state. Create it with megatron's zero-grad
    dummy step, then undo that step's side effects (AdamW's decoupled weight decay moves the
    parameters; the step counter advances) so the state is exactly that of a fresh optimizer."""
    for o in inner_optimizers(opt.optimizer):
        torch_opt = getattr(o, "optimizer", None)
        init = getattr(o, "_init_optimizer_states_with_dummy_values", None)
        if torch_opt is None or init is None or torch_opt.state:
            continue
        params = [p for g in torch_opt.param_groups for p in g["params"]]
        saved = [p.detach().clone() for p in params]
        init()
        with torch.no_grad():
            for p, v in zip(params, saved, strict=True):
                p.copy_(v)
        for st in torch_opt.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = torch.zeros_like(st["step"])


def _restore_adam_steps(opt: OptimizerBundle) -> None:
    """Put the saved Adam step back into every parameter's state.

    megatron-core's distributed optimizer (0.16, torch-Adam path without apex/TE) saves the step
    in the param groups, but on load into an already-initialised state it leaves each tensor's
    ``step`` at its dummy value, and where it does set it, it sets ONE shared tensor that torch's
    foreach Adam then increments once per parameter. Both corrupt bias correction after a
    resume; give every state its own tensor holding the group's saved step.
    """
    for o in inner_optimizers(opt.optimizer):
        torch_opt = getattr(o, "optimizer", None)
        if torch_opt is None:
            continue
        for group in torch_opt.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                st = torch_opt.state.get(p)
                if st is not None and "step" in st:
                    old = st["step"]
                    st["step"] = torch.tensor(
                        float(group["step"]), dtype=old.dtype, device=old.device
                    )


@dataclass
class Loaded:
    path: Path
    step: int
    meta: dict[str, Any]
    rank_state: dict[str, Any]
    extra_sharded: dict[str, Any]


class CheckpointManager:
    """Save/find/load checkpoints under ``root`` for one run."""

    def __init__(self, root: str | Path, ctx: ParallelContext, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.ctx = ctx
        self.keep_last = keep_last

    # ------------------------------------------------------------------ discovery

    def candidates(self) -> list[Path]:
        """Finished checkpoint folders, newest first."""
        if not self.root.exists():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _ITER_RE.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def verify(self, path: Path) -> dict[str, Any]:
        """Check the manifest; return ``meta`` or raise :class:`CheckpointError` naming the file."""
        meta_path = path / "meta.json"
        if not meta_path.exists():
            raise CheckpointError(f"{path}: no meta.json (save did not finish)")
        meta = read_json(meta_path)
        if not isinstance(meta.get("manifest"), dict):
            raise CheckpointError(f"{meta_path}: no manifest")
        verify_manifest(path, meta["manifest"])
        return dict(meta)

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        chunks: list[torch.nn.Module],
        opt: OptimizerBundle,
        *,
        rank_state: dict[str, Any],
        meta: dict[str, Any],
        extra_sharded: dict[str, Any] | None = None,
    ) -> Path:
        """Collective: every rank calls it. Returns the final folder."""
        t0 = time.perf_counter()
        final = self.root / f"iter_{step:08d}"
        tmp = self.root / f"iter_{step:08d}.tmp"
        if self.ctx.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # re-saving the same step after a resume
                shutil.rmtree(final)
            (tmp / "dist").mkdir(parents=True)
        _barrier(self.ctx)
        state = _model_state(chunks)
        model_sd = state.get("model", state)
        _ensure_optimizer_state(opt)  # a stage may save before its first update
        state["optimizer"] = opt.optimizer.sharded_state_dict(
            model_sd, is_loading=False, metadata=OPTIM_METADATA
        )
        if extra_sharded:
            state.update(extra_sharded)
        with serial_gloo_workers():
            save_dist(state, tmp / "dist")
        rank_state = {**rank_state, "rng": rng_state()}
        torch.save(rank_state, tmp / f"rank_{self.ctx.rank:05d}.pt")
        _barrier(self.ctx)
        if self.ctx.rank == 0:
            full_meta = {
                **meta,
                "step": step,
                "scheduler": opt.scheduler.state_dict(),
                "world_size": self.ctx.world_size,
                "layout": {"tp": self.ctx.tp, "pp": self.ctx.pp, "dp": self.ctx.dp},
                "saved_at": time.time(),
                "manifest": manifest(tmp),
            }
            (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1, default=str))
            os.replace(tmp, final)
            atomic_write_text(self.root / "latest", final.name)
            for old in self.candidates()[self.keep_last :]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("saved checkpoint %s in %.1fs", final, time.perf_counter() - t0)
        _barrier(self.ctx)
        return final

    # ------------------------------------------------------------------ frozen weights

    @property
    def reference_dir(self) -> Path:
        return self.root / "reference"

    def save_reference(self, chunks: list[torch.nn.Module]) -> Path:
        """Collective: the model weights alone, under ``<root>/reference`` (an RL stage's frozen
        KL reference: the policy it started from). Atomic like :meth:`save`; outside the
        ``iter_*`` rotation, so it lives as long as the stage's folder."""
        final, tmp = self.reference_dir, self.root / "reference.tmp"
        if self.ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(self.ctx)
        with serial_gloo_workers():
            save_dist(_model_state(chunks), tmp)  # as save(): no megatron Manager process
        _barrier(self.ctx)
        if self.ctx.rank == 0:
            meta = {"layout": {"tp": self.ctx.tp, "pp": self.ctx.pp}, "manifest": manifest(tmp)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        _barrier(self.ctx)
        return final

    def load_reference(self, chunks: list[torch.nn.Module]) -> None:
        """Load :meth:`save_reference`'s weights into ``chunks`` (verified like a checkpoint)."""
        path = self.reference_dir
        self.verify(path)
        state = _model_state(chunks)
        with torch.no_grad(), serial_gloo_workers():
            loaded = load_dist(state, path, verify=False)  # verified above; restricted readers
            _load_model_state(chunks, loaded)
        log.info("reference weights from %s", path)

    # ------------------------------------------------------------------ load

    def load_latest(
        self,
        chunks: list[torch.nn.Module],
        opt: OptimizerBundle | None,
        extra_sharded: dict[str, Any] | None = None,
    ) -> Loaded | None:
        """Load the newest checkpoint that verifies and loads; older ones are fall-backs.

        Returns None when the folder holds no checkpoint. Raises :class:`CheckpointError` when
        checkpoints exist but none can be loaded.
        """
        errors = []
        for path in self.candidates():
            try:
                return self.load(path, chunks, opt, extra_sharded)
            except CheckpointError as e:
                log.error("checkpoint rejected: %s; trying the previous one", e)
                errors.append(str(e))
        if errors:
            raise CheckpointError("no loadable checkpoint:\n  " + "\n  ".join(errors))
        return None

    def load(
        self,
        path: Path,
        chunks: list[torch.nn.Module],
        opt: OptimizerBundle | None,
        extra_sharded: dict[str, Any] | None = None,
    ) -> Loaded:
        meta = self.verify(path)
        state = _model_state(chunks)
        model_sd = state.get("model", state)
        saved = meta.get("layout", {})
        same_mp = (saved.get("tp"), saved.get("pp")) == (self.ctx.tp, self.ctx.pp)
        load_optimizer = opt is not None and same_mp
        if opt is not None and not same_mp:
            # The distributed-optimizer format that works without TE/apex (dp_reshardable)
            # reshards across data-parallel ranks only; model weights reshard across TP/PP.
            log.warning(
                "%s was saved at tp=%s pp=%s, now tp=%d pp=%d: loading model weights and the LR "
                "schedule; optimizer moments start fresh (dp_reshardable format)",
                path,
                saved.get("tp"),
                saved.get("pp"),
                self.ctx.tp,
                self.ctx.pp,
            )
        if load_optimizer:
            assert opt is not None
            _ensure_optimizer_state(opt)
            state["optimizer"] = opt.optimizer.sharded_state_dict(
                model_sd, is_loading=True, metadata=OPTIM_METADATA
            )
        if extra_sharded:
            state.update(extra_sharded)
        rank_file = path / f"rank_{self.ctx.rank:05d}.pt"
        same_world = meta["world_size"] == self.ctx.world_size
        # self.verify has just checked every CRC; load_dist reads through the restricted
        # readers and turns any reader error into a CheckpointError naming the folder.
        with torch.no_grad(), serial_gloo_workers():
            loaded = load_dist(state, path / "dist", verify=False)
        try:
            rank_state = torch.load(rank_file, weights_only=True) if same_world else {}
        except Exception as e:
            raise CheckpointError(f"{rank_file}: failed to load ({describe_load_error(e)})") from e
        # no_grad: the distributed optimizer copies into views of leaf parameters.
        with torch.no_grad():
            _load_model_state(chunks, loaded)
            if load_optimizer:
                assert opt is not None
                opt.optimizer.load_state_dict(loaded["optimizer"])
                _restore_adam_steps(opt)
            if opt is not None:
                opt.scheduler.load_state_dict(meta["scheduler"])
        if rank_state.get("rng"):
            set_rng_state(rank_state["rng"])
        if not same_world:
            log.warning(
                "%s was saved with world size %d (now %d): model and optimizer resharded; "
                "RNG and data-loader positions start fresh",
                path,
                meta["world_size"],
                self.ctx.world_size,
            )
        extra = {k: loaded[k] for k in (extra_sharded or {})}
        log.info("resumed from %s (step %d)", path, meta["step"])
        return Loaded(path, int(meta["step"]), meta, rank_state, extra)
