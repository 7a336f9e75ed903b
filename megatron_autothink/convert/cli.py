"""``autothink convert hf-to-mcore | mcore-to-hf``.

Mounted by the main CLI as::

    p = sub.add_parser("convert", help=...)
    convert_cli.add_arguments(p)
    p.set_defaults(func=convert_cli.main)

and runnable on its own: ``python -m megatron_autothink.convert.cli hf-to-mcore HF_DIR OUT``.
By default they run in one process (TP=1, PP=1), and that is enough for any layout: a megatron
dist-checkpoint is resharded at load, so one written by one process trains at any TP/PP. Both
also run under ``torchrun`` (``--tp``/``--pp`` = the launched layout) only to spread a model too
large for one process; ``--tp`` without such a launch is refused at once with that command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["add_arguments", "main", "run"]

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``hf-to-mcore`` and ``mcore-to-hf`` sub-commands to ``parser``."""
    sub = parser.add_subparsers(dest="convert_command", metavar="DIRECTION", required=True)

    p = sub.add_parser(
        "hf-to-mcore",
        help="HF Qwen2.5-VL directory (safetensors) -> megatron dist-checkpoint",
        description="Convert a local HF Qwen2.5-VL directory (single or sharded safetensors; "
        ".bin pickles are refused) into a megatron dist-checkpoint loadable at any TP/PP, with "
        "the tokenizer/processor files in OUT/tokenizer and the model config in "
        "OUT/autothink_model.json.",
    )
    p.add_argument("hf_dir", help="local HF model directory (config.json + *.safetensors)")
    p.add_argument("out_dir", help="checkpoint directory to create")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="default: bfloat16 for bf16 weights, else float32",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="build at this TP under torchrun (memory only: the output loads at any TP/PP)",
    )
    p.add_argument(
        "--pp",
        type=int,
        default=1,
        help="build at this PP under torchrun (memory only: the output loads at any TP/PP)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "mcore-to-hf",
        help="megatron dist-checkpoint (any TP/PP) -> HF Qwen2.5-VL directory",
        description="Export a training run's checkpoint (or a converted dist-checkpoint) to a HF "
        "directory that transformers and vLLM load: sharded safetensors + index, config.json and "
        "generation_config.json with the tokenizer's special ids (eos = end of turn), tokenizer "
        "files, preprocessor_config.json and a chat template with thinking_mode "
        "auto/long/short. Everything is checked before anything is written.",
    )
    p.add_argument(
        "ckpt_dir",
        metavar="RUN_OR_CKPT",
        help="a training run dir (its last stage with a checkpoint), a stage dir "
        "(checkpoints/<stage>: its latest iter_N), an iter_N dir, or a checkpoint from "
        "hf-to-mcore",
    )
    p.add_argument("out_dir", help="HF directory to write")
    p.add_argument(
        "--stage", default=None, help="with a run dir: the stage to export (default: last)"
    )
    p.add_argument(
        "--config",
        default=None,
        help="recipe (name or YAML) giving the model config, only for a bare dist-checkpoint "
        "(no autothink_model.json, no meta.json); KEY=VALUE overrides follow via --set",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override of the recipe (repeatable), e.g. --set model.image_token_id=151655",
    )
    p.add_argument(
        "--tokenizer-dir",
        default=None,
        help="default: the run's tokenizer (data.tokenizer_path or DATA/tokenizer), or "
        "CKPT_DIR/tokenizer for a converted checkpoint",
    )
    p.add_argument("--dtype", choices=_DTYPES, default="auto", help="default: as the checkpoint")
    p.add_argument("--max-shard-size", default="5GB", help="per safetensors file (default 5GB)")
    p.add_argument(
        "--chat-template",
        choices=("thinking", "keep"),
        default="thinking",
        help="thinking: write the template with thinking_mode (default); keep: copy the original",
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load at (torchrun)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load at (torchrun)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _layout_refusal(args: argparse.Namespace) -> str | None:
    """Why ``--tp/--pp`` cannot be honoured in this launch, with the command that works."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    need = args.tp * args.pp
    if world % need == 0:
        return None
    src = args.hf_dir if args.convert_command == "hf-to-mcore" else args.ckpt_dir
    return (
        f"--tp {args.tp} --pp {args.pp} needs a multiple of {need} processes, this is {world}. "
        "No layout is needed to convert: a checkpoint written by one process (drop --tp/--pp) "
        "loads at any TP/PP, resharded at load. --tp/--pp only spread a model too large for "
        f"one process; then run: torchrun --nproc-per-node {need} -m "
        f"megatron_autothink.convert.cli {args.convert_command} {src} {args.out_dir} "
        f"--tp {args.tp} --pp {args.pp}"
    )


def main(args: argparse.Namespace) -> int:
    """Run the chosen conversion; return a process exit code (2 on a refused input)."""
    refusal = _layout_refusal(args)
    if refusal:  # before the slow imports and before anything is written
        print(f"autothink convert: error: {refusal}", file=sys.stderr)
        return 2
    import torch

    from megatron_autothink.checkpoint_io import CheckpointError
    from megatron_autothink.config import ConfigError, load_config
    from megatron_autothink.weights.mapping import ConversionError

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        if args.convert_command == "hf-to-mcore":
            from megatron_autothink.convert.hf_to_mcore import hf_to_mcore

            out = hf_to_mcore(
                args.hf_dir,
                args.out_dir,
                dtype=dtype,
                tp=args.tp,
                pp=args.pp,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
        else:
            from megatron_autothink.convert.mcore_to_hf import mcore_to_hf

            model_cfg = load_config(args.config, args.overrides).model if args.config else None
            out = mcore_to_hf(
                args.ckpt_dir,
                args.out_dir,
                model_cfg=model_cfg,
                tokenizer_dir=args.tokenizer_dir,
                stage=args.stage,
                dtype=dtype,
                max_shard_size=args.max_shard_size,
                chat_template=args.chat_template,
                tp=args.tp,
                pp=args.pp,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                announce=_print_once,
            )
    except (ConversionError, ConfigError, CheckpointError) as e:
        print(f"autothink convert: error: {e}", file=sys.stderr)
        return 2
    _print_once(f"wrote {out}")
    return 0


def _print_once(line: str) -> None:
    """Print on global rank 0 only (under torchrun every rank runs this CLI)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)


def run(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m megatron_autothink.convert.cli``, ``tools/convert.py``)."""
    parser = argparse.ArgumentParser(
        prog="python -m megatron_autothink.convert.cli",
        description="Checkpoint conversion between HF Qwen2.5-VL and megatron-autothink.",
    )
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":  # the dist-checkpoint writer spawns processes: keep the guard
    raise SystemExit(run())
