"""Checkpoints of other code bases in, instseg checkpoints out (``instseg convert``).

A converted checkpoint is what ``instseg train`` writes: ``NAME.safetensors`` with the
weights under our key names and ``NAME.json`` with the config, the categories and where the
weights came from (the source file's sha256, its format and the facts of its metadata). So
``instseg eval`` / ``predict`` take it as they take a trained one, and ``train.load_from``
starts training from it.

Reading never runs code from the file: a ``.pth`` is read with
``torch.load(weights_only=True)``, which builds tensors and plain containers only, and a
pickle that asks for anything else is refused with the name of what it asked for.

Formats so far:

- ``mmdet``: mmdetection 2.x and 3.x checkpoints (``{"meta": ..., "state_dict": ...}`` as
  their runners save and ``publish_model.py`` publishes them, or a bare state dict).
  instseg's modules carry mmdetection's names, so the keys map one to one: a DDP
  ``module.`` prefix and mmdet 3's ``data_preprocessor`` buffers are dropped, BatchNorm
  step counters are not required, and every other key must exist on both sides with the
  same shape. The class names come from the metadata (``dataset_meta.classes`` in 3.x,
  ``CLASSES`` in 2.x); COCO's names get COCO's category ids.
- ``refinemask``: the official RefineMask repository's checkpoints. It is mmdetection 2.x
  with one more head, and instseg's RefineMask head keeps the official head's attribute
  names (``instance_convs``, ``semantic_convs``, ``stages.k.{semantic_transform_in,
  semantic_transform_out, instance_logits, fuse_conv, fuse_transform_out}``,
  ``final_instance_logits``, ``semantic_logits``). The file is therefore read as ``mmdet``;
  the format is named for what the user holds.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data import Category
from .data.coco_categories import COCO_CATEGORIES
from .engine.checkpoint import WEIGHTS_SUFFIX, CheckpointError, save_checkpoint

FORMATS = ("mmdet", "refinemask")
# Metadata worth keeping in the converted json (plain values only).
_META_FACTS = ("mmdet_version", "mmengine_version", "mmcv_version", "epoch", "iter", "time")
_LISTED = 20  # keys named in an error before "and N more"


class ConversionError(CheckpointError):
    """A source checkpoint that cannot be converted; the message says which key, file or
    object is the reason."""


@dataclass
class SourceWeights:
    """What a source checkpoint holds: the tensors under our key names, its class names
    (None when it records none), plain facts of its metadata and the keys dropped."""

    state: dict[str, Tensor]
    classes: list[str] | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_pickled(path: Path) -> Any:
    """The object of a ``torch.save`` file, built from tensors and plain containers only;
    a file that needs any other object is refused without running anything."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        asked = [line for line in lines if "GLOBAL" in line]
        if not asked:  # not a forbidden object: a damaged or foreign pickle
            boilerplate = ("Weights only load failed", "Please file", "Check the documentation")
            specific = [line for line in lines if not line.startswith(boilerplate)]
            detail = specific[0] if specific else type(exc).__name__
            raise ConversionError(f"{path}: not a readable torch checkpoint ({detail})") from exc
        reason = asked[0]
        raise ConversionError(
            f"{path}: refused: the file asks to build objects other than tensors and plain "
            f"containers ({reason}). instseg never runs code from a checkpoint. If you trust "
            "the file, keep only its weights: torch.save({'state_dict': "
            "torch.load(SRC, weights_only=False)['state_dict']}, OUT)"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise ConversionError(f"{path}: not a readable torch checkpoint ({exc})") from exc


def _tensor_dict(obj: Any, path: Path, what: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{path}: {what} is not a non-empty dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ConversionError(f"{path}: {what} has entries that are not named tensors: {bad[:5]}")
    return dict(obj)


def read_mmdet(path: str | Path) -> SourceWeights:
    """The weights, class names and metadata facts of an mmdetection checkpoint."""
    path = Path(path)
    checkpoint = load_pickled(path)
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"{path}: expected a dict, found {type(checkpoint).__name__}")
    if "state_dict" in checkpoint:
        state = _tensor_dict(checkpoint["state_dict"], path, "'state_dict'")
    else:
        state = _tensor_dict(checkpoint, path, "the file (a bare state dict)")
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module.") :]: v for k, v in state.items()}
    dropped = [k for k in state if k.startswith("data_preprocessor.")]
    for key in dropped:
        del state[key]
    meta = checkpoint.get("meta") if "state_dict" in checkpoint else None
    meta = meta if isinstance(meta, Mapping) else {}
    dataset_meta = meta.get("dataset_meta")
    classes = dataset_meta.get("classes") if isinstance(dataset_meta, Mapping) else None
    if classes is None:
        classes = meta.get("CLASSES")
    if classes is not None:
        if isinstance(classes, str) or not all(isinstance(c, str) for c in classes):
            raise ConversionError(f"{path}: the class names in its meta are not strings")
        classes = list(classes)
    facts = {k: meta[k] for k in _META_FACTS if isinstance(meta.get(k), (str, int, float))}
    return SourceWeights(state, classes, facts, dropped)


def categories_for(classes: list[str] | None) -> list[Category]:
    """Categories of a checkpoint's classes: COCO's ids when they are COCO's 80 names in
    COCO's order, ids 1..N otherwise; COCO's 80 when the checkpoint names none."""
    coco = [Category(i, n) for i, n in COCO_CATEGORIES]
    if classes is None or classes == [c.name for c in coco]:
        return coco
    return [Category(i + 1, name) for i, name in enumerate(classes)]


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def match_state(model: nn.Module, state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """``state`` as a complete state dict of ``model`` (BatchNorm step counters the file
    lacks are taken from the model), or an error listing the keys missing from the file,
    those the model does not have and those of another shape."""
    expected = model.state_dict()
    counter = "num_batches_tracked"
    missing = [k for k in expected if k not in state and not k.endswith(counter)]
    unexpected = [k for k in state if k not in expected and not k.endswith(counter)]
    shapes = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the model of the config (use --config/--set):"]
        if missing:
            lines.append(f"  {len(missing)} missing from the file: {_listed(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} not in the model: {_listed(unexpected)}")
        if shapes:
            lines.append(f"  {len(shapes)} of another shape: {_listed(shapes)}")
        raise ConversionError("\n".join(lines))
    return {k: (state[k].to(v.dtype) if k in state else v) for k, v in expected.items()}


def convert_checkpoint(
    source: str | Path,
    fmt: str,
    cfg: Any,
    out: str | Path,
    categories: list[Category] | None = None,
) -> Path:
    """Convert ``source`` (a checkpoint in format ``fmt``) for the model of ``cfg`` (an
    ``ExperimentConfig``) into ``out`` (``.safetensors``, with its ``.json``); returns the
    weights path. ``categories`` default to the checkpoint's classes (COCO's 80 when it
    names none); their count is the model's number of classes."""
    from .configs import to_dict
    from .runner import build_model

    source, out = Path(source), Path(out)
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if out.suffix != WEIGHTS_SUFFIX:
        raise ConversionError(f"--out must name a {WEIGHTS_SUFFIX} file, got {out}")
    weights = read_mmdet(source)
    if categories is None:
        categories = categories_for(weights.classes)
    elif weights.classes is not None and len(weights.classes) != len(categories):
        raise ConversionError(
            f"{source} has {len(weights.classes)} classes, the categories given {len(categories)}"
        )
    model = build_model(cfg, len(categories))
    model.load_state_dict(match_state(model, weights.state, str(source)), strict=True)
    state = {
        "config": to_dict(cfg),
        "categories": [[c.id, c.name] for c in categories],
        "converted_from": {
            "file": str(source),
            "sha256": sha256_file(source),
            "format": fmt,
            "meta": weights.facts,
            "classes": weights.classes,
            "dropped_keys": weights.dropped,
        },
    }
    save_checkpoint(out.parent, out.stem, model, None, state)
    return out
