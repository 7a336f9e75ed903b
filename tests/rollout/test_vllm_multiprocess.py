"""The engine with vLLM's engine core in a child process (``in_process=False``).

vLLM spawns that process (forced on CPU), so the test runs a small script in a fresh
interpreter: our architecture must be registered by the script's top-level import, exactly as a
production entry point would do it. Weight buckets travel as safetensors bytes here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from megatron_autothink.rollout import GenerationRequest, SamplingConfig
from tests.rollout.harness import chat_prompt

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    # Top-level import: spawned vLLM processes re-import this module and get the registration.
    import megatron_autothink.rollout.vllm_worker  # noqa: F401

    if __name__ == "__main__":
        import numpy as np
        from PIL import Image
        from safetensors.torch import load_file
        from megatron_autothink.rollout import (
            GenerationRequest, SamplingConfig, VLLMEngineConfig, VLLMRolloutEngine,
        )
        model_dir, prompt = sys.argv[1], json.loads(sys.argv[2])
        image = Image.fromarray(
            np.random.default_rng(0).integers(0, 256, (84, 112, 3), dtype=np.uint8)
        )
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
        request = [GenerationRequest("mp", prompt, images=[image])]
        config = VLLMEngineConfig(
            model_dir=model_dir, dtype="float32", max_model_len=512, in_process=False,
            weight_bucket_mb=1, start_timeout_s=300,
        )
        with VLLMRolloutEngine(config) as engine:
            before = engine.generate(request, greedy)[0][0]
            weights = load_file(model_dir + "/model.safetensors")
            update = engine.update_weights(((k, v * 1.2) for k, v in weights.items()), 1)
            changed = engine.generate(request, greedy)[0][0]
            engine.update_weights(iter(weights.items()), 2)
            after = engine.generate(request, greedy)[0][0]
            ipc_dir = engine._ipc_dir
        print("RESULT " + json.dumps({
            "before": before.token_ids, "before_lp": before.logprobs,
            "changed": changed.token_ids, "after": after.token_ids, "after_lp": after.logprobs,
            "buckets": update.num_buckets, "ipc_dir": ipc_dir,
        }))
    """
)


def test_multiprocess_engine_generates_and_updates_weights(
    tmp_path: Path, tiny_vl_dir: Path, engine: Any
) -> None:
    prompt = chat_prompt(engine.tokenizer, "multiprocess", num_images=1)
    script = tmp_path / "mp_rollout.py"
    script.write_text(SCRIPT)
    # The child's temp dir, where vLLM would put its IPC sockets (short: socket paths are
    # limited to 107 characters, and pytest's tmp_path is longer than that allows).
    tmp = Path(tempfile.mkdtemp(prefix="at-test-", dir="/tmp"))
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "TMPDIR": str(tmp),
    }
    env.pop("VLLM_RPC_BASE_PATH", None)
    try:
        proc = subprocess.run(
            [sys.executable, str(script), str(tiny_vl_dir), json.dumps(prompt)],
            capture_output=True,
            text=True,
            timeout=400,
            env=env,
            cwd=tmp_path,
        )
        sockets = [p for p in tmp.rglob("*") if p.is_socket()]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["buckets"] > 1
    assert result["changed"] != result["before"]
    assert result["after"] == result["before"] and result["after_lp"] == result["before_lp"]
    # vLLM's IPC sockets lived in the engine's own directory, and nothing is left behind.
    assert not sockets, sockets
    assert Path(result["ipc_dir"]).parent == tmp and not Path(result["ipc_dir"]).exists()

    # Same greedy tokens as the in-process engine of this session (same weights, both fp32).
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (84, 112, 3), dtype=np.uint8))
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    in_process = engine.generate([GenerationRequest("ip", prompt, images=[image])], greedy)
    assert in_process[0][0].token_ids == result["before"]
