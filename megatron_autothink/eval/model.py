"""Turn whatever ``--model`` names into a HF directory the rollout engine can load.

Accepted inputs:

* a HF Qwen2.5-VL directory (``config.json`` + safetensors), e.g. from ``autothink convert
  mcore-to-hf`` or ``rl/stage.export_hf``: used as is;
* anything ``autothink convert mcore-to-hf`` exports (a run dir, ``checkpoints/<stage>``, an
  ``iter_N`` dir, a converted checkpoint): exported into ``work_dir/hf`` by that same code path
  (:func:`megatron_autothink.convert.mcore_to_hf.mcore_to_hf`), so what eval scores is what a
  user's export would be.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from megatron_autothink.config import AutothinkConfig
from megatron_autothink.convert.source import is_training_checkpoint, latest_iter, resolve_source
from megatron_autothink.weights.mapping import ConversionError

__all__ = [
    "ResolvedModel",
    "export_training_checkpoint",
    "is_hf_dir",
    "is_training_checkpoint",
    "latest_iter",
    "resolve_model",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A HF directory to evaluate, plus the run config when it came from a training run."""

    hf_dir: Path
    run_cfg: AutothinkConfig | None


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def export_training_checkpoint(ckpt: Path, out_dir: Path) -> AutothinkConfig | None:
    """Export ``ckpt`` (run / stage / iter dir) to ``out_dir`` with ``convert mcore-to-hf``.

    Returns:
        The run config (its data section gives the image preprocessing and tokenizer), or None
        for a converted checkpoint.
    """
    from megatron_autothink.convert.mcore_to_hf import mcore_to_hf

    src = resolve_source(ckpt)
    mcore_to_hf(src.ckpt_dir, out_dir, overwrite=True, progress=False, announce=log.info)
    log.info("exported %s -> %s", src.ckpt_dir, out_dir)
    return src.run_cfg


def resolve_model(model: str | Path, work_dir: Path) -> ResolvedModel:
    """A HF dir for ``model`` (exporting a checkpoint into ``work_dir/hf`` if needed)."""
    path = Path(model)
    if is_hf_dir(path):
        return ResolvedModel(path, None)
    out = work_dir / "hf"
    try:
        cfg = export_training_checkpoint(path, out)
    except ConversionError as e:
        raise FileNotFoundError(
            f"{model}: neither a HF directory (config.json + *.safetensors) nor an exportable "
            f"checkpoint: {e}"
        ) from None
    return ResolvedModel(out, cfg)
