"""Checkpoints that never unpickle: safetensors for tensors, JSON for everything else.

A checkpoint called ``name`` in ``work_dir`` is three files:

- ``{name}.safetensors``: the model ``state_dict`` (also loadable alone, for eval/predict);
- ``{name}.optim.safetensors``: every tensor of the optimizer state, keyed
  ``state.{param_id}.{key}`` (``param_groups.{i}.{key}`` for a tensor-valued group entry);
- ``{name}.json``: optimizer param groups and non-tensor state, the caller's training
  state (iteration, data position, config...), the RNG states (torch CPU and CUDA, python
  ``random``, numpy) and the SHA-256 of both tensor files.

Every file is written to a temporary file in the same folder, fsync'd and renamed into
place; the json goes last and is removed first when a name is saved again, so it is the
commit marker: a checkpoint is complete iff its json exists, and a crash at any point
leaves every earlier checkpoint loadable. The checksums catch a tensor file that is
truncated, corrupt or from another save.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

from ..fileio import atomic_write_bytes, fsync_dir

FORMAT = "instseg.checkpoint"
VERSION = 1
FINAL_NAME = "model_final"
WEIGHTS_SUFFIX = ".safetensors"
OPTIM_SUFFIX = ".optim.safetensors"
JSON_SUFFIX = ".json"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file (and key)."""


def checkpoint_files(work_dir: str | Path, name: str) -> tuple[Path, Path, Path]:
    """Paths of the weights, optimizer and json files of checkpoint ``name``."""
    work_dir = Path(work_dir)
    return (
        work_dir / f"{name}{WEIGHTS_SUFFIX}",
        work_dir / f"{name}{OPTIM_SUFFIX}",
        work_dir / f"{name}{JSON_SUFFIX}",
    )


# ----------------------------------------------------------------------------- file writing


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _own_storage(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached contiguous CPU tensors, none sharing storage with another (safetensors
    refuses shared storage: tied weights are stored once per key)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"cannot save {key!r}: expected a tensor, got {type(value).__name__}")
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        ptr = _storage_key(t)
        whole = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
        if ptr == 0 or ptr in seen or not whole or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        out[key] = t
    return out


def _jsonable(value: Any, where: str) -> Any:
    """``value`` itself after checking that it serialises to JSON (error names ``where``)."""
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where} is not JSON-serialisable: {exc}") from exc
    return value


# ------------------------------------------------------------------------------- RNG state


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU, CUDA where initialised, python, numpy) as JSON."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return {
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
        "cuda": cuda,
        "python": {
            "version": version,
            "internal": _b64(np.asarray(internal, dtype=np.uint32).tobytes()),
            "gauss": gauss,
        },
        "numpy": {
            "name": np_name,
            "keys": _b64(np.asarray(np_keys, dtype=np.uint32).tobytes()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
    }


def _byte_tensor(text: str) -> Tensor:
    return torch.frombuffer(bytearray(_unb64(text)), dtype=torch.uint8).clone()


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    torch.set_rng_state(_byte_tensor(state["torch"]))
    cuda = state.get("cuda") or []
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all([_byte_tensor(s) for s in cuda])
        else:
            warnings.warn(
                f"the checkpoint holds CUDA RNG states of {len(cuda)} device(s) but "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} are "
                "available here: CUDA random numbers will differ from the original run",
                stacklevel=3,
            )
    py = state["python"]
    internal = tuple(int(v) for v in np.frombuffer(_unb64(py["internal"]), dtype=np.uint32))
    random.setstate((int(py["version"]), internal, py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            np.frombuffer(_unb64(npy["keys"]), dtype=np.uint32).copy(),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )


# -------------------------------------------------------------------------------- saving


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Split ``optimizer.state_dict()`` into its tensors and a JSON description."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for param_id, entries in sd["state"].items():
        described: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensor_key = f"state.{param_id}.{key}"
                tensors[tensor_key] = value
                described[key] = {"tensor": tensor_key}
            else:
                where = f"optimizer state {param_id}.{key}"
                described[key] = {"value": _jsonable(value, where)}
        state[str(param_id)] = described
    groups: list[dict[str, Any]] = []
    tensor_fields: list[list[Any]] = []
    for i, group in enumerate(sd["param_groups"]):
        described = {}
        for key, value in group.items():
            if isinstance(value, Tensor):
                tensor_key = f"param_groups.{i}.{key}"
                tensors[tensor_key] = value
                described[key] = None
                tensor_fields.append([i, key, tensor_key])
            else:
                described[key] = _jsonable(value, f"optimizer param_groups[{i}].{key}")
        groups.append(described)
    return tensors, {"state": state, "param_groups": groups, "tensor_fields": tensor_fields}


def _tensor_file_bytes(tensors: dict[str, Tensor], kind: str) -> bytes:
    return safetensors.torch.save(_own_storage(tensors), metadata={"format": "pt", "kind": kind})


def remove_checkpoint(work_dir: str | Path, name: str) -> None:
    """Delete checkpoint ``name``: its json (the commit marker) first, then the tensors."""
    weights, optim, meta = checkpoint_files(work_dir, name)
    for path in (meta, weights, optim):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    fsync_dir(Path(work_dir))


def save_checkpoint(
    work_dir: str | Path,
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
) -> Path:
    """Write checkpoint ``name`` (weights, optimizer tensors, then the json); returns the
    json path. ``state`` must be JSON-serialisable; the global RNG states are added."""
    if not name or "/" in name or os.sep in name or name.startswith("."):
        raise ValueError(f"invalid checkpoint name {name!r}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    weights_path, optim_path, json_path = checkpoint_files(work_dir, name)
    _jsonable(state, "checkpoint state")
    # Everything that can fail on bad input is prepared before any file is touched.
    weights = _tensor_file_bytes(model.state_dict(), "model")
    optim_bytes = None
    optim_meta = None
    if optimizer is not None:
        optim_tensors, optim_meta = _optimizer_parts(optimizer)
        optim_bytes = _tensor_file_bytes(optim_tensors, "optimizer")
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "torch_version": torch.__version__,
        "files": {
            "model": {
                "file": weights_path.name,
                "sha256": hashlib.sha256(weights).hexdigest(),
                "bytes": len(weights),
            },
            "optimizer": None,
        },
        "optimizer": optim_meta,
        "rng": rng_state(),
        "state": state,
    }
    if optim_bytes is not None:
        meta["files"]["optimizer"] = {
            "file": optim_path.name,
            "sha256": hashlib.sha256(optim_bytes).hexdigest(),
            "bytes": len(optim_bytes),
        }
    text = json.dumps(meta, indent=1, allow_nan=True).encode("utf-8")

    # Un-commit an older save of the same name before replacing its files.
    if json_path.exists():
        json_path.unlink()
        fsync_dir(work_dir)
    atomic_write_bytes(weights_path, weights)
    if optim_bytes is not None:
        atomic_write_bytes(optim_path, optim_bytes)
    else:
        with contextlib.suppress(FileNotFoundError):
            optim_path.unlink()
    atomic_write_bytes(json_path, text)
    return json_path


# ------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint json ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an instseg checkpoint json")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('version')!r}, "
            f"this instseg reads version {VERSION}"
        )
    for key in ("files", "rng", "state"):
        if key not in meta:
            raise CheckpointError(f"{path}: missing key {key!r}")
    return meta


def _read_tensors(path: Path, sha256: str | None, json_path: Path | None) -> dict[str, Tensor]:
    """Tensors of a safetensors file, checked against its recorded checksum (if any)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(
            f"{path}: contents do not match the checksum recorded in {json_path} "
            "(truncated, corrupt, or written by another save)"
        )
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({exc})") from exc


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _load_model_weights(
    model: nn.Module, tensors: dict[str, Tensor], path: Path, strict: bool
) -> None:
    """Check keys and shapes against the model (errors name the key), then load."""
    expected = model.state_dict()
    for key, wanted in expected.items():
        if key in tensors and tuple(tensors[key].shape) != tuple(wanted.shape):
            raise CheckpointError(
                f"{path}: shape mismatch for {key!r}: file has {tuple(tensors[key].shape)}, "
                f"the model has {tuple(wanted.shape)}"
            )
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_preview(unexpected)}")
        raise CheckpointError(f"{path}: weights do not match the model: " + "; ".join(parts))
    model.load_state_dict(tensors, strict=strict)


def _optimizer_state_dict(
    meta: dict[str, Any], tensors: dict[str, Tensor], path: Path
) -> dict[str, Any]:
    """Rebuild ``optimizer.state_dict()`` from the json description and the tensors."""

    def tensor(key: str) -> Tensor:
        if key not in tensors:
            raise CheckpointError(f"{path}: missing optimizer tensor {key!r}")
        return tensors[key]

    state: dict[int, dict[str, Any]] = {}
    for param_id, entries in meta["state"].items():
        state[int(param_id)] = {
            key: tensor(entry["tensor"]) if "tensor" in entry else entry["value"]
            for key, entry in entries.items()
        }
    groups = [dict(group) for group in meta["param_groups"]]
    for index, key, tensor_key in meta.get("tensor_fields", []):
        groups[index][key] = tensor(tensor_key)
    return {"state": state, "param_groups": groups}


def load_checkpoint(
    work_dir: str | Path,
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    device: str | torch.device = "cpu",
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore checkpoint ``name`` into ``model`` (and ``optimizer``; the global RNG states
    unless ``restore_rng`` is False) and return the caller's training state.

    Every file is read and checked before anything is modified.
    """
    weights_path, _, json_path = checkpoint_files(work_dir, name)
    meta = _read_json(json_path)
    work_dir = Path(work_dir)
    try:
        model_file = meta["files"]["model"]
        weights_path = work_dir / model_file["file"]
        weights = _read_tensors(weights_path, model_file.get("sha256"), json_path)
        optim_sd = None
        if optimizer is not None:
            optim_file = meta["files"].get("optimizer")
            if optim_file is None or meta.get("optimizer") is None:
                raise CheckpointError(f"{json_path}: the checkpoint holds no optimizer state")
            optim_path = work_dir / optim_file["file"]
            optim_tensors = _read_tensors(optim_path, optim_file.get("sha256"), json_path)
            optim_sd = _optimizer_state_dict(meta["optimizer"], optim_tensors, optim_path)
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{json_path}: malformed checkpoint json ({exc!r})") from exc

    weights = {k: v.to(device) for k, v in weights.items()}
    _load_model_weights(model, weights, weights_path, strict=True)
    if optimizer is not None and optim_sd is not None:
        try:
            optimizer.load_state_dict(optim_sd)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{json_path}: optimizer state does not match the optimizer ({exc})"
            ) from exc
    if restore_rng:
        try:
            set_rng_state(meta["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{json_path}: malformed RNG state ({exc!r})") from exc
    return meta["state"]


def load_weights_only(
    path: str | Path, model: nn.Module, strict: bool = True, device: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """Load just the model weights of a ``.safetensors`` file (for eval and predict).

    Returns the tensors that were read. Keys and shapes are checked first; with
    ``strict=False`` missing and unexpected keys are allowed (shapes must still match).
    """
    path = Path(path)
    if path.suffix == JSON_SUFFIX:
        path = path.with_suffix(WEIGHTS_SUFFIX)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        tensors = safetensors.torch.load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({exc})") from exc
    _load_model_weights(model, tensors, path, strict=strict)
    return tensors


def read_checkpoint_state(work_dir: str | Path, name: str) -> dict[str, Any]:
    """The caller's training state stored in checkpoint ``name`` (reads only the json)."""
    return _read_json(checkpoint_files(work_dir, name)[2])["state"]


def latest_checkpoint(work_dir: str | Path) -> str | None:
    """The name of the most advanced complete checkpoint in ``work_dir`` (highest stored
    ``iteration``; ``model_final`` wins a tie), or None. Incomplete ones (no json) are
    skipped; an unreadable json is skipped with a warning."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return None
    best: tuple[int, int, float, str] | None = None
    for json_path in work_dir.glob(f"*{JSON_SUFFIX}"):
        name = json_path.name[: -len(JSON_SUFFIX)]
        if name.startswith(".") or not (work_dir / f"{name}{WEIGHTS_SUFFIX}").is_file():
            continue
        try:
            meta = _read_json(json_path)
        except (OSError, CheckpointError) as exc:
            warnings.warn(f"ignoring unreadable checkpoint {json_path}: {exc}", stacklevel=2)
            continue
        state = meta["state"]
        iteration = state.get("iteration", -1) if isinstance(state, dict) else -1
        if not isinstance(iteration, int):
            iteration = -1
        key = (iteration, int(name == FINAL_NAME), json_path.stat().st_mtime, name)
        if best is None or key > best:
            best = key
    return None if best is None else best[3]
