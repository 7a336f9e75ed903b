"""Config tree: YAML + dotted overrides, and failures that name the key before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_autothink.config import (
    RECIPES_DIR,
    AutothinkConfig,
    ConfigError,
    dump_config,
    load_config,
)


def test_tiny_recipe_loads_with_overrides() -> None:
    cfg = load_config("tiny_cpu", ["optim.lr=1e-5", "parallel.tp=2", "model.vision.depth=3"])
    assert cfg.optim.lr == 1e-5
    assert cfg.parallel.tp == 2
    assert cfg.model.vision.depth == 3
    assert cfg.recipe == "tiny_cpu"


def test_recipe_by_path_and_dump_round_trip(tmp_path: Path) -> None:
    cfg = load_config(str(RECIPES_DIR / "tiny_cpu.yaml"))
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(str(p)) == cfg


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_shipped_recipe_validates(recipe: str) -> None:
    assert isinstance(load_config(recipe), AutothinkConfig)


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        (["parallel.tp=3"], "parallel.tp", "allowed: [1, 2, 4]"),
        (["parallel.pp=3"], "parallel.pp", "allowed: [1, 2, 4]"),
        (["model.num_query_groups=3"], "model.num_query_groups", "must divide"),
        (["model.mrope_section=[1,2,3]"], "model.mrope_section", "head_dim/2=16"),
        (["data.global_batch_size=7"], "data.global_batch_size", "multiple of"),
        (["parallel.vpp=2"], "parallel.vpp", "pp >= 2"),
        (["model.transformer_impl=local", "model.fp8=hybrid"], "model.fp8", "transformer_engine"),
    ],
)
def test_impossible_layouts_name_the_key(overrides: list[str], key: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config("tiny_cpu", overrides)
    assert key in str(e.value)
    assert allowed in str(e.value)


def test_unknown_key_and_wrong_type() -> None:
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key"):
        load_config("tiny_cpu", ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"parallel\.tp: .*integer"):
        load_config("tiny_cpu", ["parallel.tp=two"])
    with pytest.raises(ConfigError, match=r"model\.transformer_impl"):
        load_config("tiny_cpu", ["model.transformer_impl=cuda"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config("tiny_cpu", ["parallel.tp"])
    with pytest.raises(ConfigError, match=r"parallel\.cp: 2: context parallelism is not"):
        load_config("tiny_cpu", ["parallel.cp=2"])


def test_world_size_checks() -> None:
    cfg = load_config("tiny_cpu", ["parallel.tp=2"])
    assert cfg.world_layout(4) == {"tp": 2, "pp": 1, "cp": 1, "dp": 2}
    with pytest.raises(ConfigError, match="not divisible by tp\\*pp\\*cp=2"):
        cfg.world_layout(3)
    cfg = load_config("tiny_cpu", ["data.global_batch_size=6", "data.micro_batch_size=2"])
    with pytest.raises(ConfigError, match=r"data\.global_batch_size"):
        cfg.world_layout(2)


def test_unknown_recipe_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="tiny_cpu"):
        load_config("nope")


def test_rl_stage_whose_generation_cannot_fit_is_refused_by_name() -> None:
    """Issue #18 defect 1: a stage's max_new_tokens must leave room for the prompt in its own
    seq_length (the stage's overrides, dotted or nested, count; SFT stages are not checked)."""
    stages = (
        "[{name: anneal, kind: sft, steps: 1}, {name: fre, kind: rl, steps: 1}, "
        "{name: mgt, kind: rl, steps: 1, overrides: {data.seq_length: 512, "
        "rollout.max_new_tokens: 512}}]"
    )
    with pytest.raises(ConfigError, match=r"stages\[2\] \(mgt\): rollout.max_new_tokens=512 "):
        load_config("lmm_r1_tiny", [f"stages={stages}"])
    nested = stages.replace(
        "data.seq_length: 512, rollout.max_new_tokens: 512",
        "rollout: {max_new_tokens: 600}",
    )  # 600 >= the run's seq_length 512
    with pytest.raises(ConfigError, match=r"stages\[2\] \(mgt\): rollout.max_new_tokens=600 "):
        load_config("lmm_r1_tiny", [f"stages={nested}"])
    fits = stages.replace("rollout.max_new_tokens: 512", "rollout.max_new_tokens: 511")
    assert load_config("lmm_r1_tiny", [f"stages={fits}"]).stages[2].name == "mgt"
    with pytest.raises(ConfigError, match=r"stages\[1\] \(fre\)"):
        load_config("lmm_r1_tiny", [f"stages={fits}", "rollout.max_new_tokens=512"])


FULL_SCALE = sorted(
    p.stem for p in RECIPES_DIR.glob("*.yaml") if load_config(p.stem).model.name != "tiny"
)


@pytest.mark.parametrize("recipe", FULL_SCALE)
def test_full_scale_recipes_name_their_base(recipe: str) -> None:
    """Qwen2.5-VL-sized recipes fine-tune: they start from a base model, never random init."""
    cfg = load_config(recipe)
    assert cfg.train.init_from and not cfg.train.from_scratch


def test_a_run_without_a_base_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"r4b_bpo_3b.yaml: train\.init_from: empty") as e:
        load_config("r4b_bpo_3b", ["train.init_from="])
    assert "train.from_scratch=true" in str(e.value)
    # a deliberate from-scratch run says so
    assert load_config("r4b_bpo_3b", ["train.init_from=", "train.from_scratch=true"])
    # the tiny recipes train from scratch on purpose; a base given on the command line is used
    assert load_config("tiny_cpu").train.from_scratch
    assert load_config("tiny_cpu", ["train.init_from=/m"]).train.init_from == "/m"
