"""Read the records of a W&B run file (``run-<id>.wandb``) without a server.

wandb 0.31 writes runs from its Go core and no longer ships a Python reader (the old
``wandb.sdk.internal.datastore`` is gone), so this is the file format in a few lines: a 7-byte
header (``:W&B``, magic 0xBEE1, version), then LevelDB-log records in 32 KiB blocks, each a
7-byte header (CRC-32 of type + payload, length, type FULL/FIRST/MIDDLE/LAST) and a chunk of a
serialized ``wandb_internal_pb2.Record`` (wandb's own protobuf schema, used to decode).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[Any]:
    """Every ``Record`` in the file, checksums verified."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", raw[:HEADER])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B run file"
    pos, payload = HEADER, b""
    while pos + HEADER <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos : pos + HEADER])
        if (crc, length, kind) == (0, 0, 0):  # zero padding to the end of the block
            pos += left
            continue
        chunk = raw[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum in {path}"
        payload = chunk if kind in (FULL, FIRST) else payload + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record


def history(path: Path) -> dict[int, dict[str, Any]]:
    """Logged rows by step: ``{step: {key: value}}``."""
    out: dict[int, dict[str, Any]] = {}
    for r in read_records(path):
        if r.WhichOneof("record_type") == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            out.setdefault(r.history.step.num, {}).update(row)
    return out
