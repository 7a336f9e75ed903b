"""Training throughput: our megatron-core VLM vs. Hugging Face transformers, same model, same batch.

Both sides train the same Qwen2.5-VL-architecture model (sizes from a recipe, default tiny_cpu)
on the same token/image batch (every row: one image + text, full length, causal), fp32 on CPU,
AdamW (fused kernel on both sides), one optimizer step per batch. Ours runs the real path:
megatron DDP + distributed optimizer + ``get_forward_backward_func`` schedule. Both models live
in one process and take steps in turn (see ``_interleaved``). Prints tokens/s of each (median
step time) and the ratio.

    python benchmarks/bench_train.py [--recipe tiny_cpu] [--steps 16] [--rows 4] [--seq 512]
        [KEY=VALUE ...]   # dotted config overrides for both sides, e.g. model.hidden_size=512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def hf_model(cfg):  # type: ignore[no-untyped-def]
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    m, v = cfg.model, cfg.model.vision
    hf_cfg = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": m.vocab_size,
            "hidden_size": m.hidden_size,
            "intermediate_size": m.ffn_hidden_size,
            "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_query_groups,
            "rms_norm_eps": m.rms_norm_eps,
            "tie_word_embeddings": m.tie_word_embeddings,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": m.rope_theta,
                "mrope_section": list(m.mrope_section),
            },
        },
        vision_config={
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "out_hidden_size": m.hidden_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
        },
        image_token_id=7,
        tie_word_embeddings=m.tie_word_embeddings,
    )
    hf_cfg._attn_implementation = "sdpa"
    return Qwen2_5_VLForConditionalGeneration(hf_cfg).float()


def make_batch(rows: int, seq: int, vocab: int, seed: int = 0):  # type: ignore[no-untyped-def]
    from tests.models.model_utils import synthetic_batch

    b = synthetic_batch(rows, seq, vocab, seed, with_image=True)
    b.segment_ids = torch.ones_like(b.segment_ids)  # one sample per row: plain causal for both
    b.loss_mask = torch.ones_like(b.loss_mask)
    return b


def hf_step_fn(cfg, batch):  # type: ignore[no-untyped-def]
    """One HF training step (forward, backward, fused AdamW, zero_grad) as a closure."""
    model = hf_model(cfg)
    model.train()
    # fused: the HF Trainer's default optimizer (adamw_torch_fused) for torch >= 2.8, as on ours.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    inputs = {
        "input_ids": batch.tokens,
        "labels": batch.tokens,
        "pixel_values": batch.pixel_values,
        "image_grid_thw": batch.image_grid_thw,
        "position_ids": torch.cat([batch.position_ids[:1], batch.position_ids], 0),
    }

    def step() -> None:
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def _interleaved(
    recipe: str, rows: int, seq: int, steps: int, overrides: list[str]
) -> dict[str, list[float]]:
    """Both trainers in this process (a one-rank gloo world), stepping in turn; returns each
    side's step times (s).

    Why one process, in turn: this machine's speed drifts by 10% or more over tens of seconds
    (shared cores), so timing one side after the other measured the drift as often as the code.
    Alternating steps (the order flips every pair) exposes both sides to the same conditions.
    Our CPU shims (``compat.cpu``) are switched off during HF's steps, so HF runs plain torch.
    Not in a ``multiprocessing`` spawn child: on this machine such a child ran the same HF step
    ~10% slower than the parent or a ``subprocess`` (measured, cause unknown); the old bench ran
    ours in one and HF in the parent.
    """
    from megatron_autothink.compat import cpu as cpu_compat
    from megatron_autothink.config import load_config
    from megatron_autothink.parallel import init_distributed, seed_everything
    from megatron_autothink.train.setup import build_model_chunks, build_optimizer, wrap_ddp
    from megatron_autothink.train.step import train_step

    cfg = load_config(
        recipe,
        [
            f"data.micro_batch_size={rows}",
            f"data.global_batch_size={rows}",
            f"data.seq_length={seq}",
            *overrides,
        ],
    )
    ctx = init_distributed(cfg)
    seed_everything(0, ctx)
    chunks = wrap_ddp(
        cfg, build_model_chunks(cfg, ctx, vocab_size=cfg.model.vocab_size, image_token_id=7), ctx
    )
    opt = build_optimizer(cfg, chunks, ctx, total_steps=steps + 2)
    batch = make_batch(rows, seq, cfg.model.vocab_size)

    def ours_step() -> None:
        train_step(chunks, opt, [batch], ctx, seq_length=seq)

    cpu_compat.deactivate()
    torch.manual_seed(0)
    hf = hf_step_fn(cfg, batch)
    cpu_compat.activate()

    def hf_step() -> None:
        cpu_compat.deactivate()
        try:
            hf()
        finally:
            cpu_compat.activate()

    times: dict[str, list[float]] = {"ours": [], "hf": []}
    sides = [("ours", ours_step), ("hf", hf_step)]
    for i in range(steps + 2):
        for name, fn in sides if i % 2 == 0 else sides[::-1]:
            t0 = time.perf_counter()
            fn()
            if i >= 2:  # warm-up: allocator, autograd graph caches, optimizer state
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", default="tiny_cpu")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides (both sides)")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    times = _interleaved(args.recipe, args.rows, args.seq, args.steps, args.overrides)
    tokens = args.rows * args.seq
    ours, hf = statistics.median(times["ours"]), statistics.median(times["hf"])
    pair = sorted(h / o for o, h in zip(times["ours"], times["hf"], strict=True))
    print(
        f"recipe={args.recipe} rows={args.rows} seq={args.seq} steps={args.steps} "
        f"threads={threads} overrides={args.overrides}"
    )
    print(f"ours (megatron-core, DDP + distributed optimizer): {tokens / ours:10.0f} tokens/s")
    print(f"Hugging Face transformers (fused AdamW):          {tokens / hf:10.0f} tokens/s")
    print(
        f"ratio ours/HF: {hf / ours:.2f} (median step times; per-step-pair ratios "
        f"{pair[0]:.2f}-{pair[-1]:.2f})"
    )


if __name__ == "__main__":
    main()
