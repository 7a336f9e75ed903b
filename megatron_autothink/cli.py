"""``autothink``: the one command-line entry point.

Subcommands stay thin: they parse arguments and call package functions. Run configs come from one
recipe YAML plus dotted overrides (``autothink train --config recipes/tiny_cpu.yaml train.steps=5``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from megatron_autothink.compat.quiet import silence_known_warnings
from megatron_autothink.config import ConfigError, dump_config, load_config
from megatron_autothink.cpus import prepare_openmp_env

EPILOG = """
Recipes live in recipes/*.yaml (tiny_cpu is the default). Any config key can be overridden with
dotted KEY=VALUE arguments, e.g.:  autothink train --config recipes/tiny_cpu.yaml \\
    train.steps=20 parallel.tp=2 optim.lr=1e-4
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default="tiny_cpu",
        help="recipe name (recipes/NAME.yaml) or path to a recipe YAML (default: tiny_cpu)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _not_yet(what: str, issue: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(
            f"autothink: '{what}' is not available in this build yet ({issue}). "
            "See README.md 'Status' for what works today.",
            file=sys.stderr,
        )
        return 2

    return run


def _resolve(entry: str) -> Callable[..., object] | None:
    """Import ``module:function`` lazily so ``--help`` stays fast and optional parts stay optional."""
    mod_name, fn_name = entry.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("megatron_autothink"):
            return None
        raise
    return getattr(mod, fn_name, None)


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from megatron_autothink.train.progress import phase

    phase("importing torch and megatron-core")
    run = _resolve("megatron_autothink.pipeline:main")
    if run is None:
        return _not_yet("train", "issue #4: the training loop")(args)
    return int(run(cfg) or 0)  # type: ignore[call-overload]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autothink",
        description=(
            "megatron-autothink: train auto-thinking vision-language models "
            "(bi-mode annealing, BPO, VL-Rethinker, LMM-R1) on megatron-core with vLLM rollouts."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "demo",
        help="reproduce R-4B's bi-mode effects at tiny scale on CPU (data, annealing, BPO, "
        "GRPO and SSR controls, eval, export, report)",
        description="The digits-depth task from scratch: naive bi-mode annealing (thinking\n"
        "atrophy) -> a curated continuation -> BPO, with plain GRPO and GRPO+SSR from the same\n"
        "checkpoint as controls; every checkpoint evaluated in auto/long/short mode; HF export;\n"
        "report.md with the goal table and plots (~30 min on 2 cores). Resumable phase by\n"
        "phase; prints each phase's time.",
        epilog="Examples:\n  autothink demo --out runs/demo_s2 --seed 2\n"
        "  autothink demo --out runs/demo_lc05 rl.rewards.length_cost=0.5\n"
        "Settings are recorded in OUT/demo_args.json; resuming OUT with others is refused.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--smoke", action="store_true", help="minutes-long version used by CI")
    p.add_argument(
        "--seed", type=int, default=None, help="train.seed (default: the recipe's, 1234)"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides of recipes/demo_tiny.yaml (demo_smoke.yaml with --smoke)",
    )
    p.set_defaults(func=_entry("megatron_autothink.demo:main", "demo", "issue #9: the demo"))

    add_prep = _resolve("megatron_autothink.data.cli:add_prep_subcommands")
    if add_prep is not None:
        add_prep(sub)  # registers `prep digits|shards|tokenizer`
    else:
        p = sub.add_parser("prep", help="build WebDataset shards (not available in this build)")
        p.set_defaults(func=_not_yet("prep", "issue #3: the data pipeline"))

    p = sub.add_parser(
        "train",
        help="train with a recipe (annealing SFT or RL stages)",
        description="Run a recipe's stages with megatron-core (torchrun/srun for several ranks).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "eval",
        help="evaluate a model in auto/long/short thinking modes",
        description="Generate with the rollout engine on a test split and score the answers.",
    )
    # required=True: argparse refuses a missing flag at once, before the slow imports.
    p.add_argument(
        "--model",
        required=True,
        help="HF directory, or a training run / checkpoints/<stage> / iter_N dir (exported "
        "with `autothink convert mcore-to-hf` into OUT/hf first)",
    )
    p.add_argument("--data", required=True, help="shard folder or URL")
    p.add_argument("--modes", default="auto,long,short", help="comma list of thinking modes")
    p.add_argument("--split", default="test", help="split part to evaluate (default: test)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts")
    p.add_argument("--out", default="eval_out", help="output folder (default: eval_out)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer budget (default 96)")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature (default: the run's rollout.eval_temperature, else 0)",
    )
    p.add_argument(
        "--min-think-tokens",
        type=int,
        default=None,
        help="long mode may not close its think block (or stop) before this many content "
        "tokens (default: the run's rollout.min_think_tokens, else 8; 0: the prefill alone)",
    )
    p.set_defaults(func=_entry("megatron_autothink.eval.cli:main", "eval", "issue #9: eval"))

    p = sub.add_parser(
        "serve",
        help="answer with an exported model (one-shot or an OpenAI-compatible server) in "
        "auto/long/short thinking modes",
        description="Serve a HF directory from `autothink convert mcore-to-hf` on vLLM: "
        "`--prompt TEXT [--image PATH]` answers once per --mode and exits; without --prompt, "
        "vLLM's OpenAI-compatible server (docs/serving.md).",
    )
    add_serve = _resolve("megatron_autothink.serve:add_arguments")
    if add_serve is not None:
        add_serve(p)
    p.set_defaults(func=_entry("megatron_autothink.serve:main", "serve", "issue #22"))

    p = sub.add_parser(
        "convert",
        help="convert checkpoints between Hugging Face Qwen2.5-VL and megatron",
        description="hf-to-mcore / mcore-to-hf checkpoint conversion at any TP/PP.",
    )
    add_convert = _resolve("megatron_autothink.convert.cli:add_arguments")
    if add_convert is not None:
        add_convert(p)
        p.set_defaults(func=_entry("megatron_autothink.convert.cli:main", "convert", "issue #7"))
    else:
        p.set_defaults(func=_not_yet("convert", "issue #7: conversion"))

    p = sub.add_parser(
        "launch",
        help="render and submit SLURM jobs (autothink launch slurm --config R --nodes N)",
        description="Write an sbatch script for a recipe and submit it (or print it).",
    )
    add_launch = _resolve("megatron_autothink.launch.cli:add_arguments")
    if add_launch is not None:
        add_launch(p)
        p.set_defaults(func=_entry("megatron_autothink.launch.cli:main", "launch", "issue #8"))
    else:
        p.set_defaults(func=_not_yet("launch", "issue #8: SLURM launcher"))

    return parser


def _entry(entry: str, what: str, issue: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        fn = _resolve(entry)
        if fn is None:
            return _not_yet(what, issue)(args)
        return int(fn(args) or 0)  # type: ignore[call-overload]

    return run


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything imports torch: libgomp reads its wait policy once, at load.
    prepare_openmp_env()
    silence_known_warnings()  # megatron-core's TE/Apex fallback notes & co. (compat/quiet.py)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a positional `nargs="*"` at the first option, so
    # `train a=1 --config X b=2` leaves `b=2` over; dotted overrides may come in any order.
    if extra and isinstance(getattr(args, "overrides", None), list):
        stray = [x for x in extra if x.startswith("-") or "=" not in x]
        if not stray:
            args.overrides += extra
            extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"autothink: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
