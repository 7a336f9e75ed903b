"""Log-prob parity: vLLM's sampled-token log-probs vs. the megatron trainer's recomputed ones.

A tiny random Qwen2.5-VL is built offline and served by one vLLM engine; our megatron model is
built from the same directory, its weights perturbed (so that everything the engine holds comes
from megatron) and pushed into the engine with ``weights.gather.iter_hf_weights``, exactly as
the RL weight sync does. The engine samples text and one-image prompts (temperature 1,
preprocessed pixels, thinking modes auto/long/short); megatron then rescores the sampled tokens
through the RL trainer's path (``pack_sequences`` -> ``actor.compute_logprobs``). Printed per
prompt kind (``rollout.parity.logprob_parity``): max and mean ``|logp_megatron - logp_vllm|``
and the distribution of the importance ratio ``exp(logp_megatron - logp_vllm)``.

Usage::

    python benchmarks/bench_logprob_parity.py --cpu-threads 1
    python benchmarks/bench_logprob_parity.py --dtype bfloat16   # engine bf16, megatron fp32
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run from a checkout: this repository's package, not another installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=4, help="prompts per kind (text, image)")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt and mode")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--perturb", type=float, default=0.05, help="std of the weight noise")
    parser.add_argument("--initializer-range", type=float, default=0.3)
    parser.add_argument("--dtype", default="float32", help="engine dtype (megatron: fp32)")
    parser.add_argument("--cpu-threads", type=int, default=None)
    parser.add_argument("--seq-length", type=int, default=1024, help="trainer packed row length")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from megatron_autothink.rl.rollout import cut_at_vision_tokens, vision_token_ids
    from megatron_autothink.rollout import (
        GenerationRequest,
        SamplingConfig,
        VLLMEngineConfig,
        VLLMRolloutEngine,
        format_parity,
        logprob_parity,
    )
    from megatron_autothink.rollout.images import preprocess_images
    from megatron_autothink.weights.gather import iter_hf_weights
    from tests.rollout.harness import (
        build_tiny_qwen2_5_vl,
        chat_prompt,
        megatron_model_from_hf,
        megatron_token_logprobs,
    )

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_qwen2_5_vl(
            Path(tmp) / "tiny", seed=args.seed, initializer_range=args.initializer_range
        )
        config = VLLMEngineConfig(
            model_dir=str(model_dir),
            dtype=args.dtype,
            max_model_len=args.seq_length,
            max_num_seqs=256,
            cpu_threads=args.cpu_threads,
        )
        with VLLMRolloutEngine(config) as engine, megatron_model_from_hf(model_dir) as mg:
            chunks, cfg, ctx = mg
            tok = engine.tokenizer
            gen = torch.Generator().manual_seed(args.seed)
            with torch.no_grad():
                for p in (p for c in chunks for p in c.parameters()):
                    p.add_(args.perturb * torch.randn(p.shape, generator=gen).to(p.device))
            t0 = time.perf_counter()
            update = engine.update_weights(
                iter_hf_weights(chunks, cfg.model, ctx, names="checkpoint"), version=1
            )
            sync_s = time.perf_counter() - t0

            def image(i: int) -> Any:
                w, h = [(112, 84), (84, 112), (140, 112), (112, 112)][i % 4]
                return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

            kinds: dict[str, list[GenerationRequest]] = {
                kind: [
                    GenerationRequest(
                        f"{kind}{i}-{mode}",
                        chat_prompt(tok, f"question {i}: what is {i} + {i + 3}?", num_images),
                        images=preprocess_images(str(model_dir), [image(i)])
                        if num_images
                        else None,
                        mode=mode,
                        n=args.n,
                    )
                    for i in range(args.prompts)
                    for mode in ("auto", "long", "short")
                ]
                for kind, num_images in (("text", 0), ("image", 1))
            }
            sampling = SamplingConfig(
                temperature=1.0, max_new_tokens=args.max_new_tokens, seed=args.seed
            )
            banned = vision_token_ids(tok)
            results: dict[str, Any] = {
                "dtype": args.dtype,
                "sync_s": sync_s,
                "sync_tensors": update.num_tensors,
            }
            for kind, requests in kinds.items():
                t0 = time.perf_counter()
                groups = engine.generate(requests, sampling)
                gen_s = time.perf_counter() - t0
                cuts = sum(cut_at_vision_tokens(c, banned) for g in groups for c in g)
                t0 = time.perf_counter()
                trainer = megatron_token_logprobs(
                    chunks,
                    ctx,
                    requests,
                    groups,
                    image_token_id=cfg.model.image_token_id,
                    pad_id=int(tok.pad_token_id),
                    seq_length=args.seq_length,
                )
                score_s = time.perf_counter() - t0
                report = logprob_parity([c.logprobs for g in groups for c in g], trainer)
                print(f"{kind:>5}: {format_parity(report)}", flush=True)
                results[kind] = {
                    **report,
                    "sequences": sum(len(g) for g in groups),
                    "vision_token_cuts": cuts,
                    "generate_s": gen_s,
                    "megatron_s": score_s,
                }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
