"""Build model chunks, megatron DDP, the distributed optimizer and the LR schedule from config.

Kept apart from the loop so the SFT trainer, the RL trainer and the tests share one path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer import OptimizerConfig as MOptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_autothink.config import AutothinkConfig
from megatron_autothink.models.qwen25vl import Qwen25VLModel
from megatron_autothink.parallel import ParallelContext


def train_dtype(cfg: AutothinkConfig) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU unless the recipe pins one."""
    if cfg.train.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def build_model_chunks(
    cfg: AutothinkConfig,
    ctx: ParallelContext,
    *,
    vocab_size: int,
    image_token_id: int,
) -> list[torch.nn.Module]:
    """One chunk per virtual pipeline stage on this rank (one chunk without interleaving)."""
    vpp = cfg.parallel.vpp or 1
    dtype = train_dtype(cfg)
    chunks: list[torch.nn.Module] = []
    for vp_stage in range(vpp):
        first = ctx.is_first_stage and vp_stage == 0
        last = ctx.is_last_stage and vp_stage == vpp - 1
        model = Qwen25VLModel(
            cfg.model,
            cfg.parallel,
            vocab_size=vocab_size,
            image_token_id=image_token_id,
            pg_collection=ctx.pg,
            pre_process=first,
            post_process=last,
            vp_stage=vp_stage if cfg.parallel.vpp else None,
            dtype=dtype,
        )
        model.to(ctx.device)
        # Per-token loss: the schedules hand back token counts and finalize_model_grads divides
        # the summed gradients by the global count (DP ranks and micro-batches included).
        model.config.calculate_per_token_loss = True
        chunks.append(model)
    return chunks


def wrap_ddp(
    cfg: AutothinkConfig, chunks: list[torch.nn.Module], ctx: ParallelContext
) -> list[torch.nn.Module]:
    """Wrap chunks in megatron DDP (contiguous grad buffers; reduce-scatter with the distributed
    optimizer) and wire the hooks the schedules call. Load weights *before* wrapping: DDP moves
    parameters into its buffers."""
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        average_in_collective=False,
    )
    wrapped: list[torch.nn.Module] = []
    for i, model in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(
                config=model.config,
                ddp_config=ddp_cfg,
                module=model,
                # Bucketing only pays off with overlap; off for extra chunks as megatron does.
                disable_bucketing=i > 0,
                pg_collection=ctx.pg,
            )
        )
    for chunk in wrapped:
        _skip_identity_param_gather(chunk)
        _skip_identity_grad_reduce(chunk)
    cfg0: Any = wrapped[0].config
    cfg0.finalize_model_grads_func = partial(finalize_model_grads, pg_collection=ctx.pg)
    cfg0.no_sync_func = [c.no_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def _skip_identity_param_gather(chunk: DistributedDataParallel) -> None:
    """Make the distributed optimizer's param all-gather a no-op when every shard group has one
    rank (DP = CP = 1): each bucket then gathers its buffer into itself.

    Why bother with an identity: on CPU, gloo performs that gather as a large copy on its own
    thread, which starts a second OpenMP thread team. libgomp then counts more threads than
    cores and throttles every team's spin-wait for the rest of the process, so the trainer's
    worker threads sleep between ops: the tiny CPU step measured 246 ms with it, 169 ms without
    (docs/benchmarks.md). On GPU it saves one NCCL call per step.
    """
    groups = _bucket_groups(chunk)
    if not chunk.ddp_config.use_distributed_optimizer or not groups:
        return
    if all(_collective_size(chunk, g) == 1 for g in groups):
        chunk.start_param_sync = _no_param_sync  # type: ignore[method-assign]


def _no_param_sync(*args: Any, **kwargs: Any) -> None:
    return None


def _bucket_groups(chunk: DistributedDataParallel) -> list[Any]:
    return list(chunk.bucket_groups) + list(chunk.expert_parallel_bucket_groups)


def _collective_size(chunk: DistributedDataParallel, group: Any) -> int:
    """Ranks a bucket group's grad/param collectives span: the distributed optimizer's
    intra-instance group, or the data-parallel group without it."""
    if chunk.ddp_config.use_distributed_optimizer:
        return int(group.intra_distributed_optimizer_instance_size)
    return int(group.data_parallel_group.size())


def _skip_identity_grad_reduce(chunk: DistributedDataParallel) -> None:
    """Drop the collective from each bucket group's gradient sync when its group has one rank
    (DP = CP = 1): a reduce-scatter (distributed optimizer) or all-reduce of a buffer over one
    rank leaves it as it is. What else the sync does (gradient scaling, NaN / large-gradient
    checks) still runs.

    Why: gloo runs the one-rank coalesced reduce-scatter as two copies of the whole gradient
    buffer: ~0.5 ms of a tiny CPU step, but ~65 ms (5%) of a hidden-512 step (13M parameters,
    docs/benchmarks.md). On GPU it saves one NCCL call per step. Only for
    ``overlap_grad_reduce=False`` (ours): with overlap, megatron waits on the handle the
    collective returns.
    """
    cfg = chunk.ddp_config
    # Several distributed-optimizer instances also all-reduce across instances.
    if cfg.overlap_grad_reduce or (
        cfg.use_distributed_optimizer and cfg.num_distributed_optimizer_instances != 1
    ):
        return
    for group in _bucket_groups(chunk):
        if _collective_size(chunk, group) == 1:
            group.start_grad_sync = partial(_local_grad_sync, group)


def _local_grad_sync(group: Any, force_all_reduce: bool | None = False) -> None:
    """megatron's ``start_grad_sync`` for a one-rank group: everything but the collective."""
    cfg = group.ddp_config
    if cfg.check_for_nan_in_grad or cfg.check_for_large_grads:
        group.check_grads(
            check_for_nan_or_inf=cfg.check_for_nan_in_grad,
            check_for_large=cfg.check_for_large_grads,
        )
    for bucket in group.buckets:
        if bucket.gradient_scaling_factor != 1.0:
            bucket.grad_data *= bucket.gradient_scaling_factor
    group.grad_reduce_handle = None


def inner_optimizers(optimizer: MegatronOptimizer) -> list[Any]:
    """The per-param-group megatron optimizers inside ``optimizer`` (a ``ChainedOptimizer`` holds
    several, e.g. dense and expert params); each wraps a torch optimizer as ``.optimizer``."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _use_fused_torch_adam(optimizer: MegatronOptimizer) -> None:
    """Switch megatron's torch AdamW fallback (no TE/apex: every CPU run) to torch's fused kernel.

    megatron builds ``torch.optim.AdamW`` without ``fused``, which on CPU means a Python loop of
    ~8 kernels per parameter (about 3% of a tiny CPU step); the fused kernel does the same update
    in one call per parameter list. TE's / apex's FusedAdam (GPU images) are left alone.
    """
    for inner in inner_optimizers(optimizer):
        torch_opt = getattr(inner, "optimizer", None)
        if type(torch_opt) is not torch.optim.AdamW:
            continue
        for group in torch_opt.param_groups:
            group["fused"], group["foreach"] = True, False


@dataclass
class OptimizerBundle:
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler


def build_optimizer(
    cfg: AutothinkConfig, chunks: list[torch.nn.Module], ctx: ParallelContext, total_steps: int
) -> OptimizerBundle:
    o = cfg.optim
    dtype = train_dtype(cfg)
    mcfg = MOptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    # Our groups are passed in; megatron would otherwise build extra gloo groups of its own.
    optimizer = get_megatron_optimizer(
        mcfg, chunks, use_gloo_process_groups=False, pg_collection=ctx.pg
    )
    chunks[0].config.grad_scale_func = optimizer.scale_loss  # type: ignore[union-attr]
    _use_fused_torch_adam(optimizer)
    total = max(total_steps, 1)
    warmup = round(o.warmup_fraction * total)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=total,
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
    )
    return OptimizerBundle(optimizer, scheduler)
