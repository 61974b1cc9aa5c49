"""Box utilities with torchvision's semantics.

Boxes are ``(x1, y1, x2, y2)`` with width ``x2 - x1`` (no ``+1``), as in every codebase the
spec reads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# mmdet's DeltaXYWHBBoxCoder clamp of predicted log-scale deltas: log(1000 / 16).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _check_boxes(boxes: Tensor, name: str = "boxes") -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"{name} must be a Tensor[N, 4] (x1, y1, x2, y2), got {shape}")


def box_area(boxes: Tensor) -> Tensor:
    """``(x2 - x1) * (y2 - y1)`` per box."""
    _check_boxes(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _pairwise_intersection_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return inter, union


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """``(N, M)`` IoU matrix; two zero-area boxes give NaN (0/0), as in torchvision."""
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    inter, union = _pairwise_intersection_union(boxes1, boxes2)
    return inter / union


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp ``(..., 4)`` boxes to an image of ``size = (height, width)``."""
    height, width = size
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes whose width and height are both at least ``min_size``."""
    _check_boxes(boxes)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return torch.where((w >= min_size) & (h >= min_size))[0]


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert ``(..., 4)`` boxes between ``"xyxy"``, ``"xywh"`` and ``"cxcywh"``."""
    formats = ("xyxy", "xywh", "cxcywh")
    if in_fmt not in formats or out_fmt not in formats:
        raise ValueError(f"box formats must be one of {formats}, got {in_fmt!r} -> {out_fmt!r}")
    a, b, c, d = boxes.unbind(-1)
    if in_fmt == "xywh":
        a, b, c, d = a, b, a + c, b + d
    elif in_fmt == "cxcywh":
        a, b, c, d = a - c / 2, b - d / 2, a + c / 2, b + d / 2
    if out_fmt == "xywh":
        return torch.stack([a, b, c - a, d - b], dim=-1)
    if out_fmt == "cxcywh":
        return torch.stack([(a + c) / 2, (b + d) / 2, c - a, d - b], dim=-1)
    return torch.stack([a, b, c, d], dim=-1)


def encode_deltas(
    proposals: Tensor,
    targets: Tensor,
    means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
    stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
) -> Tensor:
    """Regression targets ``(dx, dy, dw, dh)`` from ``proposals`` to ``targets`` (both xyxy).

    mmdet's ``DeltaXYWHBBoxCoder``: ``dx = (gx - px) / pw``, ``dw = log(gw / pw)``, then
    normalised by ``means`` and ``stds``.
    """
    p = box_convert(proposals, "xyxy", "cxcywh")
    g = box_convert(targets, "xyxy", "cxcywh")
    deltas = torch.stack(
        [
            (g[..., 0] - p[..., 0]) / p[..., 2],
            (g[..., 1] - p[..., 1]) / p[..., 3],
            torch.log(g[..., 2] / p[..., 2]),
            torch.log(g[..., 3] / p[..., 3]),
        ],
        dim=-1,
    )
    return (deltas - deltas.new_tensor(means)) / deltas.new_tensor(stds)


def decode_deltas(
    proposals: Tensor,
    deltas: Tensor,
    means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
    stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    max_shape: tuple[int, int] | None = None,
    wh_ratio_clip: float = BBOX_XFORM_CLIP,
) -> Tensor:
    """Inverse of :func:`encode_deltas`; ``dw, dh`` are clamped to ``+-wh_ratio_clip`` and
    the result is clipped to ``max_shape = (height, width)`` when given."""
    d = deltas * deltas.new_tensor(stds) + deltas.new_tensor(means)
    p = box_convert(proposals, "xyxy", "cxcywh")
    dw = d[..., 2].clamp(-wh_ratio_clip, wh_ratio_clip)
    dh = d[..., 3].clamp(-wh_ratio_clip, wh_ratio_clip)
    cx = p[..., 0] + d[..., 0] * p[..., 2]
    cy = p[..., 1] + d[..., 1] * p[..., 3]
    w = p[..., 2] * dw.exp()
    h = p[..., 3] * dh.exp()
    boxes = box_convert(torch.stack([cx, cy, w, h], dim=-1), "cxcywh", "xyxy")
    if max_shape is not None:
        boxes = clip_boxes_to_image(boxes, max_shape)
    return boxes
