"""prep shards: LLaVA JSONL and Parquet inputs, bad-record reporting, size bound, resume."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from megatron_autothink.data import shards as shards_mod
from megatron_autothink.data.shards import PrepError, PrepOptions, prep_shards, read_manifest

ANSWER = "<think>\n\n</think>\n\nIt is a picture."
Jsonl = tuple[Path, dict[str, int], int]


def _png(h: int, w: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _record(i: int, image: str | None, answer: str = ANSWER) -> dict[str, Any]:
    human = ("<image>\n" if image and i % 2 else "") + f"Describe picture {i}."
    rec: dict[str, Any] = {
        "id": f"r{i}",
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}],
    }
    if image:
        rec["image"] = image
    return rec


@pytest.fixture
def llava_jsonl(tmp_path: Path) -> Jsonl:
    """40 records, 6 of them bad (one per reason). Returns (file, {reason: line}, n_good)."""
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    lines: list[str] = []
    bad_lines: dict[str, int] = {}
    for i in range(34):
        name = f"imgs/ok{i}.png"
        size = (600, 800) if i == 3 else (20 + i, 30)  # one image above the pixel cap
        (tmp_path / name).write_bytes(_png(*size, seed=i))
        lines.append(json.dumps(_record(i, name if i % 3 else None)))
    (img_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    bad = {
        "malformed_json": '{"id": "x", "conversations": [',
        "missing_image": json.dumps(_record(100, "imgs/nope.png")),
        "bad_image": json.dumps(_record(101, "imgs/broken.png")),
        "no_assistant_turn": json.dumps(
            {"id": "q", "conversations": [{"from": "human", "value": "hi"}]}
        ),
        "too_long": json.dumps(_record(102, None, "<think>\n\n</think>\n\n" + "word " * 400)),
        "invalid_schema": json.dumps(
            {
                "id": "g",
                "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}],
            }
        ),
    }
    for j, text in enumerate(bad.values()):
        lines.insert(5 + 6 * j, text)
    for reason, text in bad.items():
        bad_lines[reason] = lines.index(text) + 1
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, bad_lines, 34


def _samples(out: Path, split: str = "train") -> list[tuple[str, str]]:
    """(key, id) of every sample in the shards, in shard order."""
    found = []
    for shard in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    rec = json.loads(tar.extractfile(m).read())  # type: ignore[union-attr]
                    found.append((m.name.split(".")[0], rec["id"]))
    return found


def _digest(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("train-*.tar"))
    }


def test_jsonl_bad_rows_reported(llava_jsonl, tokenizer_dir: str, tmp_path: Path) -> None:
    path, bad_lines, n_good = llava_jsonl
    out = tmp_path / "out"
    opts = PrepOptions(
        max_shard_size=20_000,
        max_pixels=10_000,
        max_tokens=200,
        tokenizer=tokenizer_dir,
        max_error_rate=0.2,
        progress=False,
    )
    report = prep_shards([path], str(out), opts)
    assert report.written == n_good and report.records == n_good + 6
    assert report.skipped == {reason: 1 for reason in bad_lines}
    for err in report.errors:  # file + line + reason for every bad record
        assert err["location"] == f"{path}:{bad_lines[err['reason']]}"
    assert "no_assistant_turn" in report.summary()
    samples = _samples(out)
    assert [i for _, i in samples] == [f"r{i}" for i in range(34)]
    assert len({k for k, _ in samples}) == len(samples)
    sizes = [p.stat().st_size for p in out.glob("train-*.tar")]
    assert len(sizes) > 2 and max(sizes) <= 20_000
    # The 600x800 image was capped to <= 10k pixels; others kept byte for byte.
    with tarfile.open(sorted(out.glob("train-*.tar"))[0]) as tar:
        imgs = {m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".png")}  # type: ignore[union-attr]
    for _name, data in imgs.items():
        img = Image.open(io.BytesIO(data))
        assert img.width * img.height <= 10_000
    manifest = read_manifest(str(out))
    assert manifest is not None and manifest["splits"]["train"]["status"] == "complete"
    umask = os.umask(0o022)
    os.umask(umask)
    # Readable like the shards (mkstemp's 0600 hid it from the training job's account).
    manifest_mode = (out / ".autothink" / "manifest.json").stat().st_mode & 0o777
    assert manifest_mode == 0o666 & ~umask == (out / "train-000000.tar").stat().st_mode & 0o777
    assert (out / ".nv-meta" / "dataset.yaml").read_text().count("CrudeWebdataset") == 1


def test_error_rate_gate_then_rerun(llava_jsonl, tmp_path: Path) -> None:
    path, _, _ = llava_jsonl
    out = tmp_path / "out"
    with pytest.raises(PrepError, match="bad"):
        prep_shards([path], str(out), PrepOptions(progress=False))  # 5/40 bad > 1%
    assert not (out / ".nv-meta").exists()  # not finalized
    report = prep_shards([path], str(out), PrepOptions(progress=False, max_error_rate=0.5))
    # No tokenizer here, so the long record is kept: 35 written.
    assert report.resumed and report.written == 35 and (out / ".nv-meta" / "split.yaml").exists()


def test_parquet_with_embedded_images(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(12):
        conv = [
            {"from": "human", "value": f"<image>\nWhat is shown {i}?"},
            {"from": "gpt", "value": "<think>\nlook\n</think>\n\nA square."},
        ]
        image = {"bytes": _png(16, 16 + i, seed=i), "path": None}
        if i == 7:
            image = {"bytes": b"not an image", "path": None}
        rows.append({"id": f"p{i}", "conversations": conv, "image": image, "answer": "square"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet", row_group_size=5)
    out = tmp_path / "out"
    report = prep_shards(
        [tmp_path / "x.parquet"], str(out), PrepOptions(progress=False, max_error_rate=0.1)
    )
    assert report.written == 11 and report.skipped == {"bad_image": 1}
    assert report.errors[0]["location"].endswith("x.parquet#row7")
    ids = [i for _, i in _samples(out)]
    assert ids == [f"p{i}" for i in range(12) if i != 7]
    with tarfile.open(next(out.glob("train-*.tar"))) as tar:
        rec = json.loads(tar.extractfile("train_000000000.json").read())  # type: ignore[union-attr]
    assert rec["answer"] == "square" and rec["conversations"][1]["role"] == "assistant"


def test_parquet_json_string_columns(tmp_path: Path) -> None:
    """Parquet tools write nested columns as JSON text or as structs: both are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    conv = [{"from": "human", "value": "What is 2+2?"}]
    both = {"thinking": "<think>\n2+2=4\n</think>\n\n4", "non_thinking": "<think>\n\n</think>\n\n4"}
    rows = [
        {"id": "s", "conversations": json.dumps(conv), "responses": json.dumps(both)},
        {"id": "bad", "conversations": json.dumps(conv), "responses": "{not json"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    # A struct column: a mode absent from a row comes back as None.
    struct = [{"id": "t", "conversations": conv, "responses": {**both, "non_thinking": None}}]
    pq.write_table(pa.Table.from_pylist(struct), tmp_path / "t.parquet")
    out = tmp_path / "out"
    report = prep_shards(
        [tmp_path / "s.parquet", tmp_path / "t.parquet"],
        str(out),
        PrepOptions(progress=False, max_error_rate=0.5),
    )
    assert report.written == 2 and report.skipped == {"invalid_schema": 1}, report
    assert "responses is not valid JSON" in report.errors[0]["detail"]
    recs = {}
    for tar_path in out.glob("train-*.tar"):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    rec = json.loads(tar.extractfile(m).read())  # type: ignore[union-attr]
                    recs[rec["id"]] = rec
    assert recs["s"]["responses"] == both
    assert recs["t"]["responses"] == {"thinking": both["thinking"]}


def test_resume_after_interrupt_refuse_and_overwrite(
    llava_jsonl,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, _, _ = llava_jsonl
    opts = PrepOptions(max_shard_size=20_000, max_error_rate=0.5, progress=False)
    clean = tmp_path / "clean"
    prep_shards([path], str(clean), opts)

    first_shard = read_manifest(str(clean))["splits"]["train"]["shards"][0]["samples"]  # type: ignore[index]
    out = tmp_path / "out"
    real_add = shards_mod._TarShard.add
    calls = {"n": 0}

    def flaky_add(self, key, members):
        calls["n"] += 1
        if calls["n"] == first_shard + 3:  # two samples into the second shard
            raise KeyboardInterrupt
        return real_add(self, key, members)

    monkeypatch.setattr(shards_mod._TarShard, "add", flaky_add)
    with pytest.raises(KeyboardInterrupt):
        prep_shards([path], str(out), opts)
    monkeypatch.setattr(shards_mod._TarShard, "add", real_add)
    state = read_manifest(str(out))["splits"]["train"]  # type: ignore[index]
    assert state["status"] == "in_progress" and state["written"] == first_shard
    assert list(out.glob("*.partial"))  # the interrupted shard is on disk, uncommitted
    (out / "train-000099.tar").write_bytes(b"stray")  # an upload that never got committed

    report = prep_shards([path], str(out), opts)
    assert report.resumed and report.written == len(_samples(clean)) == 35
    assert not list(out.glob("*.partial")) and not (out / "train-000099.tar").exists()
    assert _samples(out) == _samples(clean)  # nothing lost, nothing duplicated
    assert _digest(out) == _digest(clean)  # and byte-identical shards

    with pytest.raises(PrepError, match="already complete"):
        prep_shards([path], str(out), opts)
    with pytest.raises(PrepError, match="other inputs or options"):
        prep_shards([path], str(out), PrepOptions(max_shard_size=30_000, progress=False))
    again = prep_shards(
        [path],
        str(out),
        PrepOptions(max_shard_size=20_000, max_error_rate=0.5, progress=False, overwrite=True),
    )
    assert not again.resumed and _digest(out) == _digest(clean)


def test_refuses_foreign_shards(llava_jsonl: Jsonl, tmp_path: Path) -> None:
    path, _, _ = llava_jsonl
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"someone else's data")
    opts = PrepOptions(max_error_rate=0.5, progress=False)
    with pytest.raises(PrepError, match="no prep run of ours recorded"):
        prep_shards([path], str(out), opts)
    assert (out / "train-000000.tar").read_bytes() == b"someone else's data"
    report = prep_shards(
        [path], str(out), PrepOptions(max_error_rate=0.5, progress=False, overwrite=True)
    )
    assert report.written == 35


def test_non_utf8_byte_is_one_bad_record(tmp_path: Path) -> None:
    """A Latin-1 byte on one line used to abort the run with a chunk offset and no file."""
    lines = [json.dumps(_record(i, None)).encode() for i in range(4)]
    lines[1] = lines[1].replace(b"Describe", b"D\xe9cris")  # 0xe9: Latin-1 e-acute
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    opts = PrepOptions(max_error_rate=0.5, progress=False)
    report = prep_shards([path], str(tmp_path / "out"), opts)
    assert report.written == 3 and report.skipped == {"malformed_json": 1}
    (err,) = report.errors
    assert err["location"] == f"{path}:2"
    assert "not UTF-8: byte 0xe9 at column" in err["detail"]
    whole = tmp_path / "latin1.json"
    whole.write_bytes(b"[\n" + b",\n".join(lines) + b"\n]")
    with pytest.raises(PrepError):  # the only record of the file is bad: 100% > 50%
        prep_shards([whole], str(tmp_path / "out2"), opts)
    manifest = read_manifest(str(tmp_path / "out2"))
    assert manifest is not None
    (err,) = manifest["splits"]["train"]["errors"]
    assert err["location"] == str(whole)
    assert "not UTF-8: byte 0xe9 at line 3, column" in err["detail"]


def test_broken_input_aborts_early(tmp_path: Path) -> None:
    path = tmp_path / "junk.jsonl"
    path.write_text("{oops\n" * 150)
    with pytest.raises(PrepError, match="looks broken"):
        prep_shards([path], str(tmp_path / "out"), PrepOptions(progress=False))
