"""``autothink eval``: argument handling around :func:`megatron_autothink.eval.runner.evaluate`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


class LogOnce(logging.Filter):
    """Let the first record containing ``needle`` through, drop the repeats."""

    def __init__(self, needle: str) -> None:
        super().__init__()
        self.needle = needle
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.needle not in record.getMessage():
            return True
        seen, self.seen = self.seen, True
        return not seen


def quiet_vllm_cpu_warnings() -> None:
    """vLLM's CPU worker replaces ``torch.set_num_threads`` with a function that warns on every
    call; something on the in-process engine's request path calls it repeatedly (248 identical
    lines in one tiny eval). One line says it all. Installed on the logger vLLM's
    ``init_logger`` returns for that module (``logging.getLogger`` of the same name)."""
    logger = logging.getLogger("vllm.v1.worker.cpu_worker")
    if not any(isinstance(f, LogOnce) for f in logger.filters):
        logger.addFilter(LogOnce("torch.set_num_threads"))


def main(args: argparse.Namespace) -> int:
    """Run the evaluation; print the summary table; return an exit code (2: bad input)."""
    from megatron_autothink.eval.runner import evaluate, parse_modes

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_vllm_cpu_warnings()
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
            min_think_tokens=getattr(args, "min_think_tokens", None),
        )
    except FileNotFoundError as e:
        print(f"autothink eval: {e}", file=sys.stderr)
        return 2
    print((out / "summary.md").read_text(), end="")
    print(f"wrote {out}/samples.jsonl, summary.json, summary.md")
    return 0
