"""`autothink convert mcore-to-hf` on a real (tiny) training run: the run dir, a stage dir and an
iter dir all export; transformers loads the result with every weight, its special ids are the
tokenizer's, generate stops at the end-of-turn token, and bad inputs are refused before any
output exists."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "megatron_autothink.cli"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    data, run = root / "data", root / "run"
    subprocess.run(
        [*CLI, "prep", "digits", "--out", str(data), "--train", "200", "--test", "20"],
        check=True,
        env=ENV,
        capture_output=True,
    )
    subprocess.run(
        [*CLI, "prep", "tokenizer", "--out", str(data / "tokenizer")],
        check=True,
        env=ENV,
        capture_output=True,
    )
    subprocess.run(
        [
            *CLI,
            "train",
            f"data.train_path={data}",
            f"logging.run_dir={run}",
            "data.seq_length=256",
            "data.micro_batch_size=2",
            "data.global_batch_size=2",
            "train.steps=2",
            "train.eval_every=0",
            "checkpoint.save_every=0",
            "logging.tensorboard=false",
        ],
        check=True,
        env=ENV,
        capture_output=True,
        timeout=900,
    )
    return run


def _export(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "convert", "mcore-to-hf", str(src), str(out), "--no-progress", *extra],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _digest(hf: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(hf.glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_run_stage_and_iter_dirs_export_a_loadable_model(run_dir: Path, tmp_path: Path) -> None:
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList
    from transformers import Qwen2_5_VLForConditionalGeneration as Model
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    stage = run_dir / "checkpoints" / "sft"
    iter_dir = stage / "iter_00000002"
    outs = {}
    for name, src in (("run", run_dir), ("stage", stage), ("iter", iter_dir)):
        res = _export(src, tmp_path / name)
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("wrote ") == 1, res.stdout
        assert "iter_00000002" in res.stdout, res.stdout
        outs[name] = tmp_path / name
    assert "stage sft" in _export(run_dir, tmp_path / "again").stdout
    assert len({_digest(p) for p in outs.values()}) == 1  # the same checkpoint each time
    assert not list(tmp_path.glob(".*.partial"))

    hf = outs["run"]
    model, info = Model.from_pretrained(hf, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tok = AutoTokenizer.from_pretrained(hf)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["text_config"]["eos_token_id"] == end_of_turn
    assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg["text_config"]["bos_token_id"] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert model.generation_config.eos_token_id == end_of_turn

    proc = Qwen2VLImageProcessorPil.from_pretrained(hf)
    img = proc(images=[Image.new("RGB", (56, 84), "white")], return_tensors="pt")
    assert tuple(img["image_grid_thw"][0].tolist()) == (1, 6, 4)

    class EndTurnAtThird(LogitsProcessor):
        """The barely trained model rarely ends a turn by itself: make it, at the 3rd token."""

        def __init__(self, start: int) -> None:
            self.start = start

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if input_ids.shape[1] - self.start == 2:
                scores = torch.full_like(scores, -1e9)
                scores[:, end_of_turn] = 0.0
            return scores

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    n = prompt["input_ids"].shape[1]
    gen = model.generate(
        **prompt,
        max_new_tokens=20,
        do_sample=False,
        logits_processor=LogitsProcessorList([EndTurnAtThird(n)]),
    )
    assert gen.shape[1] - n == 3 and int(gen[0, -1]) == end_of_turn


def test_bad_inputs_are_refused_before_writing(run_dir: Path, tmp_path: Path) -> None:
    res = _export(run_dir, tmp_path / "o", "--stage", "rl")
    assert res.returncode == 2 and "stage 'rl' has no checkpoint" in res.stderr, res.stderr
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    res = _export(run_dir, tmp_path / "o", "--tokenizer-dir", str(empty))
    assert res.returncode == 2 and "not a usable tokenizer" in res.stderr, res.stderr
    res = _export(tmp_path, tmp_path / "o")
    assert res.returncode == 2 and "not a checkpoint" in res.stderr, res.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".*.partial"))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    res = _export(run_dir, tmp_path / "used")
    assert res.returncode == 2 and "--overwrite" in res.stderr, res.stderr
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["notes.txt"]
