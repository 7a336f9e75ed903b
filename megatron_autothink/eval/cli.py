"""``autothink eval``: argument handling around :func:`megatron_autothink.eval.runner.evaluate`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(args: argparse.Namespace) -> int:
    """Run the evaluation; print the summary table; return an exit code (2: bad input)."""
    from megatron_autothink.eval.runner import evaluate, parse_modes

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.model or not args.data:
        print("autothink eval: --model and --data are required", file=sys.stderr)
        return 2
    try:
        modes = parse_modes(args.modes)
    except ValueError as e:
        print(f"autothink eval: {e}", file=sys.stderr)
        return 2
    out = Path(getattr(args, "out", None) or "eval_out")
    try:
        evaluate(
            args.model,
            args.data,
            modes=modes,
            split=getattr(args, "split", "test"),
            limit=getattr(args, "limit", None),
            out=out,
            max_new_tokens=getattr(args, "max_new_tokens", 96),
            temperature=getattr(args, "temperature", None),
        )
    except FileNotFoundError as e:
        print(f"autothink eval: {e}", file=sys.stderr)
        return 2
    print((out / "summary.md").read_text(), end="")
    print(f"wrote {out}/samples.jsonl, summary.json, summary.md")
    return 0
