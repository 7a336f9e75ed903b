"""Readers of conversation data for shard preparation: LLaVA / ShareGPT JSONL and JSON, Parquet.

Each reader yields :class:`SourceItem` records from a cursor on (so a resumed prep run skips
cheaply); :func:`record_to_sample` validates one record into the schema, and a record that
cannot be read or validated becomes a :class:`BadRecord` with a reason code and its location
(file and line or row), which the shard writer (:mod:`megatron_autothink.data.shards`) counts
and reports.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from megatron_autothink.data.schema import IMAGE_PLACEHOLDER, Sample

Reason = Literal[
    "malformed_json",
    "invalid_schema",
    "no_assistant_turn",
    "missing_image",
    "bad_image",
    "too_long",
]


class BadRecord(Exception):
    """A record that is skipped, with the reason code reported in the summary."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: Reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class SourceItem:
    """One input record as produced by a reader.

    Attributes:
        cursor: Position to resume AFTER this record (monotonic within a run).
        location: Human-readable location, e.g. ``data.jsonl:17`` or ``x.parquet#row3``.
        payload: A raw record dict, a ready :class:`Sample`, or the error that made it unreadable.
        base_dir: Folder that relative image paths are resolved against.
        source: Default source tag for samples that have none.
    """

    cursor: tuple[int, int]
    location: str
    payload: dict[str, Any] | Sample | BadRecord
    base_dir: str
    source: str | None


#: A source yields items from a cursor on (so a resumed run skips cheaply).
SourceFn = Callable[[tuple[int, int]], Iterator[SourceItem]]


def _normalize_images(value: Any) -> list[str | bytes]:
    """Image field of a record -> list of paths or bytes (HF datasets dicts included)."""
    if value is None:
        return []
    items = value if isinstance(value, list | tuple) else [value]
    out: list[str | bytes] = []
    for item in items:
        if isinstance(item, dict):  # HF `datasets.Image` layout: {"bytes": ..., "path": ...}
            item = item.get("bytes") or item.get("path")
        if isinstance(item, bytearray | memoryview):
            item = bytes(item)
        if not isinstance(item, str | bytes):
            raise BadRecord("invalid_schema", f"unsupported image entry of type {type(item)}")
        out.append(item)
    return out


_ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_ROLE_MAP["system"] = "system"
_PASSTHROUGH = ("answer", "answer_type", "mode", "difficulty", "source", "responses")


_NUMBER_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(/\d+)?%?$")
_CHOICE_RE = re.compile(r"^\(?[A-Ha-h]\)?$")


def infer_answer_type(answer: str) -> str:
    """Guess ``answer_type`` for records that give an answer without one.

    Example:
        >>> [infer_answer_type(a) for a in ("42", "-3/4", "(B)", "x^2+1", "a cat")]
        ['number', 'number', 'choice', 'text', 'text']
    """
    text = answer.strip().replace(",", "")
    if _NUMBER_RE.match(text):
        return "number"
    if _CHOICE_RE.match(text):
        return "choice"
    return "text"


def record_to_sample(record: dict[str, Any], *, fallback_id: str, source: str | None) -> Sample:
    """Convert a LLaVA/ShareGPT (or native schema) record into a :class:`Sample`.

    Accepts ``conversations`` as ``[{"from": "human"|"gpt"|"system", "value": ...}]`` or
    ``[{"role": ..., "content": ...}]`` (a JSON string in Parquet is fine, for ``responses`` too),
    images under ``image`` or ``images``. Without any ``<image>`` placeholder the missing ones are put in front
    of the first user turn (LLaVA's convention). An ``answer`` without ``answer_type`` gets one
    from :func:`infer_answer_type`. Unknown top-level keys are ignored.

    Raises:
        BadRecord: ``invalid_schema`` / ``no_assistant_turn`` (the latter decided by the caller).
    """
    convs = record.get("conversations", record.get("messages"))
    if isinstance(convs, str):
        try:
            convs = json.loads(convs)
        except json.JSONDecodeError as e:
            raise BadRecord("invalid_schema", f"conversations is not valid JSON: {e}") from e
    if not isinstance(convs, list) or not convs:
        raise BadRecord("invalid_schema", "missing or empty 'conversations'")
    turns = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise BadRecord("invalid_schema", f"conversations[{i}] is not an object")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role not in _ROLE_MAP or not isinstance(content, str):
            raise BadRecord("invalid_schema", f"conversations[{i}]: bad role {role!r} or content")
        turns.append({"role": _ROLE_MAP[role], "content": content})
    images = _normalize_images(record.get("images", record.get("image")))
    n_placeholders = sum(t["content"].count(IMAGE_PLACEHOLDER) for t in turns)
    if images and n_placeholders == 0:
        first_user = next((t for t in turns if t["role"] == "user"), None)
        if first_user is not None:
            first_user["content"] = (IMAGE_PLACEHOLDER + "\n") * len(images) + first_user["content"]
    raw_id = record.get("id")
    data: dict[str, Any] = {
        "id": str(raw_id) if raw_id not in (None, "") else fallback_id,
        "images": images,
        "conversations": turns,
    }
    for key in _PASSTHROUGH:
        if record.get(key) is not None:
            data[key] = record[key]
    responses = data.get("responses")
    if isinstance(responses, str | bytes):
        # Parquet tables often store nested columns as JSON text, as with conversations.
        try:
            data["responses"] = responses = json.loads(responses)
        except json.JSONDecodeError as e:
            raise BadRecord("invalid_schema", f"responses is not valid JSON: {e}") from e
    if isinstance(responses, dict):
        # A Parquet struct column has every mode as a field: absent ones come back as None.
        data["responses"] = {k: v for k, v in responses.items() if v is not None} or None
    if "answer" in data:
        data["answer"] = str(data["answer"])
        data.setdefault("answer_type", infer_answer_type(data["answer"]))
    data.setdefault("source", source)
    try:
        return Sample.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise BadRecord("invalid_schema", f"{where}: {first['msg']}".strip(": ")) from e


def _not_utf8(raw: bytes, e: UnicodeDecodeError) -> str:
    line = raw.count(b"\n", 0, e.start) + 1
    column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    return f"not UTF-8: byte 0x{raw[e.start]:02x} at line {line}, column {column}"


def _iter_jsonl(path: str, start: int) -> Iterator[tuple[int, str, dict[str, Any] | BadRecord]]:
    # Bytes, decoded line by line: one bad byte is one bad record, not a UnicodeDecodeError at
    # a chunk offset that aborts the whole run without naming the line.
    with open(path, "rb") as f:
        for idx, raw in enumerate(f):
            if idx < start:
                continue
            loc = f"{path}:{idx + 1}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                column = e.start + 1
                yield (
                    idx,
                    loc,
                    BadRecord(
                        "malformed_json", f"not UTF-8: byte 0x{raw[e.start]:02x} at column {column}"
                    ),
                )
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield idx, loc, BadRecord("malformed_json", str(e))
                continue
            if not isinstance(rec, dict):
                yield idx, loc, BadRecord("malformed_json", "line is not a JSON object")
                continue
            yield idx, loc, rec


def _iter_json(path: str, start: int) -> Iterator[tuple[int, str, dict[str, Any] | BadRecord]]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        yield 0, path, BadRecord("malformed_json", f"whole file unreadable: {_not_utf8(raw, e)}")
        return
    except json.JSONDecodeError as e:
        yield 0, path, BadRecord("malformed_json", f"whole file unreadable: {e}")
        return
    if isinstance(data, dict):
        data = data.get("data", [data])
    for idx, rec in enumerate(data):
        if idx < start:
            continue
        loc = f"{path}[{idx}]"
        if not isinstance(rec, dict):
            yield idx, loc, BadRecord("malformed_json", "element is not a JSON object")
        else:
            yield idx, loc, rec


def _iter_parquet(path: str, start: int) -> Iterator[tuple[int, str, dict[str, Any] | BadRecord]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    idx = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if idx + n <= start:  # skip whole row groups on resume without decoding them
            idx += n
            continue
        for row in pf.read_row_group(rg).to_pylist():
            if idx >= start:
                yield idx, f"{path}#row{idx}", row
            idx += 1


def file_source(inputs: Sequence[str | os.PathLike[str]]) -> SourceFn:
    """A :data:`SourceFn` over JSONL / JSON / Parquet files, in the given order.

    The cursor is ``(file index, record index)``; the record index is the 0-based line (JSONL),
    element (JSON) or row (Parquet).
    """
    paths = [os.path.abspath(p) for p in inputs]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(p)
        if not p.endswith((".jsonl", ".json", ".parquet")):
            raise ValueError(f"unsupported input {p}: expected .jsonl, .json or .parquet")

    def source(cursor: tuple[int, int]) -> Iterator[SourceItem]:
        for file_idx, path in enumerate(paths):
            if file_idx < cursor[0]:
                continue
            start = cursor[1] if file_idx == cursor[0] else 0
            reader = (
                _iter_jsonl
                if path.endswith(".jsonl")
                else _iter_json
                if path.endswith(".json")
                else _iter_parquet
            )
            stem = Path(path).stem
            for idx, loc, payload in reader(path, start):
                if isinstance(payload, dict):
                    payload.setdefault("__fallback_id__", f"{stem}-{idx}")
                yield SourceItem(
                    cursor=(file_idx, idx + 1),
                    location=loc,
                    payload=payload,
                    base_dir=os.path.dirname(path),
                    source=stem,
                )

    return source


def input_fingerprint(inputs: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Identity of input files (path, size, mtime) so a resume sees the same inputs."""
    out = []
    for p in inputs:
        st = os.stat(p)
        out.append({"path": os.path.abspath(p), "size": st.st_size, "mtime": int(st.st_mtime)})
    return out
