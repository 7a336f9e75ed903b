"""``autothink prep ...``: argparse wiring for the data-preparation commands.

The main CLI mounts them on its top-level subparsers (``megatron_autothink/cli.py``)::

    sub = parser.add_subparsers(dest="command", required=True)
    add_prep_subcommands(sub)      # adds `prep` with `digits`, `shards`, `tokenizer`
    args = parser.parse_args()
    sys.exit(args.func(args))      # every leaf sets func: args -> exit code

:func:`main` does the same standalone (``python -m megatron_autothink.data.cli prep ...``).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.I)


def parse_size(text: str) -> int:
    """Parse a byte size: ``64MB``, ``512k``, ``1.5GiB``, ``1000`` (binary units: 1 MB = 2**20).

    Example:
        >>> parse_size("64MB"), parse_size("10k"), parse_size("123")
        (67108864, 10240, 123)
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64MB, 512KB, 1GB)")
    value, unit = float(m.group(1)), m.group(2).lower()
    return int(value * 1024 ** " kmgt".index(unit or " "))


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="S3 endpoint for s3:// outputs (default: $AWS_ENDPOINT_URL); credentials are "
        "read from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing (complete or partial) output instead of resuming/refusing",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_digits(args: argparse.Namespace) -> int:
    from megatron_autothink.data.digits import DigitsConfig, prep_digits
    from megatron_autothink.data.shards import PrepError

    try:
        reports = prep_digits(
            args.out,
            n_train=args.train,
            n_test=args.test,
            seed=args.seed,
            text_only=args.text_only,
            config=DigitsConfig(
                digit_size=args.digit_size,
                family=args.family,
                depth_low_digit=args.depth_low_digit,
                depth_any_letter=args.depth_any_letter,
                depth_split_sum=args.depth_split_sum,
            ),
            overwrite=args.overwrite,
            s3_endpoint=args.s3_endpoint,
            max_shard_size=args.max_shard_size,
            progress=not args.no_progress,
            save_tokenizer=not args.no_tokenizer,
        )
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for report in reports.values():
        print(report.summary())  # type: ignore[attr-defined]
    return 0


def _run_shards(args: argparse.Namespace) -> int:
    from megatron_autothink.data.shards import PrepError, PrepOptions, prep_shards

    if args.max_tokens is not None and args.tokenizer is None:
        print("error: --max-tokens needs --tokenizer DIR", file=sys.stderr)
        return 2
    options = PrepOptions(
        split=args.split,
        max_shard_size=args.max_shard_size,
        max_pixels=args.max_pixels or None,
        image_format=args.image_format,
        max_tokens=args.max_tokens,
        tokenizer=args.tokenizer,
        max_error_rate=args.max_error_rate,
        allow_prompt_only=args.allow_prompt_only,
        overwrite=args.overwrite,
        s3_endpoint=args.s3_endpoint,
        progress=not args.no_progress,
    )
    try:
        report = prep_shards(args.input, args.out, options)
    except (PrepError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def _run_tokenizer(args: argparse.Namespace) -> int:
    from megatron_autothink.data.digits import build_tiny_tokenizer

    print(build_tiny_tokenizer(args.out, vocab_size=args.vocab_size))
    return 0


def add_prep_subcommands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``prep`` with ``prep digits``, ``prep shards`` and ``prep tokenizer``.

    Args:
        subparsers: The main parser's ``add_subparsers()`` object.

    Returns:
        The ``prep`` parser (its leaves set ``func``).
    """
    prep = subparsers.add_parser(
        "prep",
        help="prepare datasets (digits, shards) and the tiny tokenizer",
        description="Prepare training data as megatron-energon WebDataset shards.",
    )
    sub = prep.add_subparsers(dest="prep_command", metavar="{digits,shards,tokenizer}")
    sub.required = True
    d = sub.add_parser(
        "digits",
        help="synthetic visual arithmetic on sklearn's handwritten digits",
        description=(
            "Generate the digits set (k handwritten digits per image; questions: first digit, "
            "count, sum, short expression; difficulty 1-5; thinking and direct answers with "
            "\\boxed{N}) and write train/test splits as an energon dataset. Test uses digit "
            "scans never seen in train. Re-running resumes an interrupted run."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    d.add_argument("--train", type=int, default=10_000, metavar="N", help="training samples")
    d.add_argument("--test", type=int, default=1_000, metavar="M", help="test samples")
    d.add_argument("--seed", type=int, default=0, metavar="S", help="generation seed")
    d.add_argument(
        "--text-only", action="store_true", help="the text-only variant (digits in words)"
    )
    d.add_argument("--digit-size", type=_positive_int, default=28, help="pixels per digit")
    d.add_argument(
        "--family",
        choices=("mixed", "depth"),
        default="mixed",
        help="mixed: digit count and operation vary by level; depth: always four digits, only "
        "the depth of the expression varies (a, a+b, a*b, a*b+c, a*b+c*d)",
    )
    d.add_argument(
        "--depth-low-digit",
        type=int,
        choices=range(10),
        default=2,
        metavar="D",
        help="depth family: digits are drawn from D..9 (default 2: no 0/1 shortcuts)",
    )
    d.add_argument(
        "--depth-any-letter",
        action="store_true",
        help="depth family: level 1 asks for a random one of a..d (default: always a)",
    )
    d.add_argument(
        "--depth-split-sum",
        action="store_true",
        help="depth family: level 5's trace adds c*d's tens, then its ones (56+15=66+5=71)",
    )
    d.add_argument(
        "--max-shard-size", type=parse_size, default=parse_size("64MB"), help="bytes per shard"
    )
    d.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="do not save the tiny tokenizer to OUT/tokenizer",
    )
    _add_storage_args(d)
    d.set_defaults(func=_run_digits)

    s = sub.add_parser(
        "shards",
        help="convert LLaVA/ShareGPT JSON(L) or Parquet into energon shards",
        description=(
            "Validate conversation records (LLaVA/ShareGPT JSON/JSONL with image paths relative "
            "to the file, or Parquet with embedded image bytes) into the sample schema, cap and "
            "re-encode images, and write size-bounded WebDataset shards plus energon metadata. "
            "Bad records are reported (file:line, reason), counted and skipped; the run fails "
            "only if their share exceeds --max-error-rate. Re-running on the same --out resumes "
            "an interrupted run and refuses a complete one (unless --overwrite)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument(
        "--input", nargs="+", required=True, metavar="FILE", help=".jsonl/.json/.parquet files"
    )
    s.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    s.add_argument("--split", default="train", help="split part name the shards belong to")
    s.add_argument(
        "--max-shard-size", type=parse_size, default=parse_size("64MB"), help="bytes per shard"
    )
    s.add_argument(
        "--max-pixels",
        type=int,
        default=28 * 28 * 1280,
        metavar="N",
        help="downscale stored images above N pixels (0: keep size)",
    )
    s.add_argument(
        "--image-format",
        choices=("auto", "png", "jpeg"),
        default="auto",
        help="stored image encoding (auto: JPEG stays JPEG, the rest PNG)",
    )
    s.add_argument(
        "--max-tokens",
        type=_positive_int,
        metavar="N",
        help="skip samples longer than N tokens once rendered (needs --tokenizer)",
    )
    s.add_argument("--tokenizer", metavar="DIR", help="local HF tokenizer dir for --max-tokens")
    s.add_argument(
        "--max-error-rate",
        type=float,
        default=0.01,
        help="fail if more than this share of records is bad",
    )
    s.add_argument(
        "--allow-prompt-only",
        action="store_true",
        help="keep records without assistant turn if they have an answer (RL prompt data)",
    )
    _add_storage_args(s)
    s.set_defaults(func=_run_shards)

    t = sub.add_parser(
        "tokenizer",
        help="build the tiny offline Qwen-style tokenizer",
        description="Train the tiny byte-level BPE tokenizer and save an HF tokenizer dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--vocab-size", type=_positive_int, default=768, help="learned vocab size")
    t.set_defaults(func=_run_tokenizer)
    return prep


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: ``python -m megatron_autothink.data.cli prep digits --out DIR``."""
    parser = argparse.ArgumentParser(prog="autothink")
    add_prep_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
