"""A real S3 round trip against moto's standalone server on 127.0.0.1: prep -> shards -> loader."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from megatron_autothink.data.digits import prep_digits
from megatron_autothink.data.loader import LoaderConfig, build_packed_loader
from megatron_autothink.data.shards import PrepError, PrepOptions, prep_shards

BUCKET = "autothink-test"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "MSC_CONFIG")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    resp = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def test_digits_round_trip(s3_endpoint: str, tokenizer: Any) -> None:
    url = f"s3://{BUCKET}/digits"
    reports = prep_digits(
        url, n_train=24, n_test=8, max_shard_size=50_000, s3_endpoint=s3_endpoint, progress=False
    )
    assert reports["train"].written == 24  # type: ignore[attr-defined]
    keys = _keys(s3_endpoint, "digits/")
    assert "digits/.nv-meta/split.yaml" in keys and "digits/.autothink/manifest.json" in keys
    assert "digits/tokenizer/tokenizer.json" in keys
    assert sum(k.endswith(".tar") for k in keys) >= 3 and not any(".partial" in k for k in keys)
    with pytest.raises(PrepError, match="already complete"):
        prep_digits(url, n_train=24, n_test=8, max_shard_size=50_000, s3_endpoint=s3_endpoint)

    cfg = LoaderConfig(
        path=url,
        split="test",
        training=False,
        seq_length=256,
        micro_batch_size=2,
        s3_endpoint=s3_endpoint,
        gc_every_n_batches=0,
    )
    loader = build_packed_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1)
    ids = sorted(i for b in loader for row in b.sample_ids for i in row)
    assert ids == [f"digits-test-{i:07d}" for i in range(8)]

    train = build_packed_loader(
        LoaderConfig(
            path=url,
            seq_length=256,
            micro_batch_size=2,
            s3_endpoint=s3_endpoint,
            num_workers=1,
            shuffle_buffer_size=8,
            packing_buffer_size=8,
            gc_every_n_batches=0,
        ),
        tokenizer,
        dp_rank=0,
        dp_world_size=1,
    )
    batch = next(train)  # a forked worker reads from S3 too
    assert batch.tokens.shape == (2, 256) and batch.pixel_values is not None


def test_jsonl_to_s3(s3_endpoint: str, tokenizer: Any, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    rows = [
        {
            "id": f"j{i}",
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat color?"},
                {"from": "gpt", "value": "Red."},
            ],
        }
        for i in range(6)
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{bad\n")
    url = f"s3://{BUCKET}/llava"
    report = prep_shards(
        [tmp_path / "d.jsonl"],
        url,
        PrepOptions(s3_endpoint=s3_endpoint, max_error_rate=0.2, progress=False),
    )
    assert report.written == 6 and report.skipped == {"malformed_json": 1}
    cfg = LoaderConfig(
        path=url,
        training=False,
        seq_length=512,
        micro_batch_size=1,
        s3_endpoint=s3_endpoint,
        gc_every_n_batches=0,
    )
    batches = list(build_packed_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1))
    assert sorted(i for b in batches for row in b.sample_ids for i in row) == [
        f"j{i}" for i in range(6)
    ]
    # Plain answers were given the empty think block: all non-thinking.
    assert {m for b in batches for m in b.mode_ids.unique().tolist()} == {-1, 0}
