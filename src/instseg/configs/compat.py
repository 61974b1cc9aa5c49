"""Saved configs of the first format (before detectors were composed of typed parts) are
upgraded on load, so old ``config.json`` files and checkpoints keep working.

The first format repeated widths and strides in several sections and chose variants by
strings: ``roi_head.with_mask`` / ``mask_head_kind`` with a ``mask_head`` and a
``refine_mask`` section, extractor ``kind`` with a ``groie`` section, and the RoI head's
``num_classes``, ``target_stds`` and loss weights. The upgrade maps each to its new place
(tagged ``mask_head`` and extractors, the box head's coder and losses, levels by name) and
drops what is now derived from the neck (``in_channels``, strides, ``semantic_stride``),
checking that the dropped values agree with what the model now derives.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from .overrides import ConfigError


def is_first_format(data: dict) -> bool:
    """A saved experiment config of the first format: its model has no ``kind``."""
    model = data.get("model") if isinstance(data, dict) else None
    return isinstance(model, dict) and "kind" not in model


def upgrade_config(data: dict) -> dict:
    """``data`` (a saved experiment config) in the current format; current ones unchanged."""
    if not is_first_format(data):
        return data
    data = copy.deepcopy(data)
    model = data["model"]
    model["kind"] = "two_stage"
    neck = model.get("neck", {})
    width = neck.get("out_channels", 256)
    num_outs = neck.get("num_outs", 5)
    fpn_strides = [4 * 2**i for i in range(num_outs)]
    rpn = model.setdefault("rpn", {})
    _expect(rpn.pop("in_channels", width), width, "model.rpn.in_channels")
    _expect(list(rpn.pop("strides", fpn_strides)), fpn_strides, "model.rpn.strides")
    if rpn.get("feat_channels", width) == width:
        rpn["feat_channels"] = None  # now: the width of the levels it reads
    if "roi_head" in model:
        model["roi_head"] = _upgrade_roi_head(model["roi_head"], width)
    return data


def _expect(old: Any, derived: Any, key: str) -> None:
    if old != derived:
        raise ConfigError(
            f"{key} is {old!r} in this saved config, but the model now derives it from the "
            f"neck ({derived!r}); this config cannot be upgraded as it is"
        )


def _levels(strides: list[int]) -> list[str]:
    return [f"p{int(math.log2(s))}" for s in strides]


def _upgrade_extractor(old: dict) -> dict:
    new = {k: old[k] for k in ("op", "sampling_ratio", "aligned") if k in old}
    new["levels"] = _levels(old.get("strides", [4, 8, 16, 32]))
    if old.get("kind", "single") == "generic":
        return {"kind": "generic", **new, **old.get("groie", {})}
    if "finest_scale" in old:
        new["finest_scale"] = old["finest_scale"]
    return {"kind": "single", **new}


def _upgrade_roi_head(old: dict, width: int) -> dict:
    old = dict(old)
    old.pop("num_classes", None)
    box_extractor = old.pop("box_extractor", {})
    mask_extractor = old.pop("mask_extractor", {})
    box_head = dict(old.pop("box_head", {}))
    box_size = box_extractor.get("output_size", 7)
    _expect(box_head.pop("roi_size", box_size), box_size, "model.roi_head.box_head.roi_size")
    box_head["roi_size"] = box_size
    box_head.pop("in_channels", None)  # checked against the extractor by the old code
    for name in ("target_stds", "loss_cls_weight", "loss_bbox_weight"):  # now the box head's
        if name in old:
            box_head[name] = old.pop(name)
    with_mask = old.pop("with_mask", True)
    kind = old.pop("mask_head_kind", "fcn")
    fcn = dict(old.pop("mask_head", {}))
    refine = dict(old.pop("refine_mask", {}))
    mask_weight = old.pop("loss_mask_weight", 1.0)
    mask_size = mask_extractor.get("output_size", 14)
    mask_head: dict | None = None
    if with_mask and kind == "refinemask":
        refine.pop("in_channels", None)
        refine.pop("semantic_in_channels", None)
        _expect(refine.pop("semantic_stride", 4), 4, "model.roi_head.refine_mask.semantic_stride")
        mask_head = {"kind": "refinemask", **refine, "loss_weight": mask_weight}
    elif with_mask:
        fcn.pop("in_channels", None)
        conv_channels = fcn.pop("conv_channels", 256)
        mask_head = {
            "kind": "fcn",
            "roi_size": mask_size,
            **fcn,
            "conv_channels": None if conv_channels == width else conv_channels,
            "loss_weight": mask_weight,
        }
    return {
        "kind": "standard",
        **old,
        "box_extractor": _upgrade_extractor(box_extractor),
        "box_head": box_head,
        "mask_extractor": _upgrade_extractor(mask_extractor),
        "mask_head": mask_head,
    }
