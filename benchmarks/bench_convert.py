#!/usr/bin/env python
"""Conversion speed on random Qwen2.5-VL-shaped checkpoints (CPU, one process).

For each config: write a random HF checkpoint straight from the mapping table (streamed into
sharded safetensors, no transformers model init), then time

* ``hf-to-mcore``: validate, build our model (megatron's CPU init included), load, save the
  megatron dist-checkpoint;
* ``mcore-to-hf``: build, load the dist-checkpoint, stream through ``iter_hf_weights``, write
  sharded safetensors + config/tokenizer files;
* ``iter_hf_weights`` alone on a loaded model (the rollout weight-sync path, TP=PP=1).

Each config runs in a fresh subprocess (clean process groups; honest peak RSS). Usage::

    python benchmarks/bench_convert.py                 # tiny, small, medium
    python benchmarks/bench_convert.py --configs tiny,small,medium,large --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS: dict[str, dict[str, Any]] = {
    # name: language (layers, hidden, ffn, heads, kv, vocab), vision (depth, hidden, ffn, heads)
    "tiny": {"lm": (2, 96, 152, 4, 2, 1100), "vit": (2, 48, 88, 4)},
    "small": {"lm": (8, 512, 1408, 8, 2, 32000), "vit": (4, 256, 688, 8)},
    "medium": {"lm": (16, 1024, 2816, 16, 2, 65536), "vit": (8, 512, 1376, 8)},
    "large": {"lm": (24, 1536, 8960, 12, 2, 151936), "vit": (16, 1024, 2752, 16)},
}


def model_config(name: str) -> Any:
    from megatron_autothink.config import ModelConfig, VisionConfig

    layers, hidden, ffn, heads, kv, vocab = CONFIGS[name]["lm"]
    depth, vh, vffn, vheads = CONFIGS[name]["vit"]
    half = hidden // heads // 2
    mrope = [half // 4, (half - half // 4) // 2]
    mrope.append(half - sum(mrope))
    return ModelConfig(
        name=name,
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=kv,
        vocab_size=vocab,
        mrope_section=mrope,
        tie_word_embeddings=False,
        image_token_id=7,
        transformer_impl="local",
        vision=VisionConfig(
            depth=depth,
            hidden_size=vh,
            intermediate_size=vffn,
            num_heads=vheads,
            window_size=112,
            fullatt_block_indexes=[depth - 1],
        ),
    )


def write_random_hf(cfg: Any, out: Path, dtype: Any) -> int:
    """Random weights for ``cfg`` in HF layout, streamed; returns the parameter count."""
    import torch

    from megatron_autothink.weights.hf_config import hf_config_from_model
    from megatron_autothink.weights.hf_io import ShardedSafetensorsWriter
    from megatron_autothink.weights.mapping import checkpoint_hf_name, weight_specs

    writer = ShardedSafetensorsWriter(out, max_shard_bytes=2 * 10**9)
    count = 0
    for spec in weight_specs(cfg):
        for name, shape in zip(spec.hf, spec.hf_shapes, strict=True):
            t = torch.randn(shape, dtype=torch.float32).mul_(0.02).to(dtype)
            writer.add(checkpoint_hf_name(name), t)
            count += t.numel()
    writer.close()
    hf_config_from_model(cfg, dtype=str(dtype).removeprefix("torch.")).save_pretrained(out)
    return count


def run_one(name: str, dtype_name: str, workdir: Path) -> dict[str, Any]:
    import torch

    from megatron_autothink.convert.hf_to_mcore import hf_to_mcore
    from megatron_autothink.convert.mcore_to_hf import mcore_to_hf
    from megatron_autothink.convert.runtime import conversion_context
    from megatron_autothink.train.setup import build_model_chunks
    from megatron_autothink.weights.gather import iter_hf_weights
    from megatron_autothink.weights.hf_io import HFCheckpoint
    from megatron_autothink.weights.load import load_hf_weights

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, dtype_name)
    cfg = model_config(name)
    hf, mc, back = workdir / "hf", workdir / "mcore", workdir / "back"
    t = time.perf_counter()
    n_params = write_random_hf(cfg, hf, dtype)
    gen_s = time.perf_counter() - t
    size_gb = sum(p.stat().st_size for p in hf.glob("*.safetensors")) / 1e9

    t = time.perf_counter()
    hf_to_mcore(hf, mc, progress=False)
    to_mcore_s = time.perf_counter() - t

    t = time.perf_counter()
    mcore_to_hf(mc, back, max_shard_size="2GB", progress=False)
    to_hf_s = time.perf_counter() - t

    precision: Literal["fp32", "bf16"] = "bf16" if dtype == torch.bfloat16 else "fp32"
    with conversion_context(cfg, precision=precision) as (run_cfg, ctx):
        chunks = build_model_chunks(run_cfg, ctx, vocab_size=cfg.vocab_size, image_token_id=7)
        load_hf_weights(chunks, HFCheckpoint(hf), cfg, ctx)
        t = time.perf_counter()
        n_sync = sum(1 for _ in iter_hf_weights(chunks, cfg, ctx))
        sync_s = time.perf_counter() - t

    # Spot check: the round trip is bit-exact.
    a, b = HFCheckpoint(hf), HFCheckpoint(back)
    exact = set(a) == set(b) and all(
        torch.equal(a[k], b[k]) for k in list(a)[:: max(1, len(a) // 20)]
    )
    return {
        "config": name,
        "dtype": dtype_name,
        "params_M": round(n_params / 1e6, 1),
        "size_GB": round(size_gb, 3),
        "write_random_hf_s": round(gen_s, 2),
        "hf_to_mcore_s": round(to_mcore_s, 2),
        "mcore_to_hf_s": round(to_hf_s, 2),
        "iter_hf_weights_s": round(sync_s, 3),
        "tensors": n_sync,
        "roundtrip_exact": exact,
        "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", default="tiny,small,medium", help=f"comma list of {list(CONFIGS)}"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--workdir", default=None, help="scratch dir (default: a temp dir)")
    args = parser.parse_args()

    if args.one:  # child: one config, JSON on the last stdout line
        print(json.dumps(run_one(args.one, args.dtype, Path(args.workdir))), flush=True)
        return 0

    rows = []
    for name in args.configs.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"bench_convert_{name}_", dir=args.workdir))
        try:
            cmd = [sys.executable, "-W", "ignore", __file__, "--one", name, "--dtype", args.dtype]
            res = subprocess.run(
                [*cmd, "--workdir", str(work)],
                capture_output=True,
                text=True,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
            )
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
                return res.returncode
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    cols = [
        "config",
        "params_M",
        "size_GB",
        "hf_to_mcore_s",
        "mcore_to_hf_s",
        "iter_hf_weights_s",
        "roundtrip_exact",
        "peak_rss_GB",
    ]
    print()
    print(" | ".join(f"{c:>17}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]!s:>17}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
