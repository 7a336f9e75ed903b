"""Loader throughput and packing efficiency (prints figures; asserts nothing).

Datasets (built in a temp dir):
  * digits: ``prep digits`` (images of 1-5 handwritten digits, short answers), and
  * mixed: a synthetic LLaVA-style JSONL with heavy-tailed answer lengths (20-450 tokens) and
    20% images of random size, through ``prep shards``.

For each dataset, storage (local folder / S3 on moto's in-process server at 127.0.0.1) and
worker count, the packed loader runs ``--warmup`` batches (fork, buffer fill) and then
``--batches`` timed batches, ``--repeats`` times (the median is printed: the figures are
noisy on a shared machine). Figures: samples/s, non-pad tokens/s, packing efficiency (non-pad /
total tokens). A second table shows packing efficiency against the packing buffer.

Usage::

    python benchmarks/bench_loader.py [--batches 40 --workers 1,2 --no-s3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_autothink.data.digits import prep_digits
from megatron_autothink.data.loader import LoaderConfig, build_packed_loader
from megatron_autothink.data.shards import PrepOptions, prep_shards
from megatron_autothink.data.tokenizer import load_tokenizer

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "image",
    "picture",
    "shows",
    "a",
    "large",
    "small",
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "car",
    "tree",
    "house",
    "person",
    "left",
    "right",
    "top",
    "bottom",
    "count",
    "number",
    "answer",
    "because",
    "there",
    "are",
    "two",
    "three",
]


def make_mixed_jsonl(folder: Path, n: int, seed: int = 0) -> Path:
    """Heavy-tailed answer lengths, 20% images of random size."""
    from PIL import Image

    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        n_words = int(min(400, max(10, rng.lognormvariate(3.6, 0.8))))
        answer = " ".join(rng.choice(WORDS) for _ in range(n_words))
        mode_think = rng.random() < 0.5
        content = (
            f"<think>\n{' '.join(rng.choice(WORDS) for _ in range(n_words // 2))}\n</think>\n\n"
            if mode_think
            else "<think>\n\n</think>\n\n"
        ) + answer
        rec: dict[str, Any] = {
            "id": f"mixed-{i}",
            "conversations": [
                {"from": "human", "value": "Describe it: " + " ".join(rng.sample(WORDS, 6))},
                {"from": "gpt", "value": content},
            ],
        }
        if rng.random() < 0.2:
            h, w = rng.randint(28, 300), rng.randint(28, 300)
            name = f"img/{i}.png"
            Image.fromarray(nprng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
            rec["image"] = name
        lines.append(json.dumps(rec))
    path = folder / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def measure(cfg: LoaderConfig, tokenizer: Any, warmup: int, batches: int) -> dict[str, float]:
    with build_packed_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1) as loader:
        t0 = time.perf_counter()
        for _ in range(warmup):
            next(loader)
        startup = time.perf_counter() - t0
        samples = tokens = total = 0
        t0 = time.perf_counter()
        for _ in range(batches):
            b = next(loader)
            samples += sum(len(r) for r in b.sample_ids)
            tokens += b.num_tokens
            total += b.tokens.numel()
        dt = time.perf_counter() - t0
    return {
        "startup_s": startup,
        "samples_s": samples / dt,
        "tokens_s": tokens / dt,
        "efficiency": tokens / total,
        "samples_per_row": samples / (batches * cfg.micro_batch_size),
    }


def start_s3() -> tuple[Any, str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return server, endpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--digits", type=int, default=3000, help="digits training samples")
    ap.add_argument("--mixed", type=int, default=2000, help="mixed-length samples")
    ap.add_argument("--batches", type=int, default=40, help="timed batches per config")
    ap.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    ap.add_argument("--workers", default="0,1,2", help="worker counts, comma separated")
    ap.add_argument("--repeats", type=int, default=3, help="runs per config; the median is printed")
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    workers = [int(w) for w in args.workers.split(",")]

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"commit: {commit or '?'}   command: {' '.join(sys.argv)}")

    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    t0 = time.perf_counter()
    prep_digits(str(tmp / "digits"), n_train=args.digits, n_test=0, progress=False)
    print(f"prep digits: {args.digits} samples in {time.perf_counter() - t0:.1f} s")
    tokenizer = load_tokenizer(str(tmp / "digits" / "tokenizer"))
    jsonl = make_mixed_jsonl(tmp / "mixed_src", args.mixed)
    t0 = time.perf_counter()
    prep_shards([jsonl], str(tmp / "mixed"), PrepOptions(progress=False))
    print(f"prep shards (mixed): {args.mixed} samples in {time.perf_counter() - t0:.1f} s")

    locations = {"digits": {"local": str(tmp / "digits")}, "mixed": {"local": str(tmp / "mixed")}}
    endpoint = None
    server = None
    if not args.no_s3:
        server, endpoint = start_s3()
        t0 = time.perf_counter()
        prep_digits(
            "s3://bench/digits",
            n_train=args.digits,
            n_test=0,
            s3_endpoint=endpoint,
            progress=False,
            save_tokenizer=False,
        )
        prep_shards([jsonl], "s3://bench/mixed", PrepOptions(progress=False, s3_endpoint=endpoint))
        print(f"prep to S3 (both sets): {time.perf_counter() - t0:.1f} s")
        locations["digits"]["s3"] = "s3://bench/digits"
        locations["mixed"]["s3"] = "s3://bench/mixed"

    print(
        f"\nthroughput: seq_length={args.seq_length}, micro_batch_size={args.micro_batch_size}, "
        f"{args.batches} timed batches after {args.warmup} warm-up batches, median of "
        f"{args.repeats} runs; load average before: {os.getloadavg()[0]:.1f}"
    )
    header = f"{'dataset':8} {'storage':7} {'workers':>7} {'startup s':>9} {'samples/s':>10} "
    header += f"{'tokens/s':>10} {'packing':>8} {'samples/row':>11}"
    print(header)
    for name, where in locations.items():
        for storage, path in where.items():
            for w in workers:
                cfg = LoaderConfig(
                    path=path,
                    seq_length=args.seq_length,
                    micro_batch_size=args.micro_batch_size,
                    num_workers=w,
                    s3_endpoint=endpoint,
                )
                runs = [
                    measure(cfg, tokenizer, args.warmup, args.batches) for _ in range(args.repeats)
                ]
                r = {k: float(np.median([run[k] for run in runs])) for k in runs[0]}
                print(
                    f"{name:8} {storage:7} {w:>7} {r['startup_s']:>9.1f} {r['samples_s']:>10.1f} "
                    f"{r['tokens_s']:>10.0f} {r['efficiency']:>8.1%} {r['samples_per_row']:>11.2f}"
                )

    print("\npacking efficiency (non-pad / total) vs packing buffer (0 workers, local):")
    print(f"{'dataset':8} " + " ".join(f"{'buf=' + str(b):>8}" for b in (8, 32, 128, 512)))
    for name, where in locations.items():
        effs = []
        for buf in (8, 32, 128, 512):
            cfg = LoaderConfig(
                path=where["local"],
                seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size,
                packing_buffer_size=buf,
            )
            effs.append(measure(cfg, tokenizer, 2, 30)["efficiency"])
        print(f"{name:8} " + " ".join(f"{e:>8.1%}" for e in effs))
    if server is not None:
        server.stop()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
