"""Packed loader: masks and positions, determinism, resume exactness, ranks, bad shards."""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from megatron_autothink.data.batch import PackedBatch
from megatron_autothink.data.image_processing import decode_image, image_patches
from megatron_autothink.data.loader import (
    LoaderConfig,
    PackingTaskEncoder,
    PromptLoaderConfig,
    build_packed_loader,
    build_prompt_loader,
)
from megatron_autothink.data.packing import EncodedSequence, collate_rows, pack_row


def _cfg(path: str, **kw: Any) -> LoaderConfig:
    base: dict[str, Any] = {
        "path": path,
        "seq_length": 256,
        "micro_batch_size": 2,
        "shuffle_buffer_size": 16,
        "packing_buffer_size": 16,
        "seed": 3,
        "gc_every_n_batches": 0,  # energon's full gc.collect costs ~1 s in the pytest heap
    }
    base.update(kw)
    return LoaderConfig(**base)


def _sig(b: PackedBatch) -> tuple[Any, ...]:
    return (
        b.tokens.tolist(),
        b.loss_mask.tolist(),
        b.mode_ids.tolist(),
        b.sample_ids,
        None if b.pixel_values is None else float(b.pixel_values.sum()),
    )


def _all_ids(loader: Any) -> list[str]:
    return [sid for batch in loader for row in batch.sample_ids for sid in row]


def test_pack_row_hand_checked() -> None:
    a = EncodedSequence(
        "a",
        torch.tensor([5, 6, 7]),
        torch.tensor([False, True, True]),
        torch.arange(3).expand(3, 3),
        mode_id=1,
    )
    grid = torch.tensor([[1, 2, 2]])
    b = EncodedSequence(
        "b",
        torch.tensor([8, 4, 9]),  # 4 = one merged image token of a 2x2-patch image
        torch.tensor([False, False, True]),
        torch.tensor([[0, 1, 2], [0, 1, 2], [0, 1, 2]]),
        mode_id=0,
        pixel_values=torch.ones(4, 1176),
        image_grid_thw=grid,
    )
    row = pack_row([a, b], seq_length=8, pad_id=0)
    assert row.tokens.tolist() == [5, 6, 7, 8, 4, 9, 0, 0]
    assert row.labels.tolist() == [6, 7, 0, 4, 9, 0, 0, 0]
    assert row.loss_mask.tolist() == [1, 1, 0, 0, 1, 0, 0, 0]
    assert row.segment_ids.tolist() == [1, 1, 1, 2, 2, 2, 0, 0]
    assert row.mode_ids.tolist() == [1, 1, 1, 0, 0, 0, -1, -1]
    assert row.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2, 0, 0]
    batch = collate_rows([row, pack_row([b], 8, 0)])
    assert batch.tokens.shape == (2, 8) and batch.position_ids.shape == (3, 2, 8)
    assert batch.pixel_values is not None and batch.pixel_values.shape == (8, 1176)
    assert batch.image_grid_thw is not None and batch.image_grid_thw.tolist() == [[1, 2, 2]] * 2
    assert batch.sample_ids == [["a", "b"], ["b"]]
    with pytest.raises(ValueError, match="do not fit"):
        pack_row([a, b, a], seq_length=8, pad_id=0)


def test_batches_are_consistent(digits_dir: str, tokenizer: Any) -> None:
    loader = build_packed_loader(_cfg(digits_dir), tokenizer, dp_rank=0, dp_world_size=1)
    pad = tokenizer.pad_token_id
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for _ in range(3):
        b = next(loader)
        assert b.tokens.shape == (2, 256) and b.tokens.dtype == torch.long
        assert b.loss_mask.dtype == torch.float32 and b.position_ids.shape == (3, 2, 256)
        assert b.image_grid_thw is not None and b.pixel_values is not None
        assert b.pixel_values.shape[0] == int(b.image_grid_thw.prod(dim=1).sum())
        assert int((b.tokens == image_pad).sum()) == int(b.image_grid_thw.prod(dim=1).sum()) // 4
        for r in range(2):
            seg = b.segment_ids[r]
            k = int(seg.max())
            assert len(b.sample_ids[r]) == k and seg.tolist() == sorted(
                seg.tolist(), key=lambda x: x == 0
            )
            for s in range(1, k + 1):
                idx = (seg == s).nonzero().flatten()
                lo, hi = int(idx[0]), int(idx[-1])
                assert b.position_ids[:, r, lo].tolist() == [0, 0, 0]  # restart per sample
                assert torch.equal(b.labels[r, lo:hi], b.tokens[r, lo + 1 : hi + 1])
                assert int(b.labels[r, hi]) == pad and float(b.loss_mask[r, hi]) == 0
                modes = b.mode_ids[r, lo : hi + 1].unique().tolist()
                assert len(modes) == 1 and modes[0] in (0, 1)
                target = tokenizer.decode(b.labels[r, lo:hi][b.loss_mask[r, lo:hi] > 0])
                assert target.startswith("<think>\n") and target.endswith("}.<|im_end|>")
                assert (modes[0] == 0) == target.startswith("<think>\n\n</think>")
            pad_part = seg == 0
            assert (b.tokens[r][pad_part] == pad).all() and (b.mode_ids[r][pad_part] == -1).all()
            assert float(b.loss_mask[r][pad_part].sum()) == 0
    assert loader.stats["samples_read"] > 0  # every sample used: nothing else counted
    assert set(loader.stats) == {"samples_read"}


def test_reading_leaves_the_torch_rng_alone(digits_dir: str, tokenizer: Any) -> None:
    """A new iterator (each start of a stage, resumes included) must not draw from the
    trainer's torch RNG: torch's DataLoader takes its base seed from it."""
    loader = build_packed_loader(_cfg(digits_dir), tokenizer, dp_rank=0, dp_world_size=1)
    before = torch.get_rng_state()
    next(loader)
    next(loader)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_think_ratio(digits_dir: str, tokenizer: Any, ratio: float) -> None:
    loader = build_packed_loader(
        _cfg(digits_dir, think_ratio=ratio), tokenizer, dp_rank=0, dp_world_size=1
    )
    modes = torch.cat([next(loader).mode_ids.flatten() for _ in range(2)]).unique().tolist()
    assert set(modes) == {-1, int(ratio)}


def test_think_ratio_by_difficulty_curates_per_level(digits_dir: str, tokenizer: Any) -> None:
    """R-4B-style curation that keeps some thinking answers on easy levels: the listed levels
    take their own ratio, the others the difficulty threshold."""
    from megatron_autothink.data.schema import Sample

    cfg = _cfg(digits_dir, think_min_difficulty=4, think_ratio_by_difficulty={1: 0.25, 5: 0.0})
    enc = PackingTaskEncoder(tokenizer, cfg)
    n = 2000

    def think_share(level: int) -> float:
        samples = [
            Sample(
                id=f"s{i}",
                conversations=[{"role": "user", "content": "q"}],
                responses={
                    "thinking": "<think>\nx\n</think>\n\n1",
                    "non_thinking": "<think>\n\n</think>\n\n1",
                },
                difficulty=level,
            )
            for i in range(n)
        ]
        return sum(enc.choose_mode(s) == "thinking" for s in samples) / n

    assert abs(think_share(1) - 0.25) < 0.04  # listed: its own ratio
    assert think_share(5) == 0.0  # listed: overrides the threshold
    assert think_share(2) == 0.0 and think_share(4) == 1.0  # unlisted: the threshold


@pytest.mark.parametrize("workers", [0, 1])
def test_determinism_and_resume(digits_dir: str, tokenizer: Any, workers: int) -> None:
    cfg = _cfg(digits_dir, num_workers=workers)
    ref_loader = build_packed_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1)
    ref = [_sig(next(ref_loader)) for _ in range(8)]
    first = build_packed_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1)
    assert [_sig(next(first)) for _ in range(3)] == ref[:3]  # same seed, same batches
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # checkpointable with weights_only loading
    buf.seek(0)
    resumed = build_packed_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert [_sig(next(resumed)) for _ in range(5)] == ref[3:]
    # The counters too: energon reads its buffers again at a resume, and those reads must not
    # count twice (samples_read = samples delivered in batches + samples dropped).
    assert resumed.stats == ref_loader.stats
    delivered = sum(len(row) for b in ref for row in b[3])
    assert ref_loader.stats["samples_read"] == delivered
    other_seed = build_packed_loader(
        _cfg(digits_dir, seed=4), tokenizer, dp_rank=0, dp_world_size=1
    )
    assert _sig(next(other_seed)) != ref[0]


class _Payload:
    """Unpickling this creates ``path``: stands for any code a crafted checkpoint would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.path)!r}, 'w').close()",))


def test_crafted_loader_state_cannot_run_code(
    digits_dir: str, tokenizer: Any, tmp_path: Path
) -> None:
    """The loader state travels in rank_*.pt, which anyone can hand to ``autothink train``:
    restoring it must never unpickle, and a state that is not ours must be refused by name."""
    cfg = _cfg(digits_dir)
    saved = build_packed_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1)
    next(saved)
    genuine = saved.state_dict()
    marker = tmp_path / "pwned"
    crafted = [
        ({**genuine, "energon": pickle.dumps(_Payload(marker))}, "not a SavableDataLoaderState"),
        (
            {**genuine, "energon": {"__dataclass__": "os:system", "fields": {}}},
            "energon: os is not part of megatron.energon",
        ),
        ({**genuine, "version": 1, "energon": pickle.dumps(_Payload(marker))}, "version 1"),
    ]
    for state, message in crafted:
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        loader = build_packed_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1)
        with pytest.raises(ValueError, match=message):
            loader.load_state_dict(torch.load(buf, weights_only=True))
        loader.close()
    assert not marker.exists()


def test_skip_messages_name_shard_and_index(
    digits_dir: str, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Over-long samples say where they are (not only their id); a schema error does not dump
    the sample's image bytes."""
    caplog.set_level(logging.WARNING, logger="megatron_autothink.data.loader")
    cfg = _cfg(digits_dir, split="test", training=False, seq_length=40)  # one finite pass
    loader = build_packed_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1)
    assert _all_ids(loader) == []  # every sample is longer than 40 tokens
    too_long = [r.getMessage() for r in caplog.records if "tokens > seq_length" in r.getMessage()]
    assert too_long and re.search(r"\(test-\d+\.tar\[\d+\]\)", too_long[0]), too_long[:1]

    from megatron_autothink.data.loader import _ErrorHandler, _limits
    from megatron_autothink.data.schema import Sample

    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    try:
        Sample.model_validate({"id": "s", "images": [png], "conversations": "oops"})
    except ValidationError as e:
        caplog.clear()
        _ErrorHandler(_limits(cfg))(e, None)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "conversations" in msg and "PNG" not in msg and len(msg) < 300, msg


def test_ranks_partition_the_data(digits_dir: str, tokenizer: Any) -> None:
    ids = []
    for rank in range(2):
        cfg = _cfg(digits_dir, split="test", training=False)
        ids.append(_all_ids(build_packed_loader(cfg, tokenizer, dp_rank=rank, dp_world_size=2)))
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == [f"digits-test-{i:07d}" for i in range(60)]


def _corrupt_copy(digits_dir: str, tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(digits_dir, root)
    return root


def _ids_in(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return [
            json.loads(tar.extractfile(m).read())["id"]  # type: ignore[union-attr]
            for m in tar
            if m.name.endswith(".json")
        ]


def test_corrupted_shards_are_skipped_and_counted(
    digits_dir: str, tokenizer: Any, tmp_path: Path
) -> None:
    root = _corrupt_copy(digits_dir, tmp_path)
    shards = sorted(root.glob("test-*.tar"))
    truncated, garbled = shards[1], shards[2]
    lost = _ids_in(truncated)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])  # e.g. an interrupted upload
    with tarfile.open(garbled) as tar:  # same size, but one sample's JSON is garbage
        member = next(m for m in tar if m.name.endswith(".json"))
        bad_id = json.loads(tar.extractfile(member).read())["id"]  # type: ignore[union-attr]
    raw = bytearray(garbled.read_bytes())
    raw[member.offset_data : member.offset_data + member.size] = b"\xff" * member.size
    garbled.write_bytes(bytes(raw))

    cfg = _cfg(str(root), split="test", training=False)
    loader = build_packed_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1)
    assert loader.stats["corrupt_shards"] == 1 and loader.stats["corrupt_shard_samples"] == len(
        lost
    )
    assert truncated.name in loader.excluded_shards
    seen = _all_ids(loader)
    expected = {f"digits-test-{i:07d}" for i in range(60)} - set(lost) - {bad_id}
    assert set(seen) == expected and len(seen) == len(expected)
    assert loader.stats["bad_sample"] == 1


@pytest.mark.parametrize("verify", ["size", "headers"])
def test_garbage_tar_header(digits_dir: str, tokenizer: Any, tmp_path: Path, verify: str) -> None:
    root = _corrupt_copy(digits_dir, tmp_path)
    shard = sorted(root.glob("test-*.tar"))[0]
    with tarfile.open(shard) as tar:
        header = tar.getmembers()[2].offset  # the second sample's first header
    raw = bytearray(shard.read_bytes())
    raw[header + 100 : header + 148] = b"\x07" * 48  # same size, but the checksum breaks
    shard.write_bytes(bytes(raw))
    cfg = _cfg(str(root), split="test", training=False, verify_shards=verify)
    loader = build_packed_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1)
    seen = _all_ids(loader)
    if verify == "headers":  # found up front: the whole shard is left out
        assert list(loader.excluded_shards) == [shard.name]
        assert len(seen) == 60 - loader.stats["corrupt_shard_samples"]
    else:  # found at read time: only the damaged sample is skipped
        assert not loader.excluded_shards and loader.stats["bad_sample"] == 1
        assert len(seen) == 59


def test_prompt_loader(digits_dir: str, tokenizer: Any) -> None:
    cfg = PromptLoaderConfig(
        path=digits_dir, batch_size=4, seed=1, shuffle_buffer_size=8, gc_every_n_batches=0
    )
    loader = build_prompt_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1)
    batches = [next(loader) for _ in range(3)]
    for p in batches[0]:
        assert p.prompt.endswith("<|im_start|>assistant\n") and "<think>" not in p.prompt
        assert p.prompt_ids == tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        assert p.vllm_prompt.count("<|image_pad|>") == len(p.images) == 1
        assert p.image_grid_thw is not None and p.pixel_values is not None
        n_pad = int(p.image_grid_thw.prod()) // 4
        assert p.prompt.count("<|image_pad|>") == n_pad
        assert p.answer is not None and p.answer_type == "number" and p.difficulty is not None
        # SSR replays keep only the shard's encoded bytes and re-decode them: the same pixels,
        # bit for bit, as the loader gave the engine.
        assert len(p.image_bytes) == 1 and p.image_bytes[0][:4] == b"\x89PNG"
        pixels, grid, _ = image_patches([decode_image(b) for b in p.image_bytes], cfg.image)
        assert pixels is not None and grid is not None
        assert pixels.dtype == p.pixel_values.dtype and torch.equal(pixels, p.pixel_values)
        assert torch.equal(grid, p.image_grid_thw)
    resumed_from = build_prompt_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1)
    next(resumed_from)
    state = resumed_from.state_dict()
    again = build_prompt_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1)
    again.load_state_dict(state)
    assert [[p.id for p in b] for b in (next(again), next(again))] == [
        [p.id for p in b] for b in batches[1:]
    ]


def test_text_only_digits(tokenizer: Any, tmp_path: Path) -> None:
    from megatron_autothink.data.digits import prep_digits

    out = str(tmp_path / "text")
    prep_digits(out, n_train=20, n_test=0, text_only=True, progress=False, save_tokenizer=False)
    cfg = _cfg(out, micro_batch_size=1, shuffle_buffer_size=4, packing_buffer_size=8)
    batch = next(build_packed_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1))
    assert batch.pixel_values is None and batch.image_grid_thw is None
    assert "Digits:" in tokenizer.decode(batch.tokens[0])
    pos = batch.position_ids[:, 0]
    assert torch.equal(pos[0], pos[1]) and torch.equal(pos[1], pos[2])  # text: same in t, h, w


def test_bad_share_over_max_error_rate_stops_the_loader() -> None:
    """A mostly bad dataset is refused once a loading process has read MIN_SAMPLES_FOR_RATE
    samples; a few bad samples early on, or rule skips (too long), are not errors."""
    from megatron_autothink.data.loader import (
        MIN_SAMPLES_FOR_RATE,
        DataQualityError,
        _Limits,
        _Quality,
        _unwrap_quality_error,
    )

    limits = _Limits(what="/d [train]", max_error_rate=0.1, max_unusable_in_a_row=0)
    q = _Quality()
    for i in range(MIN_SAMPLES_FOR_RATE):  # rule skips: counted, never an error
        q.unusable("longer than seq_length=32", f"x{i}", limits, error=False)
        q.ok()
    q = _Quality()
    for i in range(MIN_SAMPLES_FOR_RATE - 1):  # 50 % bad, but too few samples read to judge
        if i % 2:
            q.unusable("ValidationError", f"s.tar[{i}]", limits, error=True)
        else:
            q.ok()
    with pytest.raises(DataQualityError) as err:
        q.unusable("ValidationError", "s.tar[999]", limits, error=True)
    msg = str(_unwrap_quality_error(RuntimeError(f"wrapped: {err.value} (worker 0)")))
    assert msg.startswith("/d [train]: ") and "> max_error_rate=0.1" in msg, msg
    assert "100 of 200 samples read could not be read or decoded" in msg, msg
    assert "100 ValidationError, e.g. s.tar[1]" in msg, msg

    q = _Quality()
    every = _Limits(what="/d [train]", max_error_rate=None, max_unusable_in_a_row=5)
    for i in range(4):
        q.unusable("longer than seq_length=32", f"x{i}", every, error=False)
    q.ok()  # a usable sample resets the run
    for i in range(4):
        q.unusable("longer than seq_length=32", f"y{i}", every, error=False)
    with pytest.raises(DataQualityError, match="the last 5 samples read were all unusable"):
        q.unusable("without an answer", "z", every, error=False)


def test_resume_when_the_set_of_unusable_shards_changed(
    digits_dir: str, tokenizer: Any, tmp_path: Path
) -> None:
    """A shard repaired since the checkpoint stays out, so the resume is exact; a shard that
    broke since is refused unless data.on_shard_change=restart_order (fresh sample order)."""
    root = _corrupt_copy(digits_dir, tmp_path)
    shards = sorted(root.glob("train-*.tar"))
    broken, later = shards[1], shards[2]
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) // 3])
    cfg = _cfg(str(root))
    first = build_packed_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1)
    [next(first) for _ in range(2)]
    state = first.state_dict()
    want = [_sig(next(first)) for _ in range(4)]

    broken.write_bytes(good)  # repaired before the resume
    resumed = build_packed_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1)
    resumed.load_state_dict(state)
    assert [_sig(next(resumed)) for _ in range(4)] == want
    assert broken.name in resumed.excluded_shards
    assert broken.name in resumed.state_dict()["excluded_shards"]

    data, lost = later.read_bytes(), set(_ids_in(later))
    later.write_bytes(data[: len(data) // 3])  # broke before the resume
    refused = build_packed_loader(cfg, tokenizer, dp_rank=0, dp_world_size=1)
    with pytest.raises(ValueError, match=rf"{later.name}.*data.on_shard_change=restart_order"):
        refused.load_state_dict(state)
    restarted = build_packed_loader(
        _cfg(str(root), on_shard_change="restart_order"), tokenizer, dp_rank=0, dp_world_size=1
    )
    restarted.load_state_dict(state)
    ids = {sid for _ in range(4) for row in next(restarted).sample_ids for sid in row}
    assert ids and not ids & lost
    assert restarted.stats["corrupt_shards"] == 1 and restarted.stats["samples_read"] > 0
