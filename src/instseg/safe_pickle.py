"""Reading plain pickles (detectron2's ``.pkl`` weights) without running code from them.

A pickle may name any callable to rebuild its objects; :func:`load_arrays` builds numpy
arrays, numpy scalars and dtypes inside plain containers, and refuses, before building it,
anything else the file asks for. Arrays come back as CPU tensors.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

# What a detectron2 / Detectron model-zoo pickle may build.
_ARRAY_GLOBALS = frozenset(
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
) | {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}


class UnsafePickleError(ValueError):
    """The pickle asks for an object beyond arrays and plain containers (named)."""


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ARRAY_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(f"unsupported GLOBAL {module}.{name}")


def _to_torch(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Mapping):
        return {k: _to_torch(v) for k, v in value.items()}
    return value


def load_arrays(path: str | Path) -> Any:
    """The object of the pickle ``path`` with its numpy arrays as tensors. Raises
    :class:`UnsafePickleError` (naming what was asked for) for any other object and
    ``ValueError`` for a file that is not a readable pickle."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with path.open("rb") as f:
            obj = _ArraysOnly(f, encoding="latin1").load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a readable pickle ({exc})") from exc
    return _to_torch(obj)
