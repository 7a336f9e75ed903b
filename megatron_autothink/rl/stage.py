"""Set-up and loop of one RL stage: prompt loader, rollout engine, weight sync, resume.

The engine is colocated: the first rank of every model-parallel group (tp_rank 0, pp_rank 0)
owns one vLLM engine holding the whole policy and generates for its data-parallel shard of the
prompts; the other ranks of that group receive the rollouts (:mod:`megatron_autothink.rl.comm`).
With more than one rank, vLLM's engine core runs in its own process
(``rollout.engine_process``): in-process vLLM would build its groups on torch's default process
group, which the trainer owns, and destroy it on shutdown. Weights reach the engine through the
HF name map shared with checkpoint conversion (``weights.gather.iter_hf_weights``), gathered
over TP/PP and streamed in buckets, tagged with the step as the policy version.

The engine is built once, in the run's first RL stage, and sized for its longest RL stage
(:func:`engine_context_length`). A weight sync wakes the engine's weights, pushes them, frees
the trainer's cached memory and wakes the KV cache last
(:func:`~megatron_autothink.rollout.engine.colocated_weight_sync`).
"""

from __future__ import annotations

import gc
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_autothink.config import AutothinkConfig, StageConfig, stage_config
from megatron_autothink.data.batch import PromptSample
from megatron_autothink.data.image_processing import image_config
from megatron_autothink.data.loader import build_prompt_loader, prompt_loader_config
from megatron_autothink.data.tokenizer import hf_token_ids, resolve_tokenizer_dir
from megatron_autothink.modes import IMAGE_PAD
from megatron_autothink.parallel import ParallelContext
from megatron_autothink.rl.algorithm import Algorithm
from megatron_autothink.rl.comm import RLComm, engine_owner
from megatron_autothink.rl.rewards import Rubric
from megatron_autothink.rl.trainer import ReplayStore, RLContext, replay_capacity, rl_step
from megatron_autothink.rollout.engine import RolloutEngine, colocated_weight_sync
from megatron_autothink.train.callbacks import standard_callbacks
from megatron_autothink.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    rng_untouched,
)
from megatron_autothink.train.loop import run_loop
from megatron_autothink.train.preempt import PreemptionWatcher
from megatron_autothink.train.progress import phase
from megatron_autothink.train.setup import build_model_chunks
from megatron_autothink.train.state import BatchSource, LoopState

log = logging.getLogger(__name__)


def export_hf(
    cfg: AutothinkConfig,
    ctx: ParallelContext,
    chunks: list[torch.nn.Module],
    tokenizer: Any,
    tokenizer_dir: str,
    out_dir: Path,
) -> None:
    """Write the live policy as a HF directory (collective: every rank gathers its
    model-parallel group's weights; global rank 0 writes, the others wait until it is done)."""
    from megatron_autothink.weights.assets import write_hf_assets
    from megatron_autothink.weights.gather import iter_hf_weights
    from megatron_autothink.weights.hf_io import ShardedSafetensorsWriter

    writer = ShardedSafetensorsWriter(out_dir) if ctx.rank == 0 else None
    for name, t in iter_hf_weights(chunks, cfg.model, ctx, names="checkpoint"):
        if writer is not None:
            writer.add(name, t)
    if writer is not None:
        writer.close()
        write_hf_assets(
            out_dir,
            cfg.model,
            dtype=torch.float32,
            hf_base=hf_token_ids(tokenizer),
            tokenizer_dir=Path(tokenizer_dir),
            image=image_config(cfg),
        )
    if ctx.world_size > 1:
        torch.distributed.barrier()  # readers start only once the directory is complete


def engine_in_process(cfg: AutothinkConfig, ctx: ParallelContext) -> bool:
    """Resolve ``rollout.engine_process`` for this world (see the module docstring)."""
    mode = cfg.rollout.engine_process
    if mode == "in_process" and ctx.world_size > 1:
        raise ValueError(
            "rollout.engine_process=in_process needs a single-rank run: in-process vLLM shares "
            f"torch's default process group with the trainer (world size {ctx.world_size}); "
            "use rollout.engine_process=subprocess or auto"
        )
    return mode == "in_process" or (mode == "auto" and ctx.world_size == 1)


def engine_context_length(run: AutothinkConfig) -> int:
    """``max_model_len`` of the run's one rollout engine: the largest ``data.seq_length`` of
    its RL stages (their overrides applied).

    The engine is built once, in the first RL stage, and serves every later one (an in-process
    vLLM cannot be shut down and rebuilt mid-run: its shutdown tears down torch's default
    process group), so it is sized for the longest stage, e.g. LMM-R1's MGT stage (16384
    after FRE's 8192). Each stage's packing still refuses sequences over its own
    ``seq_length``, and ``config.check_static`` refuses a stage whose ``max_new_tokens``
    cannot fit in it.
    """
    lengths = [stage_config(run, s).data.seq_length for s in run.stages if s.kind == "rl"]
    return max(lengths, default=run.data.seq_length)


def build_engine(
    cfg: AutothinkConfig, model_dir: Path, version: int, *, in_process: bool, max_model_len: int
) -> RolloutEngine:
    from megatron_autothink.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

    ro = cfg.rollout
    return VLLMRolloutEngine(
        VLLMEngineConfig(
            model_dir=str(model_dir),
            dtype="float32" if not torch.cuda.is_available() else "bfloat16",
            max_model_len=max_model_len,
            seed=cfg.train.seed,
            weight_bucket_mb=ro.weight_bucket_mb,
            enforce_eager=ro.enforce_eager,
            gpu_memory_utilization=ro.gpu_memory_utilization,
            # On shared CPU cores one thread is 3-6x faster than two (threads wait on each other).
            cpu_threads=1 if not torch.cuda.is_available() else None,
            sleep_level=2 if ro.sleep_level == 2 else 1,
            initial_version=version,
            in_process=in_process,
        )
    )


def reference_policy(
    cfg: AutothinkConfig,
    ctx: ParallelContext,
    stage: StageConfig,
    chunks: list[torch.nn.Module],
    ckpt: CheckpointManager,
    tokenizer: Any,
    *,
    resumed: bool,
) -> list[torch.nn.Module]:
    """The KL reference: the policy the stage started from, saved before its first step and
    reloaded on resume (the live weights then are the resumed policy, not the start)."""
    ref_chunks = build_model_chunks(
        cfg, ctx, vocab_size=cfg.model.vocab_size, image_token_id=_image_id(tokenizer)
    )
    if not resumed:
        ckpt.save_reference(chunks)
        for ref, live in zip(ref_chunks, chunks, strict=True):
            ref.load_state_dict(getattr(live, "module", live).state_dict())
    elif ckpt.reference_dir.exists():
        ckpt.load_reference(ref_chunks)
    else:
        raise CheckpointError(
            f"{ckpt.reference_dir}: missing; stage {stage.name} resumes with "
            "rl.kl_coef > 0 but its checkpoints predate the saved KL reference"
        )
    for ref in ref_chunks:
        ref.requires_grad_(False)
    return ref_chunks


def start_engine(
    run_cfg: AutothinkConfig,
    cfg: AutothinkConfig,
    ctx: ParallelContext,
    stage: StageConfig,
    chunks: list[torch.nn.Module],
    tokenizer: Any,
    tokenizer_dir: str,
    slot: EngineSlot,
) -> None:
    """Export the live policy and start the run's one rollout engine on the owning ranks.

    Called on every rank while ``slot.started`` is false, not while ``slot.engine is None``:
    ranks that own no engine (TP/PP peers) hold None in every stage and would re-export alone
    at a second RL stage, a collective the owners skip (deadlock). One engine serves the whole
    run: an in-process vLLM's shutdown tears down the default process group, so the run shuts
    it down once, after its last stage.
    """
    t0 = time.perf_counter()
    engine_dir = Path(cfg.logging.run_dir) / "rollout_engine"
    phase(
        f"stage {stage.name}: exporting the policy, starting the vLLM rollout engine",
        rank=ctx.rank,
    )
    if ctx.rank == 0:
        engine_dir.mkdir(parents=True, exist_ok=True)
    export_hf(cfg, ctx, chunks, tokenizer, tokenizer_dir, engine_dir)
    if engine_owner(ctx):
        slot.engine = build_engine(
            cfg,
            engine_dir,
            version=0,
            in_process=engine_in_process(cfg, ctx),
            max_model_len=engine_context_length(run_cfg),
        )
    slot.started = True
    phase(
        f"stage {stage.name}: rollout engine up in {time.perf_counter() - t0:.1f}s", rank=ctx.rank
    )


def run_stage(
    cfg: AutothinkConfig,
    ctx: ParallelContext,
    stage: StageConfig,
    chunks: list[torch.nn.Module],
    tokenizer: Any,
    *,
    step_offset: int,
    previous: CheckpointManager | None,
    watcher: PreemptionWatcher | None = None,
    engine_slot: EngineSlot,
) -> tuple[LoopState, CheckpointManager]:
    """One RL stage. ``engine_slot`` carries the run's rollout engine across its RL stages; the
    caller shuts it down after the last one."""
    run_cfg, cfg = cfg, stage_config(cfg, stage)
    rl = cfg.rl
    path = stage.train_path or cfg.data.train_path
    tokenizer_dir = resolve_tokenizer_dir(cfg, path)
    if rl.prompts_per_step % ctx.dp:
        raise ValueError(f"rl.prompts_per_step={rl.prompts_per_step} not divisible by dp={ctx.dp}")
    phase(
        f"stage {stage.name} ({stage.kind}, {stage.steps} steps): optimizer and prompt loader "
        f"({path})",
        rank=ctx.rank,
    )
    loader = build_prompt_loader(
        prompt_loader_config(cfg, path, batch_size=rl.prompts_per_step // ctx.dp),
        tokenizer,
        dp_rank=ctx.dp_rank,
        dp_world_size=ctx.dp,
    )
    state = LoopState.begin(cfg, ctx, stage, chunks, loader, step_offset=step_offset)
    opt, ckpt = state.opt, state.ckpt
    assert ckpt is not None  # LoopState.begin always gives the stage a checkpoint folder
    algo = Algorithm.of(rl)  # the one place the algorithm is chosen
    replay = (
        ReplayStore(replay_capacity(algo, rl.prompts_per_step, ctx.dp)) if rl.ssr.enabled else None
    )
    comm = RLComm.create(ctx)
    # Data-parallel ranks draw differently (rethinking triggers, SSR); the ranks of one
    # model-parallel group draw alike, so they select the same samples.
    rng = random.Random(cfg.train.seed + 17 + 7919 * ctx.dp_rank)
    gen = torch.Generator().manual_seed(cfg.train.seed + 29 + 7919 * ctx.dp_rank)
    state.extra_rank_state = {
        "rethink_rng": rng.getstate,
        "ssr_generator": gen.get_state,
    }
    if replay is not None:
        state.extra_rank_state["replay"] = replay.state_dict
    rollout_log = Path(cfg.logging.run_dir) / "rollouts" / f"{stage.name}.jsonl"
    state.step_logs.append(rollout_log)  # its replayed steps are dropped at resume
    rs = state.resume(previous)
    if rs is not None:
        if "rethink_rng" in rs:
            rng.setstate(_as_tuple(rs["rethink_rng"]))
        if "ssr_generator" in rs:
            gen.set_state(rs["ssr_generator"])
        if replay is not None and "replay" in rs:
            replay.load_state_dict(rs["replay"])
    if state.step >= stage.steps:
        return state, ckpt

    # Set-up that runs at every (re)start of the stage draws from or re-seeds the RNGs: it
    # leaves them as the checkpoint (or the stage before) left them, so a resumed stage
    # continues the same random streams as the uninterrupted run (found by the soak).
    with rng_untouched():
        ref_chunks = (
            reference_policy(cfg, ctx, stage, chunks, ckpt, tokenizer, resumed=rs is not None)
            if rl.kl_coef > 0
            else None
        )
        if not engine_slot.started:
            start_engine(run_cfg, cfg, ctx, stage, chunks, tokenizer, tokenizer_dir, engine_slot)
        engine = engine_slot.engine

    def weight_sync(version: int) -> float:
        from megatron_autothink.weights.gather import iter_hf_weights

        version += step_offset  # policy versions grow across stages
        t = time.perf_counter()
        stream = iter_hf_weights(chunks, cfg.model, ctx, names="checkpoint")
        if engine is not None:
            # Weights, push, trainer caches freed, KV cache last (rollout.engine docstring).
            colocated_weight_sync(
                engine, stream, version, release_trainer_memory=release_trainer_memory
            )
        else:
            for _ in stream:  # take part in the collectives
                pass
        return time.perf_counter() - t

    rc = RLContext(
        cfg=cfg,
        ctx=ctx,
        chunks=chunks,
        ref_chunks=ref_chunks,
        opt=opt,
        engine=engine,
        tokenizer=tokenizer,
        algo=algo,
        score=Rubric(rl.rewards),
        replay=replay,
        rng=rng,
        gen=gen,
        pad_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        image_token_id=_image_id(tokenizer),
        image=image_config(cfg),
        weight_sync=weight_sync,
        comm=comm,
        rollout_log=rollout_log if ctx.rank == 0 else None,
    )
    callbacks = standard_callbacks(cfg, evaluate=False)
    phase(f"stage {stage.name}: training steps {state.step + 1}-{stage.steps}", rank=ctx.rank)
    run_loop(state, RLModule(rc, loader), callbacks, watcher=watcher)
    return state, ckpt


@dataclass
class RLModule:
    """One RL step for the shared loop: this rank's prompts, then generate -> score -> advantages
    -> update -> weight sync (:func:`~megatron_autothink.rl.trainer.rl_step`)."""

    rc: RLContext
    prompts: BatchSource

    def next_item(self) -> list[PromptSample]:
        return next(self.prompts)  # type: ignore[no-any-return]

    def train_step(self, item: list[PromptSample], step: int) -> dict[str, float]:
        return rl_step(self.rc, item, step)


@dataclass
class EngineSlot:
    """The run's rollout engine (None on ranks that own none), shared by its RL stages."""

    engine: RolloutEngine | None = None
    started: bool = False  # set by the first RL stage on every rank, engine owner or not

    def shutdown(self) -> None:
        """Stop the engine (idempotent); call after the run's last RL stage."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()


def release_trainer_memory() -> None:
    """Give the trainer's cached, now unused accelerator memory back before the engine's KV
    cache wakes (gathered weight buckets, the step's activations); nothing to do on CPU."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _image_id(tokenizer: Any) -> int:
    return int(tokenizer.convert_tokens_to_ids(IMAGE_PAD))


def _as_tuple(x: Any) -> Any:
    """random.Random state comes back from a weights_only load with lists where it had tuples."""
    if isinstance(x, list):
        return tuple(_as_tuple(v) for v in x)
    return x
