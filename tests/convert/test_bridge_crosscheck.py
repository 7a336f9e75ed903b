"""Optional cross-check against NVIDIA megatron-bridge's Qwen2.5-VL conversion.

megatron-bridge is not a dependency (it needs Python >= 3.12 and CUDA-only packages; see
shared/platform-notes.md), so this test is skipped unless it is importable. Where it is, the
HF -> megatron tensors of our mapping must equal the bridge's for the language model (the
bridge's vision tower uses different module names; only the shared language-model names are
compared).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

bridge = pytest.importorskip("megatron.bridge", reason="megatron-bridge is not installed")


def test_language_model_tensors_match_bridge(tmp_path: Path) -> None:
    from megatron_autothink.convert.hf_to_mcore import inspect_hf_dir
    from megatron_autothink.weights.hf_io import HFCheckpoint
    from megatron_autothink.weights.mapping import hf_to_megatron_full
    from tests.convert.hf_utils import TinySpec, save_hf_model

    save_hf_model(TinySpec(tie=False), tmp_path)
    model_cfg, _ = inspect_hf_dir(tmp_path)
    ours = hf_to_megatron_full(HFCheckpoint(tmp_path), model_cfg)

    auto_bridge = bridge.AutoBridge.from_hf_pretrained(str(tmp_path))
    provider = auto_bridge.to_megatron_provider(load_weights=True)
    provider.tensor_model_parallel_size = 1
    provider.pipeline_model_parallel_size = 1
    provider.finalize()
    (theirs_model,) = provider.provide_distributed_model(wrap_with_ddp=False)
    theirs = {k: v for k, v in theirs_model.state_dict().items() if isinstance(v, torch.Tensor)}
    compared = 0
    for name, tensor in ours.items():
        if not name.startswith("language_model.decoder."):
            continue
        if name in theirs:
            assert torch.equal(theirs[name].to(tensor.dtype).cpu(), tensor), name
            compared += 1
    assert compared > 0, "no shared language-model names with megatron-bridge"
