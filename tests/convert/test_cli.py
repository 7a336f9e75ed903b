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
