"""What ``autothink convert mcore-to-hf SRC`` (and ``autothink eval --model``) exports from.

``SRC`` may be

* a converted checkpoint (``autothink convert hf-to-mcore``: ``autothink_model.json``, its
  tokenizer in ``tokenizer/``), or a bare dist-checkpoint (``metadata.json``; needs ``--config``);
* a training checkpoint ``<run>/checkpoints/<stage>/iter_N`` (``meta.json`` + ``dist/``): the
  resolved config is read from its ``meta.json``, the tokenizer from that config;
* a stage dir ``<run>/checkpoints/<stage>``: its ``latest`` (else newest) ``iter_N``;
* a run dir (``config.yaml``, ``checkpoints/``): the last stage of the recipe that has a
  checkpoint, or ``stage=NAME``.

Everything here only reads files, so a bad source is refused before any output is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from megatron_autothink.checkpoint_io import manifest
from megatron_autothink.config import AutothinkConfig, ModelConfig
from megatron_autothink.weights.mapping import ConversionError

if TYPE_CHECKING:
    import torch

# This module is also imported by light CLIs (eval): json and yaml only, no megatron-core.
META_NAME = "autothink_model.json"
"""Side-car file in converted megatron checkpoints: model config, vocab, dtype, source HF config."""
META_FORMAT = "megatron-autothink/qwen2.5-vl"
META_VERSION = 1
TOKENIZER_SUBDIR = "tokenizer"
"""Tokenizer / processor / chat-template files of a converted checkpoint live here."""

__all__ = [
    "META_NAME",
    "ExportSource",
    "is_training_checkpoint",
    "latest_iter",
    "read_meta",
    "resolve_source",
    "run_dir_of",
    "write_meta",
]


@dataclass(frozen=True, slots=True)
class ExportSource:
    """A resolved checkpoint to export."""

    ckpt_dir: Path
    """The checkpoint folder (``iter_N`` of a run, or the converted checkpoint itself)."""
    dist_dir: Path
    """The megatron dist-checkpoint inside it."""
    model_cfg: ModelConfig | None
    """None for a bare dist-checkpoint (the caller must pass the config)."""
    run_cfg: AutothinkConfig | None
    """The training run's resolved config (training checkpoints only)."""
    tokenizer_dir: Path | None
    hf_base: dict[str, Any] | None
    """Original HF config of a converted checkpoint (special ids, tokens_per_second, ...)."""
    description: str
    """Which checkpoint was picked and why, for the CLI's output."""


def is_training_checkpoint(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / "dist").is_dir()


def _iters(stage_dir: Path) -> list[Path]:
    # iter_N.tmp folders are unfinished saves.
    return sorted(p for p in stage_dir.glob("iter_*") if p.is_dir() and "." not in p.name)


def latest_iter(stage_dir: Path) -> Path:
    """The newest finished ``iter_N`` folder of a stage (what ``latest`` points at)."""
    marker = stage_dir / "latest"
    if marker.is_file():
        return stage_dir / marker.read_text().strip()
    found = _iters(stage_dir)
    if not found:
        raise ConversionError(f"{stage_dir}: no iter_* checkpoint (did the stage save one?)")
    return found[-1]


def run_dir_of(ckpt: Path) -> Path | None:
    """``<run_dir>/checkpoints/<stage>/iter_N`` -> ``<run_dir>`` (the folder with config.yaml)."""
    for parent in ckpt.resolve().parents:
        if (parent / "config.yaml").is_file():
            return parent
    return None


def _parse_config(text: str, where: str) -> AutothinkConfig:
    try:
        return AutothinkConfig.model_validate(yaml.safe_load(text) or {})
    except Exception as e:  # pydantic / yaml: say which file
        raise ConversionError(f"{where}: not a readable autothink config ({e})") from None


def _pick_stage(run_dir: Path, stage: str | None) -> tuple[Path, str]:
    cfg = _parse_config((run_dir / "config.yaml").read_text(), str(run_dir / "config.yaml"))
    root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    if not root.is_absolute() and not root.is_dir():
        root = run_dir / "checkpoints"  # a relative checkpoint.dir seen from another cwd
    order = [s.name for s in cfg.stages] or ["sft"]
    have = [name for name in order if (root / name).is_dir() and _iters(root / name)]
    if stage is not None:
        if stage not in have:
            raise ConversionError(
                f"{run_dir}: stage {stage!r} has no checkpoint under {root} "
                f"(stages with one: {', '.join(have) or 'none'})"
            )
        return root / stage, f"stage {stage} (--stage)"
    if not have:
        raise ConversionError(
            f"{run_dir}: no stage of {order} has a checkpoint under {root} (set "
            "checkpoint.save_every or let the stage finish; it saves at its last step)"
        )
    why = "the last stage with a checkpoint" if len(order) > 1 else "the run's only stage"
    return root / have[-1], f"stage {have[-1]} ({why}; pick another with --stage)"


def _tokenizer_of(cfg: AutothinkConfig, ckpt: Path, stage_name: str) -> Path:
    from megatron_autothink.data.tokenizer import resolve_tokenizer_dir

    stage = next((s for s in cfg.stages if s.name == stage_name), None)
    data_path = (stage.train_path if stage else "") or cfg.data.train_path
    try:
        return Path(resolve_tokenizer_dir(cfg, data_path))
    except FileNotFoundError as e:
        raise ConversionError(
            f"{ckpt}: the run's tokenizer is not found ({e}); pass --tokenizer-dir DIR"
        ) from None


def resolve_source(
    path: str | Path, *, stage: str | None = None, tokenizer_dir: str | Path | None = None
) -> ExportSource:
    """Find the checkpoint, its config and its tokenizer; raise :class:`ConversionError` naming
    the file when one is missing."""
    src = Path(path)
    if not src.is_dir():
        raise ConversionError(f"{src}: no such directory")
    tok = Path(tokenizer_dir) if tokenizer_dir else None
    if tok is not None and not tok.is_dir():
        raise ConversionError(f"--tokenizer-dir {tok}: no such directory")
    if (src / META_NAME).is_file() or (src / "metadata.json").is_file():
        if stage is not None:
            raise ConversionError(f"{src} is a single checkpoint: --stage does not apply")
        meta = read_meta(src)
        return ExportSource(
            ckpt_dir=src,
            dist_dir=src,
            model_cfg=ModelConfig.model_validate(meta["model"]) if meta else None,
            run_cfg=None,
            tokenizer_dir=tok or src / TOKENIZER_SUBDIR,
            hf_base=meta.get("hf_config") if meta else None,
            description=f"converted checkpoint {src}",
        )
    how = ""
    if not is_training_checkpoint(src):
        if (src / "config.yaml").is_file():
            stage_dir, how = _pick_stage(src, stage)
            src = latest_iter(stage_dir)
        elif (src / "latest").is_file() or _iters(src):
            if stage is not None and stage != src.name:
                raise ConversionError(f"{src} is the checkpoints of stage {src.name}, not {stage}")
            src = latest_iter(src)
            how = f"stage {src.parent.name}"
        else:
            raise ConversionError(
                f"{path}: not a checkpoint. Expected a run dir (config.yaml + checkpoints/), a "
                "stage dir (checkpoints/<stage> with iter_*), an iter_N dir (meta.json + dist/) "
                f"or a converted checkpoint ({META_NAME})"
            )
        if not is_training_checkpoint(src):
            raise ConversionError(
                f"{src}: no meta.json + dist/ (an unfinished save? meta.json is written last)"
            )
    elif stage is not None and stage != src.parent.name:
        raise ConversionError(f"{src} is a checkpoint of stage {src.parent.name}, not {stage}")
    meta_path = src / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{meta_path}: unreadable ({e})") from None
    if "config" in meta:
        cfg = _parse_config(meta["config"], f"{meta_path} (field config)")
    else:  # written by an older version: the run's config.yaml
        run_dir = run_dir_of(src)
        if run_dir is None:
            raise ConversionError(f"{meta_path} has no field config and no parent has config.yaml")
        cfg = _parse_config((run_dir / "config.yaml").read_text(), str(run_dir / "config.yaml"))
    stage_name = str(meta.get("stage") or src.parent.name)
    tok = tok or _tokenizer_of(cfg, src, stage_name)
    desc = f"{src} (step {meta.get('step', '?')}; {how})" if how else f"{src}"
    return ExportSource(
        ckpt_dir=src,
        dist_dir=src / "dist",
        model_cfg=cfg.model,
        run_cfg=cfg,
        tokenizer_dir=tok,
        hf_base=None,
        description=desc,
    )


def write_meta(
    out_dir: Path,
    model_cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    hf_config: dict[str, Any] | None,
    source: str,
) -> None:
    """Write the side-car, with a manifest of the dist-checkpoint files beside it (sizes and
    CRCs, checked by ``checkpoint_io.verify_dist_dir`` before every load)."""
    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "model": model_cfg.model_dump(mode="json"),
        "dtype": str(dtype).removeprefix("torch."),
        "source": source,
        "hf_config": hf_config,
        "manifest": manifest(out_dir, exclude=(META_NAME, TOKENIZER_SUBDIR)),
    }
    (out_dir / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(ckpt_dir: Path) -> dict[str, Any] | None:
    """The side-car of a converted checkpoint, or None for a checkpoint without one."""
    path = ckpt_dir / META_NAME
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != META_FORMAT or int(meta.get("version", 0)) > META_VERSION:
        raise ConversionError(
            f"{path}: format {meta.get('format')!r} v{meta.get('version')} is not one this "
            f"version reads ({META_FORMAT!r} <= v{META_VERSION})"
        )
    return meta
