"""`autothink convert mcore-to-hf` on a real (tiny) training run: the run dir, a stage dir and an
iter dir all export; transformers loads the result with every weight, its special ids are the
tokenizer's, generate stops at the end-of-turn token, `autothink serve` answers with it in the
auto/long/short modes, and bad inputs are refused before any output exists. The training run's
stdout shows its set-up phases and per-step progress lines."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.convert.hf_utils import assert_generate_stops_at_end_of_turn

CLI = [sys.executable, "-m", "megatron_autothink.cli"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


TWO_STEPS = [
    "data.seq_length=256",
    "data.micro_batch_size=2",
    "data.global_batch_size=2",
    "train.steps=2",
    "train.eval_every=0",
    "checkpoint.save_every=0",
    "logging.tensorboard=false",
]
"""The shortest training run that leaves a checkpoint (also the walk-through's)."""


@pytest.fixture(scope="module")
def train_stdout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """The tiny training run and what `autothink train` printed (stdout, stderr), run with the
    interpreter's default warning filters."""
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
    proc = subprocess.run(
        [
            *CLI,
            "train",
            f"data.train_path={data}",
            f"logging.run_dir={run}",
            *TWO_STEPS,
        ],
        check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    return run, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def run_dir(train_stdout: tuple[Path, str, str]) -> Path:
    return train_stdout[0]


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The run dir exported once, through the CLI, and what the command printed."""
    out = tmp_path_factory.mktemp("export_out") / "hf"
    res = _export(run_dir, out)
    assert res.returncode == 0, res.stderr
    return out, res.stdout


@pytest.fixture(scope="module")
def export(exported: tuple[Path, str]) -> Path:
    return exported[0]


def _export_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [*CLI, "convert", "mcore-to-hf", str(src), str(out), "--no-progress", *extra]


def _export(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _export_cmd(src, out, *extra), env=ENV, capture_output=True, text=True, timeout=600
    )


def _exports_at_once(*cmds: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Independent CLI calls side by side: each spends most of its ~10 s importing."""
    with concurrent.futures.ThreadPoolExecutor(len(cmds)) as pool:
        runs = [
            pool.submit(subprocess.run, c, env=ENV, capture_output=True, text=True, timeout=600)
            for c in cmds
        ]
        return [r.result() for r in runs]


def _digest(hf: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(hf.glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_train_prints_phases_and_progress(train_stdout: tuple[Path, str, str]) -> None:
    """Set-up phases as they happen, then a progress line per log step (step/total, tokens/s,
    ETA), on stdout; megatron-core's known TE/Apex notes are not printed (compat/quiet.py)."""
    _, out, err = train_stdout
    assert "Apex is not installed" not in err and "Transformer Engine and Apex" not in err, err
    lines = out.splitlines()
    phases = [ln for ln in lines if ln.startswith("autothink train [")]
    for want in ("importing torch", "building the model", "optimizer and data loader", "training"):
        assert any(want in ln for ln in phases), (want, out)
    assert phases[-1].endswith("done: sft"), out
    steps = [ln for ln in lines if ln.startswith("[sft] step ")]
    assert [ln.split()[2] for ln in steps] == ["1/2", "2/2"], out
    for ln in steps:
        assert "tokens_per_s " in ln and " eta " in ln and "loss " in ln, ln
    assert steps[-1].endswith("eta 0:00"), steps[-1]


def test_run_stage_and_iter_dirs_export_a_loadable_model(
    run_dir: Path, exported: tuple[Path, str], tmp_path: Path
) -> None:
    from PIL import Image
    from transformers import AutoTokenizer
    from transformers import Qwen2_5_VLForConditionalGeneration as Model
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    stage = run_dir / "checkpoints" / "sft"
    iter_dir = stage / "iter_00000002"
    export, export_stdout = exported
    assert "stage sft" in export_stdout, export_stdout
    outs = {"run": export, "stage": tmp_path / "stage", "iter": tmp_path / "iter"}
    results = _exports_at_once(
        _export_cmd(stage, outs["stage"]), _export_cmd(iter_dir, outs["iter"])
    )
    for res in results:
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("wrote ") == 1, res.stdout
        assert "iter_00000002" in res.stdout, res.stdout
    assert len({_digest(p) for p in outs.values()}) == 1  # the same checkpoint each time
    assert not list(tmp_path.glob(".*.partial"))

    hf = export
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

    assert_generate_stops_at_end_of_turn(model, tok, "What is 3 + 4?", at=3)


def test_bad_inputs_are_refused_before_writing(run_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    results = _exports_at_once(
        _export_cmd(run_dir, tmp_path / "o", "--stage", "rl"),
        _export_cmd(run_dir, tmp_path / "o", "--tokenizer-dir", str(empty)),
        _export_cmd(tmp_path, tmp_path / "o"),
        _export_cmd(run_dir, tmp_path / "used"),
    )
    wanted = ("stage 'rl' has no checkpoint", "not a usable tokenizer", "not a checkpoint")
    for res, message in zip(results, [*wanted, "--overwrite"], strict=True):
        assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".*.partial"))
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["notes.txt"]


def test_export_keeps_the_stock_architecture_and_processor_files(export: Path) -> None:
    """Stock loaders (transformers, vLLM with torchvision) get the stock Qwen2.5-VL class and a
    named video processor; only `autothink serve` / the rollout engine swap the architecture."""
    from transformers.video_processing_utils import BaseVideoProcessor

    cfg = json.loads((export / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    video, _ = BaseVideoProcessor.get_video_processor_dict(str(export))
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    image = json.loads((export / "preprocessor_config.json").read_text())
    for key in ("patch_size", "temporal_patch_size", "merge_size"):
        assert video[key] == image[key], key


@pytest.mark.vllm  # one vLLM start (~30-60 s on 2 shared cores)
def test_serve_answers_in_auto_long_and_short(export: Path, tmp_path: Path) -> None:
    """The documented one-shot command (docs/serving.md) on the export: one engine start, one
    answer per mode; long opens a think block that the model goes on writing, short has the
    empty think block, auto starts the turn itself."""
    from PIL import Image

    img = tmp_path / "digit.png"
    Image.new("RGB", (56, 56), "white").save(img)
    cmd = [*CLI, "serve", str(export), "--prompt", "What is 3 + 4?", "--image", str(img)]
    res = subprocess.run(
        [*cmd, "--mode", "auto,long,short", "--max-new-tokens", "6", "--json"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    answers = {a["mode"]: a for a in map(json.loads, res.stdout.splitlines())}
    assert list(answers) == ["auto", "long", "short"], res.stdout
    for a in answers.values():
        assert a["num_tokens"] > 0 and a["text"] and a["turn"] == a["prefill"] + a["text"], a
    assert answers["auto"]["prefill"] == "" and answers["auto"]["turn"] == answers["auto"]["text"]
    # The prefills are the command's; what follows is the (barely trained) model's.
    assert answers["long"]["prefill"] == "<think>\n" and answers["long"]["text"]
    assert answers["short"]["prefill"] == "<think>\n\n</think>\n\n"
    assert answers["short"]["turn"].startswith("<think>\n\n</think>\n\n")
