"""Turn whatever ``--model`` names into a HF directory the rollout engine can load.

Accepted inputs:

* a HF Qwen2.5-VL directory (``config.json`` + safetensors), e.g. from ``autothink convert
  mcore-to-hf`` or ``rl/stage.export_hf``: used as is;
* a training checkpoint ``<run_dir>/checkpoints/<stage>/iter_N`` (``meta.json`` + ``dist/``):
  the model is rebuilt from the run's ``config.yaml``, loaded, and written as a HF directory with
  the same code path RL uses for its engine (``rl.stage.export_hf``). ``convert mcore-to-hf``
  expects the converter's own layout (``chunk0`` keys, ``autothink_model.json``), which training
  checkpoints do not have, hence this path.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from megatron_autothink.config import AutothinkConfig, load_config

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A HF directory to evaluate, plus the run config when it came from a training run."""

    hf_dir: Path
    run_cfg: AutothinkConfig | None


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def is_training_checkpoint(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / "dist").is_dir()


def run_dir_of(ckpt: Path) -> Path:
    """``<run_dir>/checkpoints/<stage>/iter_N`` -> ``<run_dir>`` (the folder with config.yaml)."""
    for parent in ckpt.resolve().parents:
        if (parent / "config.yaml").is_file():
            return parent
    raise FileNotFoundError(f"no config.yaml in any parent folder of {ckpt}")


def latest_iter(stage_dir: Path) -> Path:
    """The newest finished ``iter_N`` folder of a stage (what ``latest`` points at)."""
    marker = stage_dir / "latest"
    if marker.is_file():
        return stage_dir / marker.read_text().strip()
    found = sorted(p for p in stage_dir.glob("iter_*") if p.is_dir() and "." not in p.name)
    if not found:
        raise FileNotFoundError(f"no iter_* checkpoint under {stage_dir}")
    return found[-1]


def export_training_checkpoint(ckpt: Path, out_dir: Path) -> AutothinkConfig:
    """Rebuild the run's model at TP=PP=1, load ``ckpt`` into it, write a HF dir to ``out_dir``.

    Returns:
        The run config (its data section gives the image preprocessing and tokenizer).
    """
    from megatron_autothink.convert.runtime import conversion_context
    from megatron_autothink.data.tokenizer import load_tokenizer
    from megatron_autothink.rl.stage import export_hf
    from megatron_autothink.train.checkpoint import CheckpointManager
    from megatron_autothink.train.run import resolve_tokenizer_dir, stages_of
    from megatron_autothink.train.setup import build_model_chunks

    run_dir = run_dir_of(ckpt)
    cfg = load_config(run_dir / "config.yaml")
    stage = next((s for s in stages_of(cfg) if s.name == ckpt.parent.name), None)
    data_path = (stage.train_path if stage else "") or cfg.data.train_path
    tok_dir = resolve_tokenizer_dir(cfg, data_path)
    tokenizer = load_tokenizer(tok_dir)
    # config.yaml is written before train.run fills image_token_id in from the tokenizer.
    model_cfg = cfg.model.model_copy(
        update={"image_token_id": int(tokenizer.convert_tokens_to_ids("<|image_pad|>"))}
    )
    cfg = cfg.model_copy(update={"model": model_cfg})
    with conversion_context(model_cfg, precision="fp32") as (ccfg, ctx):
        chunks = build_model_chunks(
            ccfg, ctx, vocab_size=model_cfg.vocab_size, image_token_id=model_cfg.image_token_id
        )
        CheckpointManager(ckpt.parent, ctx).load(ckpt, chunks, None)
        out_dir.mkdir(parents=True, exist_ok=True)
        export_hf(cfg, ctx, chunks, tokenizer, tok_dir, out_dir)
    (out_dir / "autothink_source.json").write_text(
        json.dumps({"checkpoint": str(ckpt.resolve()), "run_dir": str(run_dir)}, indent=1)
    )
    log.info("exported %s -> %s", ckpt, out_dir)
    return cfg


def resolve_model(model: str | Path, work_dir: Path) -> ResolvedModel:
    """A HF dir for ``model`` (exporting a training checkpoint into ``work_dir/hf`` if needed).

    A stage folder (``checkpoints/<stage>``) means its latest ``iter_N``.
    """
    path = Path(model)
    if is_hf_dir(path):
        return ResolvedModel(path, None)
    if not is_training_checkpoint(path) and path.is_dir() and any(path.glob("iter_*")):
        path = latest_iter(path)
    if is_training_checkpoint(path):
        out = work_dir / "hf"
        cfg = export_training_checkpoint(path, out)
        return ResolvedModel(out, cfg)
    raise FileNotFoundError(
        f"{model}: neither a HF directory (config.json + *.safetensors) nor a training checkpoint "
        "(iter_N with meta.json and dist/)"
    )
