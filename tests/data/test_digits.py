"""Digits generator: determinism, split disjointness, correct answers; the tiny tokenizer."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from megatron_autothink.data.digits import (
    PROBLEM_TABLE,
    compose_image,
    generate_digits,
    make_problem,
    split_indices,
)
from megatron_autothink.data.schema import response_mode


def _eval(kind: str, d: tuple[int, ...]) -> int:
    if kind == "first":
        return d[0]
    if kind == "count":
        return len(d)
    if kind == "sum":
        return sum(d)
    value = d[0] * d[1] + d[2] if len(d) == 3 else d[0] * d[1] + d[2] * d[3]
    return value - d[4] if len(d) == 5 else value


def test_deterministic_and_seeded() -> None:
    a = [s.model_dump() for s in generate_digits(20, seed=5)]
    b = [s.model_dump() for s in generate_digits(20, seed=5)]
    c = [s.model_dump() for s in generate_digits(20, seed=6)]
    assert a == b
    assert a != c
    # Restartable anywhere: sample i depends only on (seed, split, i).
    assert [s.model_dump() for s in generate_digits(20, seed=5, start=13)] == a[13:]


def test_split_disjoint_and_answers() -> None:
    pools = split_indices(0)
    train = set(np.concatenate(pools["train"]).tolist())
    test = set(np.concatenate(pools["test"]).tolist())
    assert not train & test and len(train | test) == 1797
    used: dict[str, set[int]] = {"train": set(), "test": set()}
    seen_levels = set()
    for split in ("train", "test"):
        for i in range(300):
            p = make_problem(0, split, i)  # type: ignore[arg-type]
            used[split].update(p.image_indices)
            assert p.answer == _eval(p.kind, p.digits)
            assert PROBLEM_TABLE[(p.kind, len(p.digits))] == p.difficulty
            seen_levels.add(p.difficulty)
    assert not used["train"] & used["test"]
    assert used["test"] <= test
    assert seen_levels == {1, 2, 3, 4, 5}


def test_sample_format() -> None:
    for s in generate_digits(30, seed=1):
        assert s.responses is not None and s.answer_type == "number"
        assert response_mode(s.responses["thinking"]) == "thinking"
        assert response_mode(s.responses["non_thinking"]) == "non_thinking"
        for text in s.responses.values():
            assert text.endswith(f"\\boxed{{{s.answer}}}.")
        img = Image.open(io.BytesIO(s.images[0]))  # type: ignore[arg-type]
        k = img.width // img.height
        assert img.height == 28 and img.mode == "RGB" and 1 <= k <= 5
        assert s.conversations[0].content.startswith("<image>\n")
        assert len(s.responses["thinking"]) < 200  # short: the tiny model has seq ~512
    text = next(generate_digits(1, seed=1, text_only=True))
    image = next(generate_digits(1, seed=1))
    assert text.images == [] and text.answer == image.answer
    assert text.conversations[0].content.startswith("Digits: ")


def test_compose_image_is_dark_on_white() -> None:
    img = np.asarray(compose_image((0, 1), digit_size=16))
    assert img.shape == (16, 32, 3)
    assert img.max() == 255 and img.min() < 100


def test_prep_digits_dataset(digits_dir: str) -> None:
    root = Path(digits_dir)
    manifest = json.loads((root / ".autothink" / "manifest.json").read_text())
    assert {k: v["status"] for k, v in manifest["splits"].items()} == {
        "train": "complete",
        "test": "complete",
    }
    assert manifest["splits"]["train"]["written"] == 300
    shards = sorted(root.glob("train-*.tar"))
    assert len(shards) > 3 and all(p.stat().st_size <= 40_000 for p in shards)
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        record = json.loads(tar.extractfile(names[0]).read())  # type: ignore[union-attr]
    assert names[:2] == ["train_000000000.json", "train_000000000.img0.png"]
    assert record["images"] == ["img0.png"] and record["id"] == "digits-train-0000000"
    assert (root / "tokenizer" / "tokenizer_config.json").is_file()  # where `train` looks
    split_yaml = (root / ".nv-meta" / "split.yaml").read_text()
    assert "train-" in split_yaml and "test-" in split_yaml


def test_tiny_tokenizer(tokenizer_dir: str, tokenizer: Any) -> None:
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(tokenizer_dir)  # loadable the standard way, offline
    assert 512 <= len(auto) <= 1024
    for tok in (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<think>",
        "</think>",
    ):
        ids = auto.encode(tok, add_special_tokens=False)
        assert len(ids) == 1 and auto.convert_ids_to_tokens(ids[0]) == tok
    assert auto.eos_token == "<|im_end|>" and auto.pad_token == "<|endoftext|>"
    text = "<think>\n3+4 = 7.\n</think>\n\nThe answer is \\boxed{7}."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # think tags are kept
    assert tokenizer.encode("12", add_special_tokens=False) == [
        tokenizer.convert_tokens_to_ids("1"),
        tokenizer.convert_tokens_to_ids("2"),
    ]  # digits stay single tokens (Qwen's pre-tokenizer)
    cfg = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text())
    assert "thinking_mode" in cfg["chat_template"]
