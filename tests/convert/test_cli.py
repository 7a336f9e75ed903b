"""``autothink convert`` argument surface: mountable, standalone, clean refusals."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_autothink.convert import cli

ROOT = Path(__file__).resolve().parents[2]


def _parser() -> argparse.ArgumentParser:
    """How the main CLI mounts it."""
    top = argparse.ArgumentParser(prog="autothink")
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert")
    cli.add_arguments(p)
    p.set_defaults(func=cli.main)
    return top


def test_mounted_arguments() -> None:
    args = _parser().parse_args(["convert", "hf-to-mcore", "in", "out", "--dtype", "bfloat16"])
    assert (args.convert_command, args.hf_dir, args.out_dir, args.dtype) == (
        "hf-to-mcore",
        "in",
        "out",
        "bfloat16",
    )
    args = _parser().parse_args(
        ["convert", "mcore-to-hf", "ck", "hf", "--tp", "2", "--set", "model.image_token_id=7"]
    )
    assert (args.tp, args.pp, args.overrides, args.chat_template) == (
        2,
        1,
        ["model.image_token_id=7"],
        "thinking",
    )
    assert args.func is cli.main


def test_standalone_help_is_fast_and_light() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = (
        "import sys, runpy; sys.argv = ['cli', '--help']\n"
        "try:\n    runpy.run_module('megatron_autothink.convert.cli', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "assert 'megatron.core' not in sys.modules, 'help imported megatron-core'"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "hf-to-mcore" in res.stdout and "mcore-to-hf" in res.stdout


def test_refused_input_exits_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama", "architectures": ["X"]}')
    args = _parser().parse_args(["convert", "hf-to-mcore", str(tmp_path), str(tmp_path / "o")])
    assert args.func(args) == 2
    assert "unknown architecture: model_type='llama'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-W", "ignore", "-m", "megatron_autothink.convert.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_export_refuses_a_corrupted_or_unexportable_checkpoint_before_loading(
    tmp_path: Path,
) -> None:
    """4 KB flipped inside a .distcp keeps its size; without the manifest check the export
    succeeded with garbage weights (embed_tokens near 3.4e38)."""
    from tests.convert.hf_utils import TinySpec, save_hf_model

    save_hf_model(TinySpec(tie=False), tmp_path / "hf")
    mcore = tmp_path / "mcore"
    res = _run_cli("hf-to-mcore", str(tmp_path / "hf"), str(mcore), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    # A recipe's model section has no image_token_id (train fills it in from the tokenizer):
    # refused before the weights are loaded, not after they are written.
    res = _run_cli("mcore-to-hf", str(mcore), str(tmp_path / "out"), "--config", "tiny_cpu")
    assert res.returncode == 2 and "model.image_token_id must be set" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()
    victim = max(mcore.glob("*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 4096] = b"\x7f" * 4096
    victim.write_bytes(bytes(raw))
    res = _run_cli("mcore-to-hf", str(mcore), str(tmp_path / "out"), "--no-progress")
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"{victim}: checksum mismatch (corrupted)" in res.stderr
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_tp_without_torchrun_is_refused_at_once_with_the_working_command(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    env["PYTHONPATH"] = str(ROOT)
    code = (
        "import sys\n"
        "from megatron_autothink.cli import main\n"
        f"rc = main(['convert', 'hf-to-mcore', {str(tmp_path)!r}, {str(tmp_path / 'o')!r}, "
        "'--tp', '2'])\n"
        "assert 'megatron.core' not in sys.modules, 'refused only after importing megatron'\n"
        "sys.exit(rc)"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert "loads at any TP/PP" in res.stderr
    assert "torchrun --nproc-per-node 2 -m megatron_autothink.convert.cli hf-to-mcore" in res.stderr
    assert not (tmp_path / "o").exists()
