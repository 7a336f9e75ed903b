"""Backend choice and ``model.fp8``: FP8 this machine cannot run is a config error naming the
field and the reason, found before any work starts (never a silent fall-back to local layers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from megatron_autothink.cli import main
from megatron_autothink.config import ConfigError, load_config
from megatron_autothink.models import specs


def _fake_machine(
    monkeypatch: pytest.MonkeyPatch, *, te: bool, gpu: bool, capability: tuple[int, int] = (9, 0)
) -> None:
    monkeypatch.setattr(specs, "te_importable", lambda: te)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")


@pytest.mark.parametrize(
    ("te", "gpu", "capability", "impl", "reason"),
    [
        (False, False, (0, 0), "auto", "transformer_engine is not installed and no CUDA GPU"),
        (False, True, (9, 0), "auto", "transformer_engine is not installed"),
        (True, False, (0, 0), "auto", "no CUDA GPU is available"),
        (True, True, (8, 0), "auto", "FakeGPU has compute capability 8.0"),
        (True, True, (8, 0), "transformer_engine", "FakeGPU has compute capability 8.0"),
    ],
)
def test_fp8_without_te_or_fp8_gpu_names_field_and_reason(
    monkeypatch: pytest.MonkeyPatch,
    te: bool,
    gpu: bool,
    capability: tuple[int, int],
    impl: str,
    reason: str,
) -> None:
    cfg = load_config("tiny_cpu", ["model.fp8=hybrid", f"model.transformer_impl={impl}"])
    _fake_machine(monkeypatch, te=te, gpu=gpu, capability=capability)
    with pytest.raises(ConfigError) as e:
        specs.resolve_backend(cfg.model)
    msg = str(e.value)
    assert msg.startswith("model.fp8=hybrid needs Transformer Engine"), msg
    assert reason in msg and "set model.fp8=none" in msg, msg


def test_fp8_on_hopper_with_te_resolves_to_te(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("tiny_cpu", ["model.fp8=e4m3"])
    _fake_machine(monkeypatch, te=True, gpu=True, capability=(9, 0))
    assert specs.resolve_backend(cfg.model) == "transformer_engine"
    _fake_machine(monkeypatch, te=False, gpu=False)
    assert specs.resolve_backend(load_config("tiny_cpu").model) == "local"  # fp8=none: no check


def test_fp8_train_on_this_machine_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`autothink train model.fp8=hybrid` here (no TE): exit 2 with one line naming the field
    and the reason, before any data, process group, run folder or model exists."""
    if specs.te_available() and torch.cuda.get_device_capability() >= specs.FP8_MIN_CAPABILITY:
        pytest.skip("this machine can run FP8")
    argv = ["train", "model.fp8=hybrid", f"logging.run_dir={tmp_path / 'run'}"]
    assert main([*argv, f"data.train_path={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autothink: config error: model.fp8=hybrid needs Transformer Engine"), err
    assert not (tmp_path / "run").exists()


def test_te_layers_without_te_name_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("tiny_cpu", ["model.transformer_impl=transformer_engine"])
    _fake_machine(monkeypatch, te=False, gpu=False)
    with pytest.raises(ConfigError, match=r"^model\.transformer_impl=transformer_engine needs"):
        specs.resolve_backend(cfg.model)


def _checkpoint_weight_keys() -> list[str]:
    from megatron_autothink.config import load_config
    from megatron_autothink.parallel import init_distributed, seed_everything
    from megatron_autothink.train.setup import build_model_chunks
    from megatron_autothink.weights.live import unwrap

    cfg = load_config("tiny_cpu")
    ctx = init_distributed(cfg)
    seed_everything(0, ctx)
    (chunk,) = build_model_chunks(cfg, ctx, vocab_size=cfg.model.vocab_size, image_token_id=7)
    # The checkpoint key is each sharded tensor's ``key`` (the keys map rewrites those, not the
    # dict's module-path keys).
    return [
        v.key
        for k, v in unwrap(chunk).sharded_state_dict().items()
        if not k.endswith("_extra_state")
    ]


def test_local_layers_checkpoint_under_transformer_engine_names() -> None:
    """The local spec saves its language-model norms under TE's fused names, so a checkpoint
    from GPU (TE) runs loads on CPU (local) and back; the vision tower keeps its names."""
    import re

    from megatron_autothink.config import load_config
    from megatron_autothink.weights.mapping import weight_specs
    from tests.dist_utils import run_distributed

    (keys,) = run_distributed(_checkpoint_weight_keys, 1)
    te_names = {s.mcore for s in weight_specs(load_config("tiny_cpu").model, fused_norms=True)}
    # The language model's decoder block stacks its layers into one key per weight (the layer
    # is a shard offset); the vision tower keeps one key per layer.
    stacked = {re.sub(r"^(language_model\.decoder\.layers)\.\d+\.", r"\1.", n) for n in te_names}
    assert set(keys) == stacked
    assert "language_model.decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "vision.layers.0.input_layernorm.weight" in keys


def test_te_spec_takes_sdpa_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """The TE spec keeps megatron's layer but swaps its core attention for SDPAAttention (TE's
    ignores the packing mask under the causal mask type). TE is not installed here, so megatron's
    local GPT spec, built the same way, stands in for the TE one."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_autothink.models.attention import SDPAAttention

    stand_in = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    assert stand_in.submodules.self_attention.submodules.core_attention is DotProductAttention
    monkeypatch.setattr(
        gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec", lambda **kw: stand_in
    )
    spec = specs.te_layer_spec()
    attention = spec.submodules.self_attention
    assert attention.submodules.core_attention is SDPAAttention
    assert attention.params["attn_mask_type"] == AttnMaskType.causal  # the rest is megatron's
