"""``autothink train``: run a recipe's stages in order, resuming wherever a previous run stopped.

The top of the house below the CLI: it builds the process groups, the tokenizer and the model
once, and hands them to each stage in turn: ``train/sft.py`` for ``kind: sft``, ``rl/stage.py``
for ``kind: rl`` (one rollout engine shared by all RL stages of the run).

Each stage checkpoints under ``<checkpoint.dir>/<stage name>/``. On start, a stage with a
checkpoint resumes from it (model, optimizer, LR schedule, data position, RNG); a stage without
one starts from the final weights of the stage before it (or of the earlier stage its
``start_from`` names: a branch; fresh optimizer), or from ``train.init_from`` / random init for
the first stage.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_autothink.compat.quiet import silence_known_warnings
from megatron_autothink.config import (
    AutothinkConfig,
    StageConfig,
    dump_config,
    input_paths,
)
from megatron_autothink.cpus import configure_threads
from megatron_autothink.data.loader import DataQualityError
from megatron_autothink.data.tokenizer import load_tokenizer, resolve_tokenizer_dir
from megatron_autothink.models.specs import resolve_backend
from megatron_autothink.modes import IMAGE_PAD
from megatron_autothink.parallel import (
    ParallelContext,
    destroy_distributed,
    init_distributed,
    seed_everything,
    serial_gloo_workers,
)
from megatron_autothink.rl.stage import EngineSlot
from megatron_autothink.rl.stage import run_stage as run_rl_stage
from megatron_autothink.train.checkpoint import CheckpointError, CheckpointManager, checkpoint_root
from megatron_autothink.train.preempt import PreemptionWatcher, marker_path, write_marker
from megatron_autothink.train.progress import phase
from megatron_autothink.train.resume import ResumeRefused
from megatron_autothink.train.setup import build_model_chunks, wrap_ddp
from megatron_autothink.train.sft import run_sft_stage
from megatron_autothink.train.state import LoopState

log = logging.getLogger("megatron_autothink")


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # megatron-core logs its whole optimizer config at INFO; keep the console for our own
    # progress lines. Its TE/Apex warnings: compat/quiet.py (installed by the CLI; again here
    # for callers of main() that did not come through it).
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    silence_known_warnings()


def stages_of(cfg: AutothinkConfig) -> list[StageConfig]:
    return cfg.stages or [StageConfig(name="sft", kind="sft", steps=cfg.train.steps)]


def load_initial_weights(
    cfg: AutothinkConfig, ctx: ParallelContext, chunks: list[torch.nn.Module]
) -> None:
    """``train.init_from``: a Hugging Face Qwen2.5-VL directory (config.json + safetensors), a
    megatron dist-checkpoint made by ``autothink convert hf-to-mcore`` (autothink_model.json), or
    a training checkpoint (``checkpoints/<stage>`` for its latest iteration, ``iter_N`` or its
    ``dist/``: the model part only, no optimizer).
    Loaded before DDP wrapping, only when the run has nothing to resume."""
    from megatron_autothink.checkpoint_io import load_dist

    src = Path(cfg.train.init_from)
    if (src / "latest").is_file():
        # a stage's checkpoint folder (checkpoints/<stage>): its newest complete iteration
        src = src / (src / "latest").read_text().strip()
    if (src / "meta.json").is_file() and (src / "dist").is_dir():
        src = src / "dist"  # an iter_N folder: its weights are in dist/
    if (src / "autothink_model.json").is_file() or (src / "metadata.json").is_file():
        mods: list[Any] = [getattr(c, "module", c) for c in chunks]
        if len(mods) != 1:
            raise SystemExit("train.init_from with a dist-checkpoint needs parallel.vpp unset")
        # A training checkpoint nests the model under "model" next to "optimizer" (see
        # train/checkpoint.py); asking for that key alone leaves the optimizer state unread.
        training = src.name == "dist" and (src.parent / "meta.json").is_file()
        request = mods[0].sharded_state_dict()
        with torch.no_grad(), serial_gloo_workers():
            loaded = load_dist({"model": request} if training else request, src)
            mods[0].load_state_dict(loaded["model"] if training else loaded)
    elif (src / "config.json").is_file():
        from megatron_autothink.weights.hf_io import HFCheckpoint
        from megatron_autothink.weights.load import load_hf_weights

        with torch.no_grad():
            load_hf_weights(chunks, HFCheckpoint(src), cfg.model, ctx, progress=ctx.rank == 0)
    else:
        raise SystemExit(
            f"train.init_from={src}: neither a HF model dir (config.json) nor a megatron "
            "checkpoint from `autothink convert hf-to-mcore` (autothink_model.json) nor a "
            "training checkpoint (checkpoints/<stage>, its iter_N or iter_N/dist)"
        )
    log.info("initial weights from %s", src)


def record_config(run_dir: Path, text: str) -> Callable[[], None]:
    """Write ``config.yaml`` (the config of this start). An earlier start's that differs is
    kept as ``config.<n>.yaml`` (n = 1, 2, ... oldest first), so the record never claims that
    a value ran that did not; ``resumes.jsonl`` says what each resume changed. Returns an undo
    for a start that is refused before it trains."""
    current = run_dir / "config.yaml"
    kept: Path | None = None
    if current.is_file() and current.read_text() != text:
        n = 1
        while (run_dir / f"config.{n}.yaml").exists():
            n += 1
        kept = run_dir / f"config.{n}.yaml"
        current.rename(kept)
    current.write_text(text)

    def undo() -> None:
        if kept is not None:
            kept.replace(current)

    return undo


def check_input_paths(cfg: AutothinkConfig) -> None:
    """Every local input the config names must exist: a typo is reported in a second, not after
    the process groups, the model and the loader workers are set up. (Object-store URLs are
    left to the loader, which names the shard it cannot read.)"""
    for key, value in input_paths(cfg):
        if not Path(value).exists():
            raise SystemExit(f"autothink train: {key}={value} does not exist")


def main(cfg: AutothinkConfig) -> int:
    """Entry point of ``autothink train``. Returns the process exit code."""
    # A model.fp8 / transformer_impl this machine cannot run: a config error before any work.
    resolve_backend(cfg.model)
    check_input_paths(cfg)
    # Before any process group, loader worker or engine exists, so they inherit the signal mask
    # (SLURM's USR1 reaches every process of the step; see train/preempt.py).
    watcher = (
        PreemptionWatcher(boundary_timeout_s=cfg.checkpoint.preempt_timeout_s).install()
        if cfg.checkpoint.save_on_signal
        else None
    )
    setup_logging(int(os.environ.get("RANK", "0")))
    # Threads from the CPUs this rank may use (or AUTOTHINK_THREADS), before any worker, process
    # group or engine exists, so they inherit the same budget (megatron_autothink/cpus.py).
    log.info("torch threads: %d", configure_threads())

    stages = stages_of(cfg)
    first_path = stages[0].train_path or cfg.data.train_path
    if not first_path:
        raise SystemExit(
            "autothink train: data.train_path is empty. Prepare data first, e.g. "
            "`autothink prep digits --out data/digits` then data.train_path=data/digits"
        )
    try:  # before any process group: a missing tokenizer is a config error, not a rank crash
        tokenizer_dir = resolve_tokenizer_dir(cfg, first_path)
    except FileNotFoundError as e:
        raise SystemExit(f"autothink train: {e}") from None
    phase("process groups")
    ctx = init_distributed(cfg)
    phase(
        f"{ctx.world_size} rank(s) (tp {ctx.tp}, pp {ctx.pp}, dp {ctx.dp}), "
        f"{torch.get_num_threads()} torch thread(s) each",
        rank=ctx.rank,
    )
    engine_slot = EngineSlot()  # one rollout engine for all RL stages of the run
    undo_config_record: Callable[[], None] | None = None
    try:
        run_dir = Path(cfg.logging.run_dir)
        if ctx.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            undo_config_record = record_config(run_dir, dump_config(cfg))
            marker_path(run_dir).unlink(missing_ok=True)
        tokenizer = load_tokenizer(tokenizer_dir)
        if len(tokenizer) > cfg.model.vocab_size:
            raise SystemExit(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer "
                f"({len(tokenizer)} tokens)"
            )
        image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_PAD))
        if cfg.model.image_token_id < 0:
            cfg.model.image_token_id = image_token_id
        elif cfg.model.image_token_id != image_token_id:
            raise SystemExit(
                f"model.image_token_id={cfg.model.image_token_id} but the tokenizer's "
                f"<|image_pad|> is {image_token_id}"
            )
        seed_everything(cfg.train.seed, ctx)
        m = cfg.model
        phase(
            f"building the model ({m.name}: {m.num_layers} layers, hidden {m.hidden_size}, "
            f"vision {m.vision.depth} layers)",
            rank=ctx.rank,
        )
        chunks = build_model_chunks(
            cfg, ctx, vocab_size=cfg.model.vocab_size, image_token_id=image_token_id
        )
        first_ckpt = checkpoint_root(cfg) / stages[0].name
        fresh = not (cfg.checkpoint.resume and CheckpointManager(first_ckpt, ctx).candidates())
        if cfg.train.init_from and fresh:
            phase(f"loading the initial weights from {cfg.train.init_from}", rank=ctx.rank)
            load_initial_weights(cfg, ctx, chunks)
        chunks = wrap_ddp(cfg, chunks, ctx)
        offset, previous = 0, None
        finished: dict[str, CheckpointManager] = {}
        for stage in stages:
            if stage.start_from:  # a branch: from that stage's final weights
                previous = finished[stage.start_from]
            state: LoopState
            if stage.kind == "rl":
                state, previous = run_rl_stage(
                    cfg,
                    ctx,
                    stage,
                    chunks,
                    tokenizer,
                    step_offset=offset,
                    previous=previous,
                    watcher=watcher,
                    engine_slot=engine_slot,
                )
            else:
                state, previous = run_sft_stage(
                    cfg,
                    ctx,
                    stage,
                    chunks,
                    tokenizer,
                    step_offset=offset,
                    previous=previous,
                    watcher=watcher,
                )
            if state.stop_requested:
                if ctx.rank == 0:
                    write_marker(
                        marker_path(run_dir),
                        step=state.global_step,
                        checkpoint=str(state.ckpt.root if state.ckpt else ""),
                        signal_name=watcher.signal_name if watcher else "",
                    )
                log.warning(
                    "pre-empted at %s step %d: checkpoint saved, exiting", stage.name, state.step
                )
                return 0
            if previous is not None:
                finished[stage.name] = previous
            offset += stage.steps
        phase(f"done: {', '.join(s.name for s in stages)}", rank=ctx.rank)
        return 0
    except CheckpointError as e:
        if isinstance(e, ResumeRefused) and undo_config_record is not None:
            undo_config_record()  # nothing ran with the refused config
        log.error("%s", e)
        return 3
    except DataQualityError as e:
        log.error("data: %s", e)
        return 4
    finally:
        engine_slot.shutdown()
        destroy_distributed()
