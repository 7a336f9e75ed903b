"""Steps 3 and 4 of ``run.sh``: training throughput and FP8, on the package's own train step.

``throughput`` (step 3): the 3B recipe's shape (``recipes/r4b_bpo_3b.yaml``) in bf16 through
the trainer's real path (``build_model_chunks`` -> megatron DDP -> distributed optimizer ->
``train_step`` on megatron's schedule), local spec and, when Transformer Engine is there, the
TE spec. Reports tokens/s, model TFLOP/s (``train.flops``), MFU against the chip's dense bf16
peak, and each step split into forward / backward / optimizer / other (timers around
megatron's ``schedules.forward_step`` / ``backward_step`` and the optimizer's ``step``, device
synchronised). If the full depth does not fit (CUDA out of memory), fewer layers are tried and
the JSON says so.

``attention`` (step 3, second part): the packed-row attention of ``models/attention.py`` on
one 3B-shaped layer, segments (``models/varlen.py``: one SDPA call per segment length) vs. the
masked path (a ``[S, S]`` block-diagonal causal mask), forward + backward, and their outputs'
difference.

``fp8`` (step 4): with Transformer Engine on an FP8-capable GPU, the same shape with
``model.fp8=hybrid`` vs. bf16, the loss of every one of 50 steps side by side; otherwise
``{"status": "absent", "tried": [...]}``. In dry mode the comparison machinery runs anyway on a
stand-in pair (the local spec twice, which must agree exactly).

    python -m benchmarks.gpu.train_bench throughput|attention|fp8 --out OUT
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from benchmarks.gpu.common import dry_mode, exit_now, sync, timed, write_json

RECIPE_3B = "r4b_bpo_3b"


def shape(dry: bool) -> dict[str, Any]:
    """The benchmark's config: the 3B recipe at its sequence length on GPU, tiny on CPU."""
    if dry:
        return {"recipe": "tiny_cpu", "rows": 2, "seq": 128, "layers": [4], "steps": 3}
    return {"recipe": RECIPE_3B, "rows": 1, "seq": 8192, "layers": [36, 18, 9], "steps": 8}


def load_cfg(recipe: str, rows: int, seq: int, extra: list[str]) -> Any:
    from megatron_autothink.config import load_config

    return load_config(
        recipe,
        [
            f"data.micro_batch_size={rows}",
            f"data.global_batch_size={rows}",
            f"data.seq_length={seq}",
            "optim.warmup_fraction=0.0",
            # the recipe's RL stage must still fit its rollouts in a shorter sequence (config
            # check); nothing here generates
            "rollout.max_new_tokens=512",
            *extra,
        ],
    )


@contextmanager
def step_timers(opt: Any) -> Iterator[dict[str, float]]:
    """Seconds spent in megatron's ``forward_step`` / ``backward_step`` (the schedules call
    them through their module's globals) and in the optimizer's ``step``, accumulated."""
    from megatron.core.pipeline_parallel import schedules

    acc: dict[str, float] = {}
    fwd, bwd = schedules.forward_step, schedules.backward_step
    inner = opt.optimizer.step

    def wrap(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def timed_fn(*args: Any, **kwargs: Any) -> Any:
            with timed(acc, key):
                return fn(*args, **kwargs)

        return timed_fn

    schedules.forward_step = wrap(fwd, "forward_s")
    schedules.backward_step = wrap(bwd, "backward_s")
    opt.optimizer.step = wrap(inner, "optimizer_s")
    try:
        yield acc
    finally:
        schedules.forward_step, schedules.backward_step = fwd, bwd
        del opt.optimizer.step  # the instance attribute; the class's method shows again


class Trainer:
    """One model + DDP + optimizer built by the trainer's own set-up functions."""

    def __init__(self, cfg: Any, ctx: Any, total_steps: int) -> None:
        from megatron_autothink.parallel import seed_everything
        from megatron_autothink.train.setup import build_model_chunks, build_optimizer, wrap_ddp

        seed_everything(cfg.train.seed, ctx)
        t0 = time.perf_counter()
        chunks = build_model_chunks(cfg, ctx, vocab_size=cfg.model.vocab_size, image_token_id=7)
        self.chunks = wrap_ddp(cfg, chunks, ctx)
        self.opt = build_optimizer(cfg, self.chunks, ctx, total_steps=total_steps)
        sync()
        self.build_s = time.perf_counter() - t0
        self.cfg, self.ctx = cfg, ctx
        self.params = sum(p.numel() for c in self.chunks for p in c.parameters())

    def step(self, batch: Any) -> Any:
        from megatron_autothink.train.step import train_step

        return train_step(
            self.chunks, self.opt, [batch], self.ctx, seq_length=self.cfg.data.seq_length
        )

    def close(self) -> None:
        del self.chunks, self.opt
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def batches(cfg: Any, rows: int, seq: int, n: int) -> list[Any]:
    """``n`` synthetic batches (bench_train's: one sample per row, one small image in row 0)."""
    from benchmarks.bench_train import make_batch

    return [make_batch(rows, seq, cfg.model.vocab_size, seed=i) for i in range(n)]


def measure(trainer: Trainer, data: list[Any], steps: int) -> dict[str, Any]:
    """Two untimed warm-up steps, then ``steps`` timed ones with the per-part split."""
    from megatron_autothink.train.flops import (
        attended_length,
        mfu,
        peak_flops,
        train_flops_per_token,
    )

    for i in range(2):
        trainer.step(data[i % len(data)])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rows: list[dict[str, float]] = []
    losses = []
    with step_timers(trainer.opt) as acc:
        for i in range(steps):
            acc.clear()
            sync()
            t0 = time.perf_counter()
            result = trainer.step(data[i % len(data)])
            sync()
            total = time.perf_counter() - t0
            parts = {k: acc.get(k, 0.0) for k in ("forward_s", "backward_s", "optimizer_s")}
            rows.append({"total_s": total, **parts, "other_s": total - sum(parts.values())})
            losses.append(result.loss)
    b = data[0]
    tokens = int(b.tokens.numel())
    head_share = float(b.loss_mask.sum()) / tokens
    fpt = train_flops_per_token(trainer.cfg.model, attended_length(b.segment_ids), head_share)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    achieved = fpt * tokens / med["total_s"]
    peak = peak_flops()
    return {
        "params_m": trainer.params / 1e6,
        "build_s": trainer.build_s,
        "tokens_per_step": tokens,
        "steps_timed": steps,
        "tokens_per_s": tokens / med["total_s"],
        "model_tflops_per_s": achieved / 1e12,
        "flops_per_token": fpt,
        "bf16_dense_peak_tflops": peak / 1e12 if peak else None,
        "mfu": mfu(achieved),
        "step_time_median": med,
        "step_time_split_share": {k: med[k] / med["total_s"] for k in med if k != "total_s"},
        "steps": rows,
        "losses": losses,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else None,
    }


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def throughput(out: str) -> None:
    from megatron_autothink.models.specs import te_available
    from megatron_autothink.parallel import init_distributed

    dry = dry_mode()
    s = shape(dry)
    impls = ["local"] + (["transformer_engine"] if te_available() else [])
    result: dict[str, Any] = {
        "recipe": s["recipe"],
        "rows": s["rows"],
        "seq_length": s["seq"],
        "precision": "fp32 (CPU dry run)" if dry else "bf16",
        "te_spec_measured": "transformer_engine" in impls,
        "specs": {},
    }
    ctx = None
    for impl in impls:
        for layers in s["layers"]:
            cfg = load_cfg(
                s["recipe"],
                s["rows"],
                s["seq"],
                [f"model.num_layers={layers}", f"model.transformer_impl={impl}"],
            )
            ctx = ctx or init_distributed(cfg)
            entry: dict[str, Any] = {
                "num_layers": layers,
                "recipe_num_layers": load_cfg(s["recipe"], 1, s["seq"], []).model.num_layers,
                "recompute": cfg.model.recompute,
            }
            trainer = None
            try:
                trainer = Trainer(cfg, ctx, total_steps=s["steps"] + 4)
                entry.update(measure(trainer, batches(cfg, s["rows"], s["seq"], 2), s["steps"]))
                entry["status"] = "ok"
            except Exception as e:
                if not is_oom(e):
                    raise
                entry["status"] = (
                    f"out of memory at {layers} layers: {str(e).splitlines()[0][:200]}"
                )
            finally:
                if trainer is not None:
                    trainer.close()
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            result["specs"].setdefault(impl, []).append(entry)
            if entry["status"] == "ok":
                if layers != entry["recipe_num_layers"]:
                    entry["reduced"] = f"{layers} of {entry['recipe_num_layers']} layers (memory)"
                break
    ok = [x for v in result["specs"].values() for x in v if x["status"] == "ok"]
    result["status"] = "ok" if len(ok) == len(impls) else "failed"
    path = write_json(out, "3_train_throughput", result)
    for impl, entries in result["specs"].items():
        last = entries[-1]
        if last["status"] == "ok":
            print(
                f"{path}: {impl}: {last['num_layers']} layers, {last['tokens_per_s']:.0f} "
                f"tokens/s, {last['model_tflops_per_s']:.4f} TFLOP/s, MFU {last['mfu']:.3f}, "
                "split "
                + " ".join(f"{k}={v:.2f}" for k, v in last["step_time_split_share"].items())
            )


def attention(out: str) -> None:
    """Segments vs. mask on one attention layer (SDPAAttention, as both specs use it)."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_autothink.models.attention import SDPAAttention
    from megatron_autothink.models.masks import packed_causal_mask
    from megatron_autothink.models.varlen import packed_row_segments

    dry = dry_mode()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    heads, groups, hd, seq = (4, 2, 32, 256) if dry else (16, 2, 128, 8192)
    lengths = [seq * 3 // 8, seq // 4, seq // 8, seq // 8]  # packed samples, then padding
    seg = torch.zeros(1, seq, dtype=torch.long)
    start = 0
    for i, n in enumerate(lengths):
        seg[0, start : start + n] = i + 1
        start += n
    config = TransformerConfig(
        num_layers=1,
        hidden_size=heads * hd,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=hd,
        attention_dropout=0.0,
    )
    attn = SDPAAttention(config, 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(seq, 1, heads, hd, generator=g).to(dev, dtype).requires_grad_()
    k = torch.randn(seq, 1, groups, hd, generator=g).to(dev, dtype).requires_grad_()
    v = torch.randn(seq, 1, groups, hd, generator=g).to(dev, dtype).requires_grad_()
    grad = torch.randn(seq, 1, heads * hd, generator=g).to(dev, dtype)
    t0 = time.perf_counter()
    segments = packed_row_segments(seg.to(dev))
    build_segments_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mask = packed_causal_mask(seg.to(dev))
    sync()
    build_mask_s = time.perf_counter() - t0

    def run(**kw: Any) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            q.grad = k.grad = v.grad = None
            o = attn(q, k, v, kw.get("mask"), packed_seq_params=kw.get("segments"))
            o.backward(grad)
            return o.detach()

        return fn

    paths = {"segments": run(segments=segments), "masked": run(mask=mask)}
    outs, ms = {}, {}
    reps = 3 if dry else 10
    for name, fn in paths.items():
        outs[name] = fn()  # warm-up (kernel selection)
        acc: dict[str, float] = {}
        for _ in range(reps):
            with timed(acc, "s"):
                fn()
        ms[name] = acc["s"] / reps * 1e3
    diff = (outs["segments"].float() - outs["masked"].float()).abs().max().item()
    attended = sum(n * (n + 1) / 2 for n in lengths)
    data = {
        "status": "ok",
        "shape": {
            "seq": seq,
            "heads": heads,
            "kv_groups": groups,
            "head_dim": hd,
            "dtype": str(dtype),
            "packed_lengths": lengths,
            "padding": seq - sum(lengths),
        },
        "fwd_bwd_ms": ms,
        "speedup_segments_over_masked": ms["masked"] / ms["segments"],
        "max_abs_diff": diff,
        "build_segments_ms": build_segments_s * 1e3,
        "build_mask_ms": build_mask_s * 1e3,
        "mask_mib": mask.numel() * mask.element_size() / 2**20,
        "attended_pairs_share": attended / (seq * seq),
    }
    path = write_json(out, "3_attention", data)
    print(
        f"{path}: segments {ms['segments']:.2f} ms, masked {ms['masked']:.2f} ms "
        f"(x{data['speedup_segments_over_masked']:.2f}), max |diff| {diff:.2e}"
    )


def fp8_absent_reasons() -> list[str]:
    """Why FP8 cannot run here, each route tried."""
    import importlib

    tried = []
    try:
        importlib.import_module("transformer_engine")
        tried.append("import transformer_engine: ok")
    except Exception as e:
        tried.append(
            f"import transformer_engine: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        )
    if not torch.cuda.is_available():
        tried.append("CUDA: not available")
    else:
        cap = torch.cuda.get_device_capability()
        tried.append(f"compute capability {cap[0]}.{cap[1]} (FP8 needs >= 8.9)")
    tried.append(
        "carrying it: transformer-engine for CUDA 13 is ~264 MB (earlier reading), over the "
        "64 MiB carry limit; its torch extension also builds from source against the CUDA "
        "toolkit (no nvcc assumed on the GPU machine)"
    )
    return tried


def loss_curves(
    arms: dict[str, list[str]], steps: int, s: dict[str, Any], layers: int
) -> dict[str, Any]:
    """Train each arm ``steps`` steps from the same init on the same batches: per-step losses."""
    from megatron_autothink.parallel import init_distributed

    curves: dict[str, Any] = {}
    ctx = None
    for name, extra in arms.items():
        cfg = load_cfg(
            s["recipe"],
            s["rows"],
            s["seq"],
            [f"model.num_layers={layers}", "optim.lr=3e-4", *extra],
        )
        ctx = ctx or init_distributed(cfg)
        trainer = Trainer(cfg, ctx, total_steps=steps)
        data = batches(cfg, s["rows"], s["seq"], 4)
        t0 = time.perf_counter()
        losses = [trainer.step(data[i % len(data)]).loss for i in range(steps)]
        sync()
        seconds = time.perf_counter() - t0
        tokens = int(data[0].tokens.numel()) * steps
        trainer.close()
        curves[name] = {"overrides": extra, "losses": losses, "tokens_per_s": tokens / seconds}
    return curves


def fp8(out: str, steps: int) -> None:
    from megatron_autothink.models.specs import FP8_MIN_CAPABILITY, te_available

    dry = dry_mode()
    s = shape(dry)
    can = te_available() and torch.cuda.get_device_capability() >= FP8_MIN_CAPABILITY
    data: dict[str, Any] = {"steps": steps}
    if can:
        # The 3B width at fewer layers and 4k tokens: two 50-step runs within the step's limit.
        s = {**s, "seq": 4096}
        te = "model.transformer_impl=transformer_engine"
        curves = loss_curves(
            {"bf16": [te, "model.fp8=none"], "fp8_hybrid": [te, "model.fp8=hybrid"]}, steps, s, 8
        )
        data.update(
            status="ok",
            recipe=s["recipe"],
            num_layers=8,
            seq_length=s["seq"],
            reduced="8 layers, seq 4096: two 50-step runs must fit the step's time limit",
        )
    else:
        data.update(status="absent", tried=fp8_absent_reasons())
        if not dry:
            path = write_json(out, "4_fp8", data)
            print(f"{path}: absent")
            return
        # Dry run: the same comparison machinery on a pair that must agree exactly.
        curves = loss_curves({"reference": [], "reference_again": []}, steps, s, s["layers"][0])
        data["dry_stand_in"] = "FP8 needs TE on a GPU: the local spec twice instead (equal curves)"
    names = list(curves)
    a, b = (curves[n]["losses"] for n in names)
    data["curves"] = curves
    data["side_by_side"] = [
        {"step": i + 1, names[0]: x, names[1]: y} for i, (x, y) in enumerate(zip(a, b, strict=True))
    ]
    data["max_abs_loss_diff"] = max(abs(x - y) for x, y in zip(a, b, strict=True))
    data["final_losses"] = {n: curves[n]["losses"][-1] for n in names}
    data["finite"] = all(math.isfinite(x) for n in names for x in curves[n]["losses"])
    path = write_json(out, "4_fp8", data)
    print(
        f"{path}: {data['status']}; final losses {data['final_losses']}, "
        f"max |diff| {data['max_abs_loss_diff']:.3g}"
    )


def quiet() -> None:
    """megatron's INFO chatter and its apex / TE import warnings off (as ``pipeline`` does;
    not imported from there: it pulls in the data stack, seconds of imports per step)."""
    import logging
    import warnings

    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    warnings.filterwarnings("ignore", message=".*non-leaf Tensor.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["throughput", "attention", "fp8"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=50, help="fp8: steps per loss curve")
    args = ap.parse_args()
    quiet()

    if args.what == "throughput":
        throughput(args.out)
    elif args.what == "attention":
        attention(args.out)
    else:
        fp8(args.out, args.steps)


if __name__ == "__main__":
    main()
    exit_now()
