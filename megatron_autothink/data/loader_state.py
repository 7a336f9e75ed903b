"""Energon loader state as plain containers and tensors, so no checkpoint load runs code.

energon's ``save_state_rank()`` returns nested ``@edataclass`` objects (``SavableDataLoaderState``,
``SavableDatasetCheckpoint``, ``SystemRngState``, ``SliceState``...), ``FlexState`` dicts, tuples,
numpy arrays and tensors. Pickling that and unpickling it at resume lets a crafted
``rank_*.pt`` execute anything; :func:`encode` turns it into what ``torch.load(weights_only=True)``
reads (dicts, lists, tuples, scalars, bytes, tensors) and :func:`decode` rebuilds it, creating
only dataclasses defined in ``megatron.energon`` and ``FlexState``.

Example:
    >>> from megatron.energon.state import FlexState
    >>> s = FlexState(rng=b"\\x01", idx=(1, 2))
    >>> decode(encode(s)) == s and type(decode(encode(s))) is FlexState
    True
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import numpy as np
import torch
from megatron.energon.state import FlexState

__all__ = ["LoaderStateError", "decode", "encode"]

# Tags of the encoded tree. Every dict of the state is stored under one of the first three, so a
# genuine dict whose keys happen to look like tags is never mistaken for one.
_DICT, _FLEX, _DATACLASS, _NDARRAY, _NPSCALAR = (
    "__dict__",
    "__flexstate__",
    "__dataclass__",
    "__ndarray__",
    "__npscalar__",
)
_ALLOWED_PACKAGE = "megatron.energon"


class LoaderStateError(ValueError):
    """A loader state that cannot be stored, or a stored one that is not a valid encoding."""


def encode(obj: Any, where: str = "state") -> Any:
    """``obj`` as weights_only-loadable containers; raises naming the path of an odd value."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, np.ndarray):
        return _array(obj, _NDARRAY, where)
    if isinstance(obj, np.generic):
        return _array(np.asarray(obj), _NPSCALAR, where)
    if isinstance(obj, dict):
        tag = _FLEX if type(obj) is FlexState else _DICT
        if type(obj) not in (dict, FlexState):
            raise LoaderStateError(f"{where}: cannot store a {type(obj).__qualname__}")
        return {
            tag: [[encode(k, f"{where} key"), encode(v, f"{where}[{k!r}]")] for k, v in obj.items()]
        }
    if isinstance(obj, list):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if type(obj) is tuple:
        return tuple(encode(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        _check_module(cls.__module__, where)
        fields = {
            f.name: encode(getattr(obj, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(obj)
        }
        return {_DATACLASS: f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    raise LoaderStateError(
        f"{where}: cannot store a {type(obj).__module__}.{type(obj).__qualname__}"
    )


def decode(obj: Any, where: str = "state") -> Any:
    """Inverse of :func:`encode`; anything but its output raises :class:`LoaderStateError`."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor)):
        return obj
    if isinstance(obj, list):
        return [decode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(decode(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if not isinstance(obj, dict) or len(obj) not in (1, 2):
        raise LoaderStateError(f"{where}: not a loader-state encoding ({type(obj).__qualname__})")
    if _DICT in obj or _FLEX in obj:
        pairs = obj[_DICT] if _DICT in obj else obj[_FLEX]
        if not isinstance(pairs, list):
            raise LoaderStateError(f"{where}: a dict encoding holds a {type(pairs).__qualname__}")
        out = {decode(k, f"{where} key"): decode(v, f"{where}[{k!r}]") for k, v in pairs}
        return FlexState(out) if _FLEX in obj else out
    if _NDARRAY in obj or _NPSCALAR in obj:
        try:
            arr = _unarray(obj, where)
        except LoaderStateError:
            raise
        except (KeyError, TypeError, ValueError) as e:  # a crafted or damaged encoding
            raise LoaderStateError(f"{where}: not a numpy array encoding ({e})") from None
        return arr[()] if _NPSCALAR in obj else arr
    if _DATACLASS in obj:
        cls = _dataclass(obj[_DATACLASS], where)
        if not isinstance(obj.get("fields"), dict):
            raise LoaderStateError(f"{where}: {cls.__qualname__} without its fields")
        values = {k: decode(v, f"{where}.{k}") for k, v in obj["fields"].items()}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if set(values) != set(fields):
            raise LoaderStateError(
                f"{where}: {cls.__qualname__} fields {sorted(values)} != {sorted(fields)} "
                "(saved by another megatron-energon version?)"
            )
        made = cls(**{k: v for k, v in values.items() if fields[k].init})
        for k, v in values.items():
            if not fields[k].init:
                object.__setattr__(made, k, v)
        return made
    raise LoaderStateError(f"{where}: unknown tag {sorted(obj)}")


def _array(arr: np.ndarray, tag: str, where: str) -> dict[str, Any]:
    if arr.dtype.hasobject:
        raise LoaderStateError(f"{where}: cannot store an object array")
    return {tag: np.ascontiguousarray(arr).tobytes(), "meta": (arr.dtype.str, list(arr.shape))}


def _unarray(obj: dict[str, Any], where: str) -> np.ndarray:
    raw = obj[_NDARRAY] if _NDARRAY in obj else obj[_NPSCALAR]
    dtype_str, shape = obj["meta"]
    dtype = np.dtype(str(dtype_str))
    if dtype.hasobject or not isinstance(raw, bytes):
        raise LoaderStateError(f"{where}: not a plain numpy array encoding")
    return np.frombuffer(raw, dtype=dtype).reshape([int(n) for n in shape]).copy()


def _check_module(module: str, where: str) -> None:
    if module != _ALLOWED_PACKAGE and not module.startswith(_ALLOWED_PACKAGE + "."):
        raise LoaderStateError(
            f"{where}: {module} is not part of {_ALLOWED_PACKAGE}; only energon's own state "
            "dataclasses are stored"
        )


def _dataclass(name: Any, where: str) -> type:
    """The energon dataclass ``module:QualName`` names; anything else is refused, unimported."""
    module, _, qualname = str(name).partition(":")
    _check_module(module, where)
    if not all(part.isidentifier() for part in [*module.split("."), *qualname.split(".")]):
        raise LoaderStateError(f"{where}: {name!r} is not a class name")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module):
        raise LoaderStateError(f"{where}: {name!r} is not a megatron-energon dataclass")
    return obj
