"""`autothink serve` without starting vLLM: modes, refusals before any slow import, and the
`vllm serve` command line for the OpenAI-compatible server (parsed by vLLM's own parser). The
one-shot answers in all three modes: tests/convert/test_export_run.py (a real export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_autothink.cli import main
from megatron_autothink.serve import parse_modes, server_argv


def test_modes() -> None:
    assert parse_modes("auto") == ["auto"]
    assert parse_modes("all") == parse_modes("auto,long,short") == ["auto", "long", "short"]
    with pytest.raises(ValueError, match="unknown mode 'think'"):
        parse_modes("auto,think")


def _export_stub(path: Path) -> Path:
    path.mkdir()
    cfg = {"model_type": "qwen2_5_vl", "dtype": "float32", "text_config": {}}
    cfg["text_config"]["max_position_embeddings"] = 2048
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_bad_arguments_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = _export_stub(tmp_path / "hf")
    assert main(["serve", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["serve", str(hf), "--prompt", "hi", "--mode", "deep"]) == 2
    assert "unknown mode" in capsys.readouterr().err
    assert main(["serve", str(hf), "--prompt", "hi", "--image", str(tmp_path / "x.png")]) == 2
    assert "no such image" in capsys.readouterr().err
    assert main(["serve", str(hf), "--mode", "all"]) == 2  # a server has one default mode
    assert "one default --mode" in capsys.readouterr().err
    assert main(["serve", str(hf), "--min-think-tokens", "4"]) == 2  # per request on a server
    assert "vllm_xargs" in capsys.readouterr().err


def test_server_command_line(tmp_path: Path) -> None:
    """What `autothink serve EXPORT --mode long` hands to `vllm serve`: the family's settings
    (our architecture, dict image inputs, no device normalisation), the export's dtype and
    context, and thinking_mode=long as the chat template's default."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from megatron_autothink.rollout.vllm_engine import THINK_RULE_PROCESSOR
    from megatron_autothink.rollout.vllm_qwen2_5_vl import ARCH

    hf = _export_stub(tmp_path / "hf")
    argv = server_argv(
        hf,
        host="127.0.0.1",
        port=8123,
        mode="long",
        dtype="auto",
        max_model_len=None,
        served_model_name="tiny",
    )
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    assert args.model_tag == str(hf) and args.port == 8123
    assert args.hf_overrides == {"architectures": [ARCH]}
    assert args.enable_mm_embeds is True and args.mm_device_do_normalize is False
    assert args.default_chat_template_kwargs == {"thinking_mode": "long"}
    # The forced-mode rule runs in the server too (serve.py's docstring says what it covers).
    assert args.logits_processors == [THINK_RULE_PROCESSOR]
    assert args.dtype == "float32" and args.max_model_len == 2048
    assert args.served_model_name == ["tiny"]
