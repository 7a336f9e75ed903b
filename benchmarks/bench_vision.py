"""Vision tower speed: ours (megatron layers, windows as length-grouped segments) vs. Hugging
Face transformers' Qwen2.5-VL vision tower, same sizes and weights' shapes, same images.

Times forward + backward of the tower alone on ``--images`` images of ``--side`` x ``--side``
patches (16: a 224 x 224 image; 32: 448 x 448), fp32 on CPU, each side in turn in this process
for ``--rounds`` rounds (order flipped every round). Prints the median step time of each side and
the ratio HF / ours (above 1: ours is faster).

    python -m benchmarks.bench_vision [--recipe tiny_cpu] [--images 4] [--side 16] [--steps 8]
        [--rounds 3] [KEY=VALUE ...]   # dotted overrides, e.g. model.vision.hidden_size=256
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", default="tiny_cpu")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--side", type=int, default=16, help="patches per image side (even)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from benchmarks.bench_train import hf_model, time_steps
    from megatron_autothink.config import load_config
    from megatron_autothink.models.qwen25vl import Qwen25VLModel
    from megatron_autothink.parallel import init_distributed, seed_everything

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29613")
    cfg = load_config(args.recipe, args.overrides)
    ctx = init_distributed(cfg)  # a one-rank gloo world in this process
    seed_everything(0, ctx)
    ours = Qwen25VLModel(
        cfg.model,
        cfg.parallel,
        vocab_size=cfg.model.vocab_size,
        image_token_id=7,
        pg_collection=ctx.pg,
    ).vision
    hf = hf_model(cfg).model.visual
    hf.train()
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, args.side, args.side]] * args.images)
    pixels = torch.randn(args.images * args.side**2, 1176, generator=g)

    def ours_step() -> None:
        ours(pixels, grid).sum().backward()

    def hf_step() -> None:
        out = hf(pixels, grid_thw=grid)
        getattr(out, "pooler_output", out).sum().backward()

    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for r in range(args.rounds):
        for side in ("ours", "hf") if r % 2 == 0 else ("hf", "ours"):
            times[side] += time_steps(ours_step if side == "ours" else hf_step, args.steps)
    o, h = statistics.median(times["ours"]), statistics.median(times["hf"])
    patches = args.images * args.side**2
    print(
        f"recipe={args.recipe} images={args.images} side={args.side} patches={patches} "
        f"window={cfg.model.vision.window_size}px threads={torch.get_num_threads()} "
        f"overrides={args.overrides}"
    )
    print(f"ours (megatron layers): {o * 1e3:8.1f} ms per forward+backward")
    print(f"Hugging Face (sdpa):    {h * 1e3:8.1f} ms per forward+backward")
    print(f"ratio HF/ours: {h / o:.2f} (median step times)")


if __name__ == "__main__":
    main()
