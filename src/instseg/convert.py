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
- ``detectron2``: detectron2 and cvpods checkpoints (IFR's are cvpods'): a ``.pth``
  (``{"model": state_dict, ...}``) or a detectron2 model-zoo ``.pkl`` (``{"model": {name:
  numpy array}}``, read by an unpickler that builds numpy arrays and nothing else). Names are
  mapped by the rules of spec §13.7 (:data:`DETECTRON2_RULES`): ``backbone.bottom_up.res{2..5}``
  to ``backbone.layer{1..4}``, ``stem`` to the stem, ``shortcut`` to ``downsample``, the FPN's
  ``fpn_lateral{2..5}`` / ``fpn_output{2..5}``, the RPN, box heads and predictors (per cascade
  stage), the standard mask head (``mask_fcn{i}``, ``deconv``, ``predictor``) and IFR's head,
  whose names are ours. IFR's second registrations of its block (``repeat_block_copy``,
  ``deq.func``, ``deq.func_copy``), the input normalisation buffers and anchor buffers are
  dropped. Classes: 80 with the background last, as mmdetection (COCO's 80 by default).
- ``torchvision``: a torchvision ``maskrcnn_resnet50_fpn`` / ``fasterrcnn_resnet50_fpn``
  state dict (``torch.save(model.state_dict())``, as torchvision publishes its COCO weights,
  or under ``"model"``), with the module names of spec §13.2 (and the older ``_version`` 1
  names) mapped by :data:`TORCHVISION_RULES`. Its classifier has the background first: row 0
  moves last, the background's 4 box-delta rows and mask logit go. Its COCO weights have 91
  rows, so the model gets 90 classes, class k being COCO category id k + 1 (the ten unused
  ids are named "N/A"), and every softmax stays torchvision's. Use it with the configs
  ``torchvision_maskrcnn_resnet50_fpn`` / ``torchvision_fasterrcnn_resnet50_fpn``, which carry
  torchvision's recipe (spec §13.5-§13.6).
"""

from __future__ import annotations

import hashlib
import pickle
import re
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
from .safe_pickle import UnsafePickleError, load_arrays

FORMATS = ("mmdet", "refinemask", "detectron2", "torchvision")
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
    """``obj`` as a name -> tensor dict, without the ``module.`` prefix of a model saved from
    DDP; an error naming ``what`` when it is not one."""
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{path}: {what} is not a non-empty dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ConversionError(f"{path}: {what} has entries that are not named tensors: {bad[:5]}")
    if all(k.startswith("module.") for k in obj):
        return {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def _checkpoint_dict(checkpoint: Any, path: Path) -> Mapping[str, Any]:
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"{path}: expected a dict, found {type(checkpoint).__name__}")
    return checkpoint


def read_mmdet(path: str | Path) -> SourceWeights:
    """The weights, class names and metadata facts of an mmdetection checkpoint."""
    path = Path(path)
    checkpoint = _checkpoint_dict(load_pickled(path), path)
    if "state_dict" in checkpoint:
        state = _tensor_dict(checkpoint["state_dict"], path, "'state_dict'")
    else:
        state = _tensor_dict(checkpoint, path, "the file (a bare state dict)")
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


# detectron2 / cvpods names -> ours (spec §13.7). A rule's replacement may be a list: the
# first name the model has is used (detectron2's mask head "deconv"/"predictor" are our FCN
# head's "upsample"/"conv_logits" but IFR's head's own names).
_Rule = tuple[str, str | list[str]]
DETECTRON2_RULES: list[_Rule] = [
    (r"^backbone\.bottom_up\.stem\.conv1\.norm\.", "backbone.bn1."),
    (r"^backbone\.bottom_up\.stem\.conv1\.", "backbone.conv1."),
    (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.", r"backbone.layer<\1>.\2.bn\3."),
    (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.", r"backbone.layer<\1>.\2.conv\3."),
    (
        r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.",
        r"backbone.layer<\1>.\2.downsample.1.",
    ),
    (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.", r"backbone.layer<\1>.\2.downsample.0."),
    (r"^backbone\.fpn_lateral(\d)\.", r"neck.lateral_convs.<<\1>>.conv."),
    (r"^backbone\.fpn_output(\d)\.", r"neck.fpn_convs.<<\1>>.conv."),
    (r"^proposal_generator\.rpn_head\.conv\.", "rpn_head.rpn_conv."),
    (r"^proposal_generator\.rpn_head\.objectness_logits\.", "rpn_head.rpn_cls."),
    (r"^proposal_generator\.rpn_head\.anchor_deltas\.", "rpn_head.rpn_reg."),
    (r"^roi_heads\.box_head\.(\d+\.)?fc1\.", r"roi_head.bbox_head.\1shared_fcs.0."),
    (r"^roi_heads\.box_head\.(\d+\.)?fc2\.", r"roi_head.bbox_head.\1shared_fcs.1."),
    (r"^roi_heads\.box_predictor\.(\d+\.)?cls_score\.", r"roi_head.bbox_head.\1fc_cls."),
    (r"^roi_heads\.box_predictor\.(\d+\.)?bbox_pred\.", r"roi_head.bbox_head.\1fc_reg."),
    (r"^roi_heads\.mask_head\.mask_fcn(\d)\.", r"roi_head.mask_head.convs.<\1>.conv."),
    (
        r"^roi_heads\.mask_head\.deconv\.",
        ["roi_head.mask_head.upsample.", "roi_head.mask_head.deconv."],
    ),
    (
        r"^roi_heads\.mask_head\.predictor\.",
        ["roi_head.mask_head.conv_logits.", "roi_head.mask_head.predictor."],
    ),
    (r"^roi_heads\.mask_head\.repeat_block\.", "roi_head.mask_head.repeat_block."),
]
# Keys that hold nothing a model needs: IFR's second registrations of its block (the same
# tensors, or the effective weights the weight-normed ones compute), input normalisation
# and anchor buffers.
DETECTRON2_DROPPED = (
    r"^roi_heads\.mask_head\.(repeat_block_copy|deq\.func|deq\.func_copy)\.",
    r"^pixel_(mean|std)$",
    r"anchor_generator\.",
)


# torchvision names -> ours (spec §13.3, read backwards; ``(?:0\.)?`` also takes the names
# of its ``_version`` 1 modules).
TORCHVISION_RULES: list[_Rule] = [
    (r"^backbone\.body\.", "backbone."),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?", r"neck.lateral_convs.\1.conv."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?", r"neck.fpn_convs.\1.conv."),
    (r"^rpn\.head\.conv\.(?:0\.0\.)?", "rpn_head.rpn_conv."),
    (r"^rpn\.head\.cls_logits\.", "rpn_head.rpn_cls."),
    (r"^rpn\.head\.bbox_pred\.", "rpn_head.rpn_reg."),
    (r"^roi_heads\.box_head\.fc6\.", "roi_head.bbox_head.shared_fcs.0."),
    (r"^roi_heads\.box_head\.fc7\.", "roi_head.bbox_head.shared_fcs.1."),
    (r"^roi_heads\.box_predictor\.cls_score\.", "roi_head.bbox_head.fc_cls."),
    (r"^roi_heads\.box_predictor\.bbox_pred\.", "roi_head.bbox_head.fc_reg."),
    (r"^roi_heads\.mask_head\.(\d+)\.0\.", r"roi_head.mask_head.convs.\1.conv."),
    (r"^roi_heads\.mask_head\.mask_fcn(\d)\.", r"roi_head.mask_head.convs.<\1>.conv."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "roi_head.mask_head.upsample."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_head.mask_head.conv_logits."),
]


def _renamed(key: str, model_keys: set[str], rules: list[_Rule] = DETECTRON2_RULES) -> str | None:
    """``key``'s name in our model by ``rules`` (None: no rule applies). ``<n>`` in a
    replacement is n - 1 (res2 is layer1, mask_fcn1 is convs.0), ``<<n>>`` is n - 2
    (fpn_lateral2 is lateral_convs.0)."""
    for pattern, replacement in rules:
        match = re.match(pattern, key)
        if match is None:
            continue
        candidates = replacement if isinstance(replacement, list) else [replacement]
        names = []
        for candidate in candidates:
            head = match.expand(candidate)
            head = re.sub(r"<<(\d+)>>", lambda m: str(int(m.group(1)) - 2), head)
            head = re.sub(r"<(\d+)>", lambda m: str(int(m.group(1)) - 1), head)
            names.append(head + key[match.end() :])
        return next((n for n in names if n in model_keys), names[0])
    return None


def _load_arrays_pickle(path: Path) -> Any:
    """A detectron2 model-zoo ``.pkl``: numpy arrays in plain containers, nothing else."""
    try:
        return load_arrays(path)
    except UnsafePickleError as exc:
        raise ConversionError(
            f"{path}: refused: the pickle asks to build objects other than numpy arrays and "
            f"plain containers ({exc}). instseg never runs code from a checkpoint."
        ) from exc
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc


def read_detectron2(path: str | Path, model_keys: set[str]) -> SourceWeights:
    """The weights of a detectron2 / cvpods checkpoint under our names (for a model with
    ``model_keys``); keys no rule maps are kept as they are, so the match reports them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    loaded = _load_arrays_pickle(path) if path.suffix == ".pkl" else load_pickled(path)
    checkpoint = _checkpoint_dict(loaded, path)
    source = checkpoint.get("model", checkpoint)
    state = _tensor_dict(source, path, "'model'" if "model" in checkpoint else "the file")
    out: dict[str, Tensor] = {}
    dropped = []
    for key, value in state.items():
        if any(re.search(pattern, key) for pattern in DETECTRON2_DROPPED):
            dropped.append(key)
            continue
        name = _renamed(key, model_keys) or key
        if name in out:
            raise ConversionError(f"{path}: two keys map to {name}")
        out[name] = value
    facts = {k: checkpoint[k] for k in ("iteration", "__author__") if k in checkpoint}
    facts = {k: v for k, v in facts.items() if isinstance(v, (str, int, float))}
    return SourceWeights(out, None, facts, dropped)


def read_torchvision(path: str | Path) -> SourceWeights:
    """The weights of a torchvision detection state dict under our names, its classifier
    rows in our order (background last, no background box deltas or mask logits); its
    classes are named when it has COCO's 91 rows."""
    path = Path(path)
    checkpoint = _checkpoint_dict(load_pickled(path), path)
    wrapper = next((k for k in ("model", "state_dict") if k in checkpoint), None)
    source = checkpoint[wrapper] if wrapper else checkpoint
    state = _tensor_dict(source, path, f"{wrapper!r}" if wrapper else "the file")
    out: dict[str, Tensor] = {}
    dropped = []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):  # FrozenBN has none; a BN step counter
            dropped.append(key)
            continue
        name = _renamed(key, set(), TORCHVISION_RULES) or key
        if name in out:
            raise ConversionError(f"{path}: two keys map to {name}")
        out[name] = value
    head = "roi_head.bbox_head."
    if head + "fc_cls.weight" not in out:
        raise ConversionError(
            f"{path}: no roi_heads.box_predictor.cls_score: not a torchvision detector"
        )
    rows = out[head + "fc_cls.weight"].shape[0]
    for suffix in ("weight", "bias"):
        cls = out[head + f"fc_cls.{suffix}"]
        out[head + f"fc_cls.{suffix}"] = torch.cat([cls[1:], cls[:1]])
        if head + f"fc_reg.{suffix}" in out:
            reg = out[head + f"fc_reg.{suffix}"]
            if reg.shape[0] == 4 * rows:  # class-specific: the background's 4 rows go
                out[head + f"fc_reg.{suffix}"] = reg[4:]
        logits = f"roi_head.mask_head.conv_logits.{suffix}"
        if logits in out and out[logits].shape[0] == rows:
            out[logits] = out[logits][1:]
    classes = [name for _, name in TORCHVISION_COCO_CATEGORIES] if rows == 91 else None
    return SourceWeights(out, classes, {"classifier_rows": rows}, dropped)


# torchvision's COCO weights: class k is category id k + 1, ids COCO does not use are "N/A".
TORCHVISION_COCO_CATEGORIES = [(i, dict(COCO_CATEGORIES).get(i, "N/A")) for i in range(1, 91)]


def categories_for(classes: list[str] | None) -> list[Category]:
    """Categories of a checkpoint's classes: COCO's ids when they are COCO's 80 names in
    COCO's order, ids 1..N otherwise; COCO's 80 when the checkpoint names none."""
    coco = [Category(i, n) for i, n in COCO_CATEGORIES]
    if classes is None or classes == [c.name for c in coco]:
        return coco
    if classes == [name for _, name in TORCHVISION_COCO_CATEGORIES]:
        return [Category(i, name) for i, name in TORCHVISION_COCO_CATEGORIES]
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
    if fmt == "detectron2":  # no class names in these files: the model can be built first
        categories = categories or categories_for(None)
        model = build_model(cfg, len(categories))
        weights = read_detectron2(source, set(model.state_dict()))
    else:
        if fmt == "torchvision":
            weights = read_torchvision(source)
            rows = weights.facts["classifier_rows"]
            if weights.classes is None and categories is None:
                raise ConversionError(
                    f"{source} has {rows - 1} classes (not COCO's 91 rows): name them with "
                    "--categories ANN_JSON"
                )
            if categories is not None and len(categories) != rows - 1:
                raise ConversionError(
                    f"{source} has {rows - 1} classes, the categories given {len(categories)}"
                )
        else:
            weights = read_mmdet(source)
        if categories is None:
            categories = categories_for(weights.classes)
        elif weights.classes is not None and len(weights.classes) != len(categories):
            raise ConversionError(
                f"{source} has {len(weights.classes)} classes, the categories given "
                f"{len(categories)}"
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
