"""Training throughput: our megatron-core VLM vs. Hugging Face transformers, same model, same batch.

Both sides train the same Qwen2.5-VL-architecture model (sizes from a recipe, default tiny_cpu)
on the same token/image batch (every row: one image + text, full length, causal), fp32 on CPU,
AdamW (fused kernel on both sides), one optimizer step per batch. Ours runs the real path: megatron DDP + distributed
optimizer + ``get_forward_backward_func`` schedule. Prints tokens/s of each and the ratio.

    python benchmarks/bench_train.py [--recipe tiny_cpu] [--steps 8] [--rows 4] [--seq 512]
        [KEY=VALUE ...]   # dotted config overrides for both sides, e.g. model.hidden_size=512
"""

from __future__ import annotations

import argparse
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


def bench_hf(cfg, batch, steps: int) -> float:  # type: ignore[no-untyped-def]
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
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return batch.tokens.numel() / (sum(times) / len(times))


def _ours(
    recipe: str, rows: int, seq: int, steps: int, threads: int, overrides: list[str]
) -> float:
    torch.set_num_threads(threads)  # the spawn helper pins 1 thread; match the HF side
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
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        train_step(chunks, opt, [batch], ctx, seq_length=seq)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return batch.tokens.numel() / (sum(times) / len(times))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", default="tiny_cpu")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides (both sides)")
    args = ap.parse_args()
    from megatron_autothink.config import load_config
    from tests.dist_utils import run_distributed

    threads = torch.get_num_threads()
    cfg = load_config(args.recipe, args.overrides)
    (ours,) = run_distributed(
        _ours, 1, args.recipe, args.rows, args.seq, args.steps, threads, args.overrides
    )
    torch.manual_seed(0)
    hf = bench_hf(cfg, make_batch(args.rows, args.seq, cfg.model.vocab_size), args.steps)
    print(
        f"recipe={args.recipe} rows={args.rows} seq={args.seq} steps={args.steps} "
        f"threads={torch.get_num_threads()} overrides={args.overrides}"
    )
    print(f"ours (megatron-core, DDP + distributed optimizer): {ours:10.0f} tokens/s")
    print(f"Hugging Face transformers (fused AdamW):          {hf:10.0f} tokens/s")
    print(f"ratio ours/HF: {ours / hf:.2f}")


if __name__ == "__main__":
    main()
