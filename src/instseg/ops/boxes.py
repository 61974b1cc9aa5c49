"""Box utilities with torchvision's semantics.

Boxes are ``(x1, y1, x2, y2)`` with width ``x2 - x1`` (no ``+1``), as in every codebase the
spec reads. As in ``torchvision.ops``, areas and IoUs are computed in an upcast dtype
(float16/bfloat16 in float32, integers below int32 in int32), box tensors may have leading
batch dimensions, and a mistake raises the class torchvision raises for it (also a
``ValueError``).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ._common import (
    ArgumentAttributeError,
    ArgumentIndexError,
    ArgumentNotImplementedError,
    ArgumentRuntimeError,
    ArgumentTypeError,
)

# mmdet's DeltaXYWHBBoxCoder clamp of predicted log-scale deltas: log(1000 / 16).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

_AXIS_ALIGNED_FORMATS = ("xyxy", "xywh", "cxcywh")
_ROTATED_FORMATS = ("xywhr", "cxcywhr", "xyxyxyxy")


def _check_box_columns(
    boxes: Tensor,
    name: str,
    min_dim: int = 1,
    not_tensor: type[ValueError] = ArgumentAttributeError,
) -> None:
    """``boxes`` is a tensor of at least ``min_dim`` dimensions with 4 or more columns.

    torchvision reads columns 0-3 of ``boxes[..., :]``: a non-tensor fails an attribute
    lookup (``not_tensor``) and a missing dimension or column fails indexing.
    """
    if not isinstance(boxes, Tensor):
        raise not_tensor(
            f"{name} must be a Tensor[..., 4] (x1, y1, x2, y2), got {type(boxes).__name__}"
        )
    if boxes.dim() < min_dim or boxes.shape[-1] < 4:
        raise ArgumentIndexError(
            f"{name} must be a Tensor[..., 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}"
        )


def _check_not_bool(boxes: Tensor, name: str) -> None:
    """torchvision subtracts coordinates in their own dtype, which torch refuses for bool."""
    if isinstance(boxes, Tensor) and boxes.dtype == torch.bool:
        raise ArgumentRuntimeError(f"{name} must hold numbers, got a bool tensor")


def _upcast(t: Tensor) -> Tensor:
    """torchvision's ``_upcast``: floats below float32 to float32, ints below int32 (and
    bool) to int32, so that products do not overflow."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def _area(boxes: Tensor, fmt: str) -> Tensor:
    if fmt == "xyxy":
        return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return boxes[..., 2] * boxes[..., 3]


def box_area(boxes: Tensor, fmt: str = "xyxy") -> Tensor:
    """Area of each box of ``Tensor[..., 4]`` boxes in ``fmt`` (``"xyxy"``, ``"xywh"`` or
    ``"cxcywh"``), in the upcast dtype (float16 boxes give float32 areas, int8 give int32)."""
    if fmt not in _AXIS_ALIGNED_FORMATS:
        raise ValueError(f"box_area fmt must be one of {_AXIS_ALIGNED_FORMATS}, got {fmt!r}")
    _check_box_columns(boxes, "boxes")
    return _area(_upcast(boxes), fmt)


def _corners(boxes: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    """Top-left and bottom-right corners ``(..., 2)`` of boxes in an axis-aligned format."""
    if fmt == "xyxy":
        return boxes[..., :2], boxes[..., 2:4]
    if fmt == "xywh":
        return boxes[..., :2], boxes[..., :2] + boxes[..., 2:4]
    half = boxes[..., 2:4] / 2
    return boxes[..., :2] - half, boxes[..., :2] + half


def _pairwise_intersection_union(
    boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy"
) -> tuple[Tensor, Tensor]:
    """Intersection and union areas ``(..., N, M)`` of upcast boxes."""
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    if boxes1.dim() == 1:  # one box: a (1, M) result, as torchvision's broadcasting gives
        boxes1 = boxes1[None]
    lt1, rb1 = _corners(boxes1, fmt)
    lt2, rb2 = _corners(boxes2, fmt)
    # One (..., N, M) plane per coordinate, from contiguous coordinate columns: the same
    # arithmetic as on (..., N, M, 2) corner tensors, about twice as fast.
    x1a, y1a, x2a, y2a = (c[..., :, None].contiguous() for c in (*lt1.unbind(-1), *rb1.unbind(-1)))
    x1b, y1b, x2b, y2b = (c[..., None, :].contiguous() for c in (*lt2.unbind(-1), *rb2.unbind(-1)))
    w = (torch.min(x2a, x2b) - torch.max(x1a, x1b)).clamp(min=0)
    h = (torch.min(y2a, y2b) - torch.max(y1a, y1b)).clamp(min=0)
    inter = w * h
    union = _area(boxes1, fmt)[..., None] + _area(boxes2, fmt)[..., None, :] - inter
    return inter, union


def box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy") -> Tensor:
    """``(..., N, M)`` IoU of ``Tensor[..., N, 4]`` and ``Tensor[..., M, 4]`` boxes in ``fmt``.

    float32 for float16/bfloat16/integer boxes (computed in the upcast dtype, so float16
    areas do not overflow); two zero-area boxes give NaN (0/0), as in torchvision. The
    rotated formats torchvision also accepts are not implemented here.
    """
    if fmt in _ROTATED_FORMATS:
        raise ArgumentNotImplementedError(
            f"box_iou of rotated boxes (fmt={fmt!r}) is not implemented in instseg.ops"
        )
    if fmt not in _AXIS_ALIGNED_FORMATS:
        raise ValueError(f"box_iou fmt must be one of {_AXIS_ALIGNED_FORMATS}, got {fmt!r}")
    _check_box_columns(boxes1, "boxes1")
    _check_box_columns(boxes2, "boxes2", min_dim=2)
    _check_not_bool(boxes1, "boxes1")
    _check_not_bool(boxes2, "boxes2")
    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        if boxes.shape[-1] != 4:
            raise ArgumentRuntimeError(
                f"{name} must be a Tensor[..., 4], got shape {tuple(boxes.shape)}"
            )
    try:
        torch.broadcast_shapes((*boxes1.shape[:-1], 1), (*boxes2.shape[:-2], 1, boxes2.shape[-2]))
    except RuntimeError as exc:
        raise ArgumentRuntimeError(
            f"the batch dimensions of boxes1 {tuple(boxes1.shape)} and boxes2 "
            f"{tuple(boxes2.shape)} do not broadcast"
        ) from exc
    inter, union = _pairwise_intersection_union(boxes1, boxes2, fmt)
    return inter / union


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp ``Tensor[..., 4]`` xyxy boxes to an image of ``size = (height, width)``.

    As torchvision: even columns are x and odd ones y, so ``Tensor[..., 2k]`` point lists
    clip too; the dtype is kept (an int tensor clipped to a float size becomes float).
    """
    if not isinstance(boxes, Tensor):
        raise ArgumentAttributeError(f"boxes must be a Tensor[..., 4], got {type(boxes).__name__}")
    if boxes.dim() == 0:
        raise ArgumentIndexError(
            "boxes must be a Tensor[..., 4] (x1, y1, x2, y2), got a 0-d tensor"
        )
    try:
        height, width = size
    except TypeError as exc:
        raise ArgumentTypeError(f"size must be (height, width), got {size!r}") from exc
    except ValueError as exc:
        raise ValueError(f"size must be (height, width), got {size!r}") from exc
    if boxes.shape[-1] % 2 != 0:
        raise ArgumentRuntimeError(
            f"boxes must be a Tensor[..., 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}"
        )
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x, y), dim=boxes.dim()).reshape(boxes.shape)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (along the first dimension) of the boxes whose width and height are both at
    least ``min_size``; sides are computed in the upcast dtype."""
    _check_box_columns(boxes, "boxes", not_tensor=ArgumentTypeError)
    _check_not_bool(boxes, "boxes")
    if not isinstance(min_size, (numbers.Real, Tensor)):
        raise ArgumentTypeError(f"min_size must be a number, got {min_size!r}")
    boxes = _upcast(boxes)
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return torch.where((w >= min_size) & (h >= min_size))[0]


def _cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def _xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def _xywh_to_xyxy(boxes: Tensor) -> Tensor:
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def _xyxy_to_xywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1)


def _rotated(boxes: Tensor, values: tuple[Tensor, ...]) -> Tensor:
    """Stack rotated-box coordinates; integer boxes are rounded back to their dtype."""
    out = torch.stack(values, dim=-1)
    return out if boxes.is_floating_point() else out.round().to(boxes.dtype)


def _cos_sin(degrees: Tensor) -> tuple[Tensor, Tensor]:
    radians = degrees * torch.pi / 180.0
    return torch.cos(radians), torch.sin(radians)


def _cxcywhr_to_xywhr(boxes: Tensor) -> Tensor:
    cx, cy, w, h, r = boxes.unbind(-1)
    cos, sin = _cos_sin(r)
    x1 = cx - w / 2 * cos - h / 2 * sin
    y1 = cy - h / 2 * cos + w / 2 * sin
    return _rotated(boxes, (x1, y1, w, h, r))


def _xywhr_to_cxcywhr(boxes: Tensor) -> Tensor:
    x1, y1, w, h, r = boxes.unbind(-1)
    cos, sin = _cos_sin(r)
    cx = x1 + w / 2 * cos + h / 2 * sin
    cy = y1 - w / 2 * sin + h / 2 * cos
    return _rotated(boxes, (cx, cy, w, h, r))


def _xywhr_to_xyxyxyxy(boxes: Tensor) -> Tensor:
    x1, y1, w, h, r = boxes.unbind(-1)
    cos, sin = _cos_sin(r)
    x2, y2 = x1 + w * cos, y1 - w * sin
    x3, y3 = x2 + h * sin, y2 + h * cos
    x4, y4 = x1 + h * sin, y1 + h * cos
    return _rotated(boxes, (x1, y1, x2, y2, x3, y3, x4, y4))


def _xyxyxyxy_to_xywhr(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2, x3, y3, _, _ = boxes.unbind(-1)
    r = torch.atan2(y1 - y2, x2 - x1) * 180 / torch.pi
    w = ((x2 - x1) ** 2 + (y1 - y2) ** 2).sqrt()
    h = ((x3 - x2) ** 2 + (y3 - y2) ** 2).sqrt()
    return _rotated(boxes, (x1, y1, w, h, r))


# Each conversion torchvision supports, as a chain of elementary steps.
_CONVERSIONS = {
    ("xywh", "xyxy"): (_xywh_to_xyxy,),
    ("cxcywh", "xyxy"): (_cxcywh_to_xyxy,),
    ("xyxy", "xywh"): (_xyxy_to_xywh,),
    ("xyxy", "cxcywh"): (_xyxy_to_cxcywh,),
    ("xywh", "cxcywh"): (_xywh_to_xyxy, _xyxy_to_cxcywh),
    ("cxcywh", "xywh"): (_cxcywh_to_xyxy, _xyxy_to_xywh),
    ("cxcywhr", "xywhr"): (_cxcywhr_to_xywhr,),
    ("xywhr", "cxcywhr"): (_xywhr_to_cxcywhr,),
    ("cxcywhr", "xyxyxyxy"): (_cxcywhr_to_xywhr, _xywhr_to_xyxyxyxy),
    ("xyxyxyxy", "cxcywhr"): (_xyxyxyxy_to_xywhr, _xywhr_to_cxcywhr),
    ("xywhr", "xyxyxyxy"): (_xywhr_to_xyxyxyxy,),
    ("xyxyxyxy", "xywhr"): (_xyxyxyxy_to_xywhr,),
}
_COORDINATES = {"xyxy": 4, "xywh": 4, "cxcywh": 4, "xywhr": 5, "cxcywhr": 5, "xyxyxyxy": 8}


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert ``Tensor[..., K]`` boxes from ``in_fmt`` to ``out_fmt``, as torchvision.

    Formats: ``"xyxy"``, ``"xywh"``, ``"cxcywh"`` (K = 4) and the rotated ``"xywhr"``,
    ``"cxcywhr"`` (K = 5, angle in degrees) and ``"xyxyxyxy"`` (K = 8); conversion between
    the two families is not supported. The dtype follows torch's promotion (integer boxes
    become float through a halving; rotated integer boxes are rounded back to integers).
    The same format returns a copy.
    """
    if in_fmt not in _COORDINATES or out_fmt not in _COORDINATES:
        raise ValueError(
            f"box formats must be one of {tuple(_COORDINATES)}, got {in_fmt!r} -> {out_fmt!r}"
        )
    if not isinstance(boxes, Tensor):
        raise ArgumentAttributeError(f"boxes must be a Tensor, got {type(boxes).__name__}")
    if in_fmt == out_fmt:
        return boxes.clone()
    steps = _CONVERSIONS.get((in_fmt, out_fmt))
    if steps is None:
        raise ArgumentNotImplementedError(
            f"box_convert cannot convert {in_fmt!r} to {out_fmt!r} "
            "(rotated and axis-aligned formats do not mix)"
        )
    if boxes.dim() == 0:
        raise ArgumentIndexError(f"boxes in {in_fmt!r} must be a Tensor[..., K], got a 0-d tensor")
    if (in_fmt, out_fmt) != ("xywh", "xyxy"):  # the only conversion without a subtraction
        _check_not_bool(boxes, "boxes")
    if boxes.shape[-1] != _COORDINATES[in_fmt]:
        # torchvision's unbind unpacking fails with ValueError.
        raise ValueError(
            f"boxes in {in_fmt!r} must be a Tensor[..., {_COORDINATES[in_fmt]}], "
            f"got shape {tuple(boxes.shape)}"
        )
    for step in steps:
        boxes = step(boxes)
    return boxes


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


DELTA_CLIPS = ("symmetric", "upper")


def decode_deltas(
    proposals: Tensor,
    deltas: Tensor,
    means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
    stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    max_shape: tuple[int, int] | None = None,
    wh_ratio_clip: float = BBOX_XFORM_CLIP,
    clip: str = "symmetric",
) -> Tensor:
    """Inverse of :func:`encode_deltas`; ``dw, dh`` are clamped to ``+-wh_ratio_clip``
    (mmdet; ``clip="upper"``: only from above, as torchvision's ``BoxCoder``) and the result
    is clipped to ``max_shape = (height, width)`` when given."""
    if clip not in DELTA_CLIPS:
        raise ValueError(f"clip must be one of {DELTA_CLIPS}, got {clip!r}")
    d = deltas * deltas.new_tensor(stds) + deltas.new_tensor(means)
    p = box_convert(proposals, "xyxy", "cxcywh")
    low = -wh_ratio_clip if clip == "symmetric" else None
    dw = d[..., 2].clamp(low, wh_ratio_clip)
    dh = d[..., 3].clamp(low, wh_ratio_clip)
    cx = p[..., 0] + d[..., 0] * p[..., 2]
    cy = p[..., 1] + d[..., 1] * p[..., 3]
    w = p[..., 2] * dw.exp()
    h = p[..., 3] * dh.exp()
    boxes = box_convert(torch.stack([cx, cy, w, h], dim=-1), "cxcywh", "xyxy")
    if max_shape is not None:
        boxes = clip_boxes_to_image(boxes, max_shape)
    return boxes
