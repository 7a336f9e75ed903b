"""The user's own path (issue #22), with its own generated data, through the CLI only:

own JSONL with images -> `prep shards` + `prep tokenizer` -> `autothink train` (tiny) ->
`autothink convert mcore-to-hf RUN OUT` -> transformers `generate` stops at EOS -> `autothink
serve` answers in auto/long/short, one-shot and as the OpenAI-compatible server.

Slow (three vLLM-free CLI runs of ~30-60 s each, two vLLM starts). The fast parts are in the
default suite: tests/data/test_cli.py (prep shards), tests/convert/test_export_run.py (train ->
export -> generate -> one-shot serve), tests/test_serve.py (the server's command line).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.convert.hf_utils import assert_generate_stops_at_end_of_turn
from tests.convert.test_export_run import TWO_STEPS

CLI = [sys.executable, "-m", "megatron_autothink.cli"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (args, res.stdout[-2000:], res.stderr[-3000:])
    return res


def _own_jsonl(root: Path, n: int = 48) -> Path:
    """LLaVA-style records: a coloured square, half answered with a think block."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    path = root / "own.jsonl"
    with path.open("w") as f:
        for i in range(n):
            name = list(COLORS)[i % len(COLORS)]
            img = root / "images" / f"{i}.png"
            Image.new("RGB", (56 + 28 * (i % 2), 56), COLORS[name]).save(img)
            answer = (
                f"<think>\nThe square looks {name}.\n</think>\n\n{name}"
                if i % 2
                else f"<think>\n\n</think>\n\n{name}"
            )
            rec = {
                "id": f"own-{i}",
                "image": str(img),
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the square?"},
                    {"from": "gpt", "value": answer},
                ],
                "answer": name,
            }
            f.write(json.dumps(rec) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return dict(json.loads(r.read()))


@pytest.mark.slow
@pytest.mark.vllm
def test_own_data_to_served_answers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer
    from transformers import Qwen2_5_VLForConditionalGeneration as Model

    data, run, hf = tmp_path / "data", tmp_path / "run", tmp_path / "hf"
    own = _own_jsonl(tmp_path / "own")
    _cli("prep", "shards", "--input", str(own), "--out", str(data))
    _cli("prep", "tokenizer", "--out", str(data / "tokenizer"))
    trained = _cli(
        "train",
        f"data.train_path={data}",
        f"logging.run_dir={run}",
        *TWO_STEPS,
    )
    assert "[sft] step 2/2 (100%)" in trained.stdout, trained.stdout
    exported = _cli("convert", "mcore-to-hf", str(run), str(hf), "--no-progress")
    assert f"wrote {hf}" in exported.stdout, exported.stdout

    # transformers: the export loads and generate stops at the end of the turn.
    model = Model.from_pretrained(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == end_of_turn

    assert_generate_stops_at_end_of_turn(model, tok, "What colour is the square?", at=2)

    # The documented one-shot command, all three modes from one engine start.
    image = tmp_path / "own" / "images" / "0.png"
    served = _cli(
        "serve",
        str(hf),
        "--prompt",
        "What colour is the square?",
        "--image",
        str(image),
        "--mode",
        "all",
        "--max-new-tokens",
        "8",
        "--json",
    )
    answers = {a["mode"]: a for a in map(json.loads, served.stdout.splitlines())}
    assert list(answers) == ["auto", "long", "short"], served.stdout
    assert answers["auto"]["prefill"] == "" and answers["auto"]["text"]
    assert answers["long"]["turn"].startswith("<think>\n") and answers["long"]["text"]
    assert answers["short"]["turn"].startswith("<think>\n\n</think>\n\n")

    # The server: short by default, a request picks its mode with chat_template_kwargs.
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [*CLI, "serve", str(hf), "--port", str(port), "--mode", "short"],
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("server did not come up: " + (tmp_path / "server.log").read_text()[-3000:])
        png = base64.b64encode(image.read_bytes()).decode()
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                    {"type": "text", "text": "What colour is the square?"},
                ],
            }
        ]
        # ("auto", "") is no override: vLLM 0.32 drops request kwargs whose value is "auto"
        # (renderers/params.merge_kwargs), so it keeps the server's default (docs/serving.md).
        for mode, prefill in (
            (None, "<think>\n\n</think>\n\n"),  # the server's --mode
            ("long", "<think>\n"),
            ("auto", "<think>\n\n</think>\n\n"),
        ):
            extra = {} if mode is None else {"chat_template_kwargs": {"thinking_mode": mode}}
            toks = _post(
                base + "/tokenize",
                {"model": str(hf), "messages": messages, "return_token_strs": True, **extra},
            )
            rendered = tok.convert_tokens_to_string(toks["token_strs"])
            assert rendered.endswith("<|im_start|>assistant\n" + prefill), (mode, rendered)
            out = _post(
                base + "/v1/chat/completions",
                {"model": str(hf), "messages": messages, "max_tokens": 4, **extra},
            )
            assert out["choices"][0]["message"]["content"] is not None, out
            assert out["usage"]["completion_tokens"] > 0, out
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=60)
        log.close()
