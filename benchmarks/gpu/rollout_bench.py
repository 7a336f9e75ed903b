"""Step 5 of ``run.sh``: colocated rollout on vLLM with sleep / wake and the weight sync.

The package's own pieces, in the order an RL step runs them (``rl/stage.py``): a random
Qwen2.5-VL checkpoint at the 3B width (``tests.rollout.harness.build_tiny_qwen2_5_vl``, fewer layers:
the checkpoint is built on the host within the step's limit), a :class:`VLLMRolloutEngine`
in this process, then

1. standalone: generation tokens/s of the engine alone;
2. the trainer (``megatron_model_from_hf`` -> DDP -> optimizer) built next to it, the engine put
   to sleep (GPU memory before / after), two train steps, ``colocated_weight_sync`` of the
   trainer's weights (``weights.gather.iter_hf_weights``: weights woken, pushed, trainer cache
   released, KV cache woken) -> sync seconds;
3. colocated: generation tokens/s again, now with both resident.

Without a CUDA vLLM the step reports ``absent`` (with what was tried). In dry mode the CPU
vLLM runs a tiny model when ``GPU_BENCH_DRY_VLLM=1`` (its start alone takes ~30 s on 2 cores);
otherwise the step writes a labelled skip.

    python -m benchmarks.gpu.rollout_bench --out OUT
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu.common import dry_mode, exit_now, sync, write_json

NAME = "5_rollout"


def probe_vllm() -> tuple[bool, list[str]]:
    """Whether a vLLM that can serve this machine imports; the routes tried."""
    tried = []
    try:
        vllm = importlib.import_module("vllm")
        from vllm.platforms import current_platform

        kind = "cpu" if current_platform.is_cpu() else str(current_platform.device_type)
        tried.append(f"import vllm: ok ({getattr(vllm, '__version__', '?')}, platform {kind})")
    except Exception as e:
        tried.append(f"import vllm: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        tried.append(
            "carrying it: a CUDA vLLM wheel is ~321 MB (earlier reading) and pins its own torch "
            "(would replace the machine's); over the 64 MiB carry limit"
        )
        return False, tried
    want = "cpu" if dry_mode() else "cuda"
    if kind != want:
        tried.append(f"platform {kind}, this run needs {want}")
        return False, tried
    return True, tried


def gen_rate(engine: Any, requests: list[Any], sampling: Any) -> dict[str, float]:
    sync()
    t0 = time.perf_counter()
    groups = engine.generate(requests, sampling)
    sync()
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for g in groups for c in g)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def text_batch(model_dir: Path, seq: int, vocab: int) -> Any:
    """One text-only training row for the checkpoint's model (its image-pad id never drawn)."""
    import torch

    from tests.models.model_utils import synthetic_batch

    pad = json.loads((model_dir / "config.json").read_text())["image_token_id"]
    b = synthetic_batch(1, seq, vocab, seed=0, with_image=False)
    b.tokens[b.tokens == pad] = 10
    b.labels = torch.roll(b.tokens, -1, dims=1)
    return b


def gpu_used_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def run(out: str) -> dict[str, Any]:
    from megatron_autothink.rl.stage import release_trainer_memory
    from megatron_autothink.rollout import GenerationRequest, SamplingConfig
    from megatron_autothink.rollout.engine import colocated_weight_sync
    from megatron_autothink.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine
    from tests.rollout.harness import (
        build_tiny_qwen2_5_vl,
        chat_prompt,
        megatron_model_from_hf,
    )

    dry = dry_mode()
    # (hidden, layers, heads, kv_heads, ffn, vocab): the 3B width (recipes/r4b_bpo_3b.yaml) at
    # 4 of its 36 layers on GPU; tiny on CPU.
    hidden, layers, heads, kv, ffn, vocab = (
        (128, 2, 4, 2, 256, 1024) if dry else (2048, 4, 16, 2, 11008, 151936)
    )
    prompts, n, new_tokens = (4, 2, 16) if dry else (64, 4, 256)
    data: dict[str, Any] = {
        "shape": {
            "hidden": hidden,
            "layers": layers,
            "heads": heads,
            "kv_heads": kv,
            "ffn": ffn,
            "vocab": vocab,
        },
        "reduced": None if dry else "4 of the 3B recipe's 36 layers (checkpoint built on the host)",
        "requests": {"prompts": prompts, "n": n, "max_new_tokens": new_tokens},
    }
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model_dir = build_tiny_qwen2_5_vl(
            Path(tmp) / "m",
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv,
            intermediate_size=ffn,
            vocab_size=vocab,
            tie_word_embeddings=True,
        )
        data["build_checkpoint_s"] = time.perf_counter() - t0
        config = VLLMEngineConfig(
            model_dir=str(model_dir),
            dtype="float32" if dry else "bfloat16",
            max_model_len=1024,
            max_num_seqs=256,
            gpu_memory_utilization=0.4,
            sleep_level=1,
        )
        mem: dict[str, float | None] = {"before_engine": gpu_used_gib()}
        with VLLMRolloutEngine(config) as engine:
            data["engine_start_s"] = engine.start_seconds
            mem["engine_up"] = gpu_used_gib()
            tok = engine.tokenizer
            requests = [
                GenerationRequest(f"p{i}", chat_prompt(tok, f"question {i}"), n=n)
                for i in range(prompts)
            ]
            sampling = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens, seed=0)
            engine.generate(requests[:2], SamplingConfig(max_new_tokens=4))  # warm-up
            data["standalone"] = gen_rate(engine, requests, sampling)
            with megatron_model_from_hf(model_dir) as (chunks, cfg, ctx):
                from megatron_autothink.train.setup import build_optimizer, wrap_ddp
                from megatron_autothink.train.step import train_step
                from megatron_autothink.weights.gather import iter_hf_weights

                chunks = wrap_ddp(cfg, chunks, ctx)
                opt = build_optimizer(cfg, chunks, ctx, total_steps=4)
                mem["trainer_built"] = gpu_used_gib()
                t0 = time.perf_counter()
                engine.sleep()
                sync()
                data["sleep_s"] = time.perf_counter() - t0
                mem["engine_asleep"] = gpu_used_gib()
                batch = text_batch(model_dir, 256, vocab)
                losses = [
                    train_step(chunks, opt, [batch], ctx, seq_length=256).loss for _ in range(2)
                ]
                mem["after_train_steps"] = gpu_used_gib()
                t0 = time.perf_counter()
                update = colocated_weight_sync(
                    engine,
                    iter_hf_weights(chunks, cfg.model, ctx, names="checkpoint"),
                    engine.policy_version + 1,
                    release_trainer_memory=release_trainer_memory,
                )
                sync()
                data["sync"] = {
                    "seconds": time.perf_counter() - t0,
                    "update_weights_s": update.seconds,
                    "bytes": update.num_bytes,
                    "tensors": update.num_tensors,
                    "buckets": update.num_buckets,
                    "gb_per_s": update.num_bytes / 1e9 / update.seconds,
                }
                mem["after_sync_awake"] = gpu_used_gib()
                data["train_losses"] = losses
                data["colocated"] = gen_rate(engine, requests, sampling)
                data["policy_version_after_sync"] = engine.policy_version
                del opt, chunks
        data["gpu_used_gib"] = mem
        data["colocated_over_standalone"] = (
            data["colocated"]["tokens_per_s"] / data["standalone"]["tokens_per_s"]
        )
    data["status"] = "ok"
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if dry_mode() and os.environ.get("GPU_BENCH_DRY_VLLM", "0") in ("", "0"):
        path = write_json(
            args.out,
            NAME,
            {
                "status": "skipped",
                "why": "dry run: the CPU vLLM start alone takes ~30 s on 2 cores, over the dry "
                "test's budget; GPU_BENCH_DRY_VLLM=1 runs the tiny colocated rollout",
            },
        )
        print(f"{path}: skipped (dry; GPU_BENCH_DRY_VLLM=1 runs it)")
        return
    ok, tried = probe_vllm()
    if not ok:
        path = write_json(args.out, NAME, {"status": "absent", "tried": tried})
        print(f"{path}: absent ({tried[0]})")
        return
    data = run(args.out)
    data["tried"] = tried
    path = write_json(args.out, NAME, data)
    print(
        f"{path}: standalone {data['standalone']['tokens_per_s']:.0f} tok/s, colocated "
        f"{data['colocated']['tokens_per_s']:.0f} tok/s, sync {data['sync']['seconds']:.3f} s"
    )


if __name__ == "__main__":
    main()
    exit_now()
