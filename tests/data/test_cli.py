"""`autothink prep ...` argument wiring, exit codes and help."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from megatron_autothink.data.cli import add_prep_subcommands, main, parse_size


def test_parse_size() -> None:
    assert parse_size("64MB") == 64 * 2**20
    assert parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


def test_mountable_and_helpful(capsys: pytest.CaptureFixture[str]) -> None:
    # Mounted the way megatron_autothink/cli.py does it.
    parser = argparse.ArgumentParser(prog="autothink")
    add_prep_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prep", "digits", "--out", "x", "--train", "5", "--text-only"])
    assert args.train == 5 and args.text_only and callable(args.func)
    args = parser.parse_args(
        [
            "prep",
            "shards",
            "--input",
            "a.jsonl",
            "b.parquet",
            "--out",
            "s3://b/p",
            "--max-shard-size",
            "1MB",
            "--max-error-rate",
            "0.05",
        ]
    )
    assert args.input == ["a.jsonl", "b.parquet"] and args.max_shard_size == 2**20
    for cmd in ("digits", "shards"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["prep", cmd, "--help"])
        assert e.value.code == 0
        assert "--out" in capsys.readouterr().out


def test_prep_shards_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = {
        "id": "a",
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
    }
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    argv = [
        "prep",
        "shards",
        "--input",
        str(tmp_path / "d.jsonl"),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "1 written" in capsys.readouterr().out
    assert main(argv) == 1  # complete: refused
    assert "already complete" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert main([*argv, "--max-tokens", "10", "--overwrite"]) == 2  # needs --tokenizer
    assert main(["prep", "shards", "--input", str(tmp_path / "missing.jsonl"), "--out", "o"]) == 1
