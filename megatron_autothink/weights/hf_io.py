"""Reading and writing HF checkpoint directories, one tensor at a time.

* :class:`HFCheckpoint`: a lazy, read-only ``Mapping[name, Tensor]`` over a local safetensors
  checkpoint (one file, or shards listed in ``model.safetensors.index.json``). Opening it reads
  only the file headers, so names, shapes and dtypes can be validated before any tensor is read.
  Pickle-based weights (``*.bin``, ``*.pt``, ``*.pth``) are refused: unpickling runs arbitrary
  code, and safetensors is what every current Qwen2.5-VL release ships.
* :class:`ShardedSafetensorsWriter`: streams tensors into ``model-0000k-of-0000n.safetensors``
  shards of bounded size plus the index, holding at most one shard in memory.
* :func:`copy_hf_assets`: tokenizer, processor, chat-template and generation-config files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from megatron_autothink.weights.mapping import ConversionError

__all__ = [
    "ASSET_PATTERNS",
    "HFCheckpoint",
    "ShardedSafetensorsWriter",
    "copy_hf_assets",
    "parse_size",
]

INDEX_NAME = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

ASSET_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)
"""Files copied between HF directories and our checkpoints (never weights or code)."""


class HFCheckpoint(Mapping[str, Tensor]):
    """Lazy view of the safetensors weights in a local HF model directory (names as stored)."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise ConversionError(f"{hf_dir}: not a directory")
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        index = self.dir / INDEX_NAME
        if index.is_file():
            self._open_index(index)
        elif (self.dir / "model.safetensors").is_file():
            self._add_file(self.dir / "model.safetensors", None)
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if files:
                for f in files:
                    self._add_file(f, None)
            else:
                self._refuse_or_missing()

    # -- opening --------------------------------------------------------------------------------

    def _refuse_or_missing(self) -> None:
        pickles = sorted(p.name for p in self.dir.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
        pickles += [p.name for p in self.dir.glob("*.bin.index.json")]
        if pickles:
            raise ConversionError(
                f"{self.dir}: only pickle-based weights found ({', '.join(pickles[:4])}); these are "
                "not loaded because unpickling can run arbitrary code. Convert them to safetensors "
                "first (in a sandbox: transformers' save_pretrained(..., safe_serialization=True))."
            )
        raise ConversionError(f"{self.dir}: no *.safetensors weights found")

    def _open_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ConversionError(f"{index}: not a safetensors index ({e})") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (self.dir / s).is_file()]
        if missing:
            raise ConversionError(
                f"{index} lists {len(shards)} shard file(s); missing: {', '.join(missing)}"
            )
        if any(s.endswith(_PICKLE_SUFFIXES) for s in shards):
            self._refuse_or_missing()
        by_shard: dict[str, set[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, set()).add(name)
        for shard in shards:
            self._add_file(self.dir / shard, by_shard[shard])

    def _add_file(self, path: Path, expected: set[str] | None) -> None:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise ConversionError(f"{path}: unreadable safetensors file ({e})") from e
        self._handles[path] = handle
        names = set(handle.keys())
        if expected is not None and not expected <= names:
            lost = sorted(expected - names)
            raise ConversionError(f"{path.name} lacks tensors its index lists: {lost[:5]}")
        for name in names if expected is None else expected:
            if name in self._file_of:
                raise ConversionError(
                    f"tensor {name} is stored twice ({self._file_of[name]}, {path})"
                )
            self._file_of[name] = path

    # -- Mapping --------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Tensor:
        return self._handles[self._file_of[name]].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the file header, without reading the tensor."""
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """dtype from the file header, without reading the tensor."""
        code = self._handles[self._file_of[name]].get_slice(name).get_dtype()
        return _SAFETENSORS_DTYPES[code]

    def close(self) -> None:
        self._handles.clear()


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def parse_size(text: str | int) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"1024"`` -> bytes (decimal units, as transformers uses).

    >>> parse_size("2GB"), parse_size("500MB"), parse_size(7)
    (2000000000, 500000000, 7)
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(float(m.group(1)) * scale[unit])


class ShardedSafetensorsWriter:
    """Write tensors as they arrive into size-bounded safetensors shards plus the index.

    Shards are written under temporary names and renamed to ``model-0000k-of-0000n.safetensors``
    once ``n`` is known (in :meth:`close`). An index is written even for a single shard, so the
    layout never depends on the model size.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 10**9) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self._buffer or any(name in names for _, names in self._shards):
            raise ConversionError(f"tensor {name} written twice")
        # A private contiguous CPU copy: safetensors refuses tensors that share storage, and the
        # caller's tensor may be a view of a larger gathered one.
        t = tensor.detach().to("cpu").contiguous().clone()
        size = t.numel() * t.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = t
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.dir / f".shard-{len(self._shards):05d}.safetensors.tmp"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, rename shards, write ``model.safetensors.index.json``; return shard paths."""
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        final = []
        for k, (tmp, names) in enumerate(self._shards):
            name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.dir / name)
            final.append(self.dir / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return final


def copy_hf_assets(src: str | Path, dst: str | Path, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy tokenizer / processor / chat-template / generation-config files; return their names."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ASSET_PATTERNS:
        if name in skip or not (src / name).is_file():
            continue
        shutil.copy2(src / name, dst / name)
        copied.append(name)
    return copied
