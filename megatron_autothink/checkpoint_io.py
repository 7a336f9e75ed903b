"""Reading megatron dist-checkpoints without trusting them: manifests and restricted unpickling.

Shared by training (resume, ``train.init_from``), conversion and evaluation, so it sits below
all of them (it imports only torch and megatron-core).

Two things can go wrong with a checkpoint someone hands us:

* **Corruption** (a flipped block keeps the file size): every finished training checkpoint
  has a manifest (size + CRC32 of each file) in ``meta.json`` next to ``dist/``, and a
  converted one in ``autothink_model.json``; :func:`verify_dist_dir` checks it before anything
  is read. A CRC is no defence against an attacker, who rewrites it.
* **Code execution**: torch's dist-checkpoint reader ``pickle.load``\\ s ``.metadata`` and
  ``torch.load(weights_only=False)``\\ s every non-tensor item. :func:`install_restricted_reader`
  replaces both: ``.metadata`` goes through an unpickler that admits only torch's
  dist-checkpoint metadata classes, torch sizes/dtypes/layouts and plain containers; bytes
  items load with ``weights_only=True``.

Example:
    >>> from megatron_autothink.checkpoint_io import manifest
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a.bin").write_bytes(b"abc")
    >>> manifest(d)
    {'a.bin': [3, 891568578]}
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import json
import logging
import os
import pickle
import signal
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "crc32",
    "describe_load_error",
    "install_restricted_reader",
    "load_dist",
    "manifest",
    "read_dist_metadata",
    "read_json",
    "save_dist",
    "verify_dist_dir",
    "verify_manifest",
]

TRAINING_META = "meta.json"  # next to dist/ in a training checkpoint's iter_N folder
CONVERTED_META = "autothink_model.json"  # inside a dist-checkpoint made by hf-to-mcore


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupted, unsafe or incompatible; names the file."""


def crc32(path: Path, chunk: int = 1 << 22) -> int:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def manifest(folder: Path, exclude: tuple[str, ...] = (TRAINING_META,)) -> dict[str, list[int]]:
    """``{relative path: [size, crc32]}`` of every file under ``folder`` but ``exclude``\\ d
    top-level names (files or folders)."""
    return {
        str(p.relative_to(folder)): [p.stat().st_size, crc32(p)]
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] not in exclude
    }


def verify_manifest(folder: Path, entries: dict[str, Any], prefix: str = "") -> None:
    """Check the entries of ``entries`` under ``prefix``; raise :class:`CheckpointError`
    naming the first missing, truncated or corrupted file."""
    for rel, (size, crc) in entries.items():
        if not rel.startswith(prefix):
            continue
        f = folder / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: size {f.stat().st_size} != {size} (truncated?)")
        if crc32(f) != crc:
            raise CheckpointError(f"{f}: checksum mismatch (corrupted)")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def verify_dist_dir(dist_dir: str | Path) -> None:
    """Check the manifest that covers the dist-checkpoint ``dist_dir`` before it is read.

    ``<iter_N>/dist`` is covered by ``<iter_N>/meta.json`` (a training checkpoint), a converted
    checkpoint by its own ``autothink_model.json``. A dist-checkpoint with neither (written by
    another tool, or converted before manifests existed) is read unverified, with a warning.
    """
    dist_dir = Path(dist_dir)
    training = dist_dir.parent / TRAINING_META
    converted = dist_dir / CONVERTED_META
    if dist_dir.name == "dist" and training.is_file():
        entries = read_json(training).get("manifest")
        if not isinstance(entries, dict):
            raise CheckpointError(f"{training}: no manifest")
        # Only dist/: the rank files are not needed to read the weights.
        verify_manifest(dist_dir.parent, entries, prefix="dist/")
        return
    entries = read_json(converted).get("manifest") if converted.is_file() else None
    if isinstance(entries, dict):
        verify_manifest(dist_dir, entries)
    else:
        log.warning("%s: no manifest (meta.json / %s); not verified", dist_dir, CONVERTED_META)


# ------------------------------------------------------------------------ restricted unpickling

# Where the classes pickled into ``.metadata`` live (torch 2.x); only their dataclasses and
# enums are admitted, not functions or other classes of those modules.
_DCP_MODULES = frozenset(
    {
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.planner",
        "torch.distributed.checkpoint.filesystem",
    }
)
_PLAIN = {("builtins", n) for n in ("set", "frozenset", "slice", "complex")} | {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to torch's layout object
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        if module in _DCP_MODULES and "." not in name:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)
            ):
                return obj
        raise CheckpointError(
            f"{self.source}: refused to unpickle {module}.{name} (only torch dist-checkpoint "
            "metadata classes are admitted; the file is corrupted or crafted)"
        )


def _restricted_read_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
    """torch's ``FileSystemReader.read_metadata`` with :class:`_MetadataUnpickler`."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as f:
        metadata = _MetadataUnpickler(f, str(path)).load()
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__qualname__}, not Metadata")
    if metadata.storage_meta is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _weights_only_load_bytes(self: Any, read_item: Any, value: io.BytesIO) -> None:
    """torch's ``DefaultLoadPlanner.load_bytes`` with ``weights_only=True`` (megatron's
    sharded objects: optimizer param groups, extra state, are plain containers and tensors)."""
    from torch.distributed.checkpoint._traverse import set_element

    fqn = read_item.dest_index.fqn
    try:
        obj = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page of advice; its "WeightsUnpickler error:" line says what.
        why = next((ln for ln in str(e).splitlines() if "WeightsUnpickler" in ln), str(e))
        raise CheckpointError(f"item {fqn}: refused to unpickle ({why.strip()})") from None
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[fqn], obj)
    else:
        self.state_dict[fqn] = obj


def install_restricted_reader() -> None:
    """Make every dist-checkpoint load in this process use the restricted readers (idempotent).

    Patched on torch's classes, not passed per call: megatron builds its reader and planner
    internally (``CachedMetadataFileSystemReader`` and ``MCoreLoadPlanner`` inherit these)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    FileSystemReader.read_metadata = _restricted_read_metadata  # type: ignore[method-assign]
    DefaultLoadPlanner.load_bytes = _weights_only_load_bytes  # type: ignore[method-assign]


def read_dist_metadata(dist_dir: str | Path) -> Any:
    """The torch ``Metadata`` of a dist-checkpoint (tensor names, shapes, dtypes) via the
    restricted unpickler."""
    from torch.distributed.checkpoint import FileSystemReader

    install_restricted_reader()
    return FileSystemReader(str(dist_dir)).read_metadata()


def load_dist(
    sharded_state_dict: dict[str, Any], dist_dir: str | Path, *, verify: bool = True
) -> dict[str, Any]:
    """``megatron.core.dist_checkpointing.load`` after :func:`verify_dist_dir` (``verify=False``:
    the caller has just done it; a CRC pass reads every byte), through the restricted readers.
    Raises :class:`CheckpointError` naming ``dist_dir`` on any failure."""
    from megatron.core import dist_checkpointing

    if verify:
        verify_dist_dir(dist_dir)
    install_restricted_reader()
    try:
        return dict(dist_checkpointing.load(sharded_state_dict, str(dist_dir)))
    except CheckpointError as e:
        raise CheckpointError(f"{dist_dir}: {e}") from e
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{dist_dir}: failed to load ({describe_load_error(e)})") from e


_FORKS_DIE_WITH_PARENT: list[int] = []
"""While non-empty: the pid whose forked children must die with it (see :func:`save_dist`)."""


def _after_fork_in_child() -> None:
    if not _FORKS_DIE_WITH_PARENT:
        return
    parent = _FORKS_DIE_WITH_PARENT[-1]
    _FORKS_DIE_WITH_PARENT.clear()  # this child's own forks are not ours to bind
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to bind with
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def _forks_die_with_parent() -> Iterator[None]:
    """Processes forked in this block get SIGKILL when the forking thread's process dies."""
    _FORKS_DIE_WITH_PARENT.append(os.getpid())
    try:
        yield
    finally:
        _FORKS_DIE_WITH_PARENT.pop()


def save_dist(sharded_state_dict: dict[str, Any], dist_dir: str | Path) -> None:
    """``megatron.core.dist_checkpointing.save`` (synchronous, torch_dist) without the
    multiprocessing Manager server that megatron's writer starts for its results queue.

    Why: ``filesystem_async._get_write_results_queue`` starts ``spawn`` ``Manager()`` (a ~285 MB
    server process plus a resource tracker) at the first save and keeps it for the life of the
    process. It sits in the trainer's process group, so the group-wide SIGTERM of ``scancel`` /
    ``timeout`` / SLURM pre-emption kills it while the trainer's pre-emption save still needs it
    (BrokenPipeError), and after a ``kill -9`` of the trainer it lives on under PID 1 with its
    tracker. In a synchronous save the queue is written and read by this same process (the
    writer's forked workers report through their own local queues), so an in-process queue does
    the job and no helper outlives or dies before the save.

    The writer forks one process per write bucket; forked here, they die with the trainer
    (``PR_SET_PDEATHSIG``): after a ``kill -9`` of the trainer alone mid-save they would
    otherwise go on writing into the unfinished ``.tmp`` checkpoint the next start removes
    (found by ``benchmarks/soak.py``).
    """
    import queue

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # megatron reads the module global lazily and only creates the Manager while it is None.
    slot = "_results_queue"
    patched = hasattr(filesystem_async, slot)
    saved = getattr(filesystem_async, slot, None)
    if patched:
        setattr(filesystem_async, slot, queue.Queue())
    try:
        with _forks_die_with_parent():
            dist_checkpointing.save(sharded_state_dict, str(dist_dir))
    finally:
        if patched:
            setattr(filesystem_async, slot, saved)


def describe_load_error(e: BaseException) -> str:
    """One line for a failed dist-checkpoint load. torch wraps each rank's error (ours included)
    in a ``CheckpointException`` (a BaseException: ``except Exception`` misses it) whose text is
    every rank's traceback; keep the first underlying error."""
    if isinstance(e, CheckpointException) and e.failures:
        inner = next(iter(e.failures.values()))[0]
        return describe_load_error(inner)
    if isinstance(e, CheckpointError):
        return str(e)
    return f"{type(e).__name__}: {e}"
