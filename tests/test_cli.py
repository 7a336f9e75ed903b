"""The ``autothink`` console script: help for every subcommand, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_autothink.cli import main

SUBCOMMANDS = ["demo", "prep", "train", "eval", "serve", "convert", "launch"]


def test_top_level_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for sub in SUBCOMMANDS:
        assert sub in out


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_subcommand_help(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    assert "usage: autothink " + sub in capsys.readouterr().out


def test_train_print_config_applies_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", "tiny_cpu", "train.steps=7", "--print-config"]) == 0
    assert "steps: 7" in capsys.readouterr().out


def test_overrides_before_and_after_options_all_apply(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "train.steps=7", "--config", "tiny_cpu", "train.seed=5", "--print-config"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "seed: 5" in out
    with pytest.raises(SystemExit):  # a stray word is still refused, naming it
        main(["train", "train.steps=7", "--config", "tiny_cpu", "oops", "--print-config"])
    assert "unrecognized arguments: oops" in capsys.readouterr().err


def test_bad_override_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "parallel.tp=3", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "parallel.tp" in err and "allowed" in err


def test_console_script_installed() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "megatron_autothink.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "autothink" in out.stdout
