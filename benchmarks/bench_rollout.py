"""Rollout benchmark: generation tokens/s and weight-sync seconds vs model size.

Random Qwen2.5-VL checkpoints of several sizes are built offline; each size runs in its own
Python process (a fresh vLLM engine, clean memory) and reports one JSON line:

* ``gen_text_tok_s`` / ``gen_image_tok_s``: generated tokens per second for a batch of text
  (resp. one-image) prompts, ``n`` samples each, temperature 1.0 (first call excluded: it pays
  one-off kernel warm-up);
* ``sync_s``: median seconds of ``update_weights`` pushing the full model (HF names, streamed in
  ``--bucket-mb`` buckets, cache resets included) and the implied GB/s.

Usage::

    python benchmarks/bench_rollout.py                       # tiny, small, medium, large
    python benchmarks/bench_rollout.py --sizes tiny --multiprocess --cpu-threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run from a checkout: this repository's package, not another installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Registers our Qwen2.5-VL architecture at import, also in processes vLLM spawns (--multiprocess).
import megatron_autothink.rollout.vllm_worker  # noqa: F401

# name -> (hidden, layers, heads, kv_heads, intermediate)
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (128, 4, 4, 2, 256),
    "small": (512, 8, 8, 4, 1408),
    "medium": (1024, 12, 16, 8, 2816),
    "large": (2048, 16, 16, 8, 5632),
}


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Build one checkpoint, start one engine, measure; runs in a child process."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from megatron_autothink.rollout import (
        GenerationRequest,
        SamplingConfig,
        VLLMEngineConfig,
        VLLMRolloutEngine,
    )
    from tests.rollout.harness import build_tiny_qwen2_5_vl, chat_prompt

    hidden, layers, heads, kv_heads, inter = SIZES[args.one]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model_dir = build_tiny_qwen2_5_vl(
            Path(tmp) / args.one,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            intermediate_size=inter,
            initializer_range=0.3 if args.one == "tiny" else 0.02,
        )
        build_s = time.perf_counter() - t0
        weights = load_file(str(model_dir / "model.safetensors"))
        num_params = sum(t.numel() for t in weights.values())
        config = VLLMEngineConfig(
            model_dir=str(model_dir),
            dtype=args.dtype,
            max_model_len=1024,
            max_num_seqs=256,
            weight_bucket_mb=args.bucket_mb,
            in_process=not args.multiprocess,
            cpu_kvcache_space_gib=args.kv_gib,
            cpu_threads=args.cpu_threads,
        )
        with VLLMRolloutEngine(config) as engine:
            tok = engine.tokenizer
            sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
            text = [
                GenerationRequest(f"t{i}", chat_prompt(tok, f"question number {i}"), n=args.n)
                for i in range(args.prompts)
            ]
            rng = np.random.default_rng(0)
            images = [
                Image.fromarray(rng.integers(0, 256, (84, 112, 3), dtype=np.uint8))
                for _ in range(args.prompts // 2)
            ]
            image = [
                GenerationRequest(f"i{i}", chat_prompt(tok, "describe", 1), images=[im], n=args.n)
                for i, im in enumerate(images)
            ]
            engine.generate(text[:2], SamplingConfig(max_new_tokens=8))  # warm-up
            result: dict[str, Any] = {
                "size": args.one,
                "params_m": num_params / 1e6,
                "dtype": args.dtype,
                "build_s": build_s,
                "start_s": engine.start_seconds,
                "in_process": not args.multiprocess,
                "cpu_threads": args.cpu_threads,
            }
            if args.one in args.generate_sizes.split(","):
                for name, requests in (("text", text), ("image", image)):
                    t0 = time.perf_counter()
                    groups = engine.generate(requests, sampling)
                    seconds = time.perf_counter() - t0
                    tokens = sum(len(c.token_ids) for g in groups for c in g)
                    result[f"gen_{name}_tokens"] = tokens
                    result[f"gen_{name}_s"] = seconds
                    result[f"gen_{name}_tok_s"] = tokens / seconds
            sync = []
            for i in range(args.repeats):
                factor = 1.0 + 0.01 * (i + 1)
                stream = ((k, v * factor) for k, v in weights.items())
                t0 = time.perf_counter()
                update = engine.update_weights(stream, version=engine.policy_version + 1)
                sync.append(time.perf_counter() - t0)
            # The scaled copies above are made lazily inside the stream; time the plain push too.
            t0 = time.perf_counter()
            update = engine.update_weights(iter(weights.items()), engine.policy_version + 1)
            plain = time.perf_counter() - t0
            result.update(
                sync_bytes=update.num_bytes,
                sync_buckets=update.num_buckets,
                sync_s=plain,
                sync_gb_s=update.num_bytes / 1e9 / plain,
                sync_with_producer_s=statistics.median(sync),
                torch_threads=torch.get_num_threads(),
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,small,medium,large")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--kv-gib", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--multiprocess", action="store_true", help="vLLM engine core in a child")
    parser.add_argument(
        "--generate-sizes", default="tiny,small", help="sizes whose generation speed is measured"
    )
    parser.add_argument(
        "--cpu-threads", type=int, default=None, help="torch threads (VLLMEngineConfig.cpu_threads)"
    )
    parser.add_argument("--one", choices=sorted(SIZES), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:  # child: one size
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    results = []
    for size in args.sizes.split(","):
        cmd = [sys.executable, __file__, "--one", size, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{size}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1][len("RESULT ") :]))
        print(json.dumps(results[-1]), flush=True)

    print(
        f"\n{'size':>7} {'params':>8} {'MB':>7} {'start s':>8} {'text tok/s':>10} "
        f"{'image tok/s':>11} {'sync s':>7} {'GB/s':>6} {'buckets':>7}"
    )
    for r in results:
        print(
            f"{r['size']:>7} {r['params_m']:>7.1f}M {r['sync_bytes'] / 1e6:>7.1f} "
            f"{r['start_s']:>8.1f} {r.get('gen_text_tok_s', float('nan')):>10.0f} "
            f"{r.get('gen_image_tok_s', float('nan')):>11.0f} {r['sync_s']:>7.3f} "
            f"{r['sync_gb_s']:>6.2f} {r['sync_buckets']:>7}"
        )


if __name__ == "__main__":
    main()
