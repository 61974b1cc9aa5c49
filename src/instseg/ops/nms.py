"""Non-maximum suppression with torchvision's semantics.

Exact greedy NMS (highest score first, a box is dropped when its IoU with an already kept box
is *greater* than the threshold, ties in score broken by lower index), evaluated block by
block with tensor operations instead of a per-box Python loop.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .boxes import _check_boxes, box_iou

# Boxes per block of the blocked NMS: bounds the IoU matrix to BLOCK x BLOCK per step.
_NMS_BLOCK = 1024


def _check_nms_args(boxes: Tensor, scores: Tensor, iou_threshold: float) -> None:
    _check_boxes(boxes)
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a Tensor[{boxes.shape[0]}] (one per box), got {got}")
    if scores.device != boxes.device:
        raise ValueError(f"scores are on {scores.device} but boxes are on {boxes.device}")
    if not isinstance(iou_threshold, (int, float)) or math.isnan(iou_threshold):
        raise ValueError(f"iou_threshold must be a number, got {iou_threshold!r}")


def _greedy_keep(boxes: Tensor, iou_threshold: float) -> Tensor:
    """Keep mask of greedy NMS over ``boxes`` already sorted by decreasing score.

    Boxes are processed in blocks. Inside a block, ``keep[i] = alive[i] and no kept j < i
    overlaps i`` is solved by fixed-point iteration: after step t the first t entries are
    final, and any fixed point equals the sequential greedy answer (induction on i), so it
    stops after at most (longest suppression chain) steps, usually a handful.
    """
    n = boxes.shape[0]
    keep = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    kept_boxes = boxes[:0]
    for start in range(0, n, _NMS_BLOCK):
        block = boxes[start : start + _NMS_BLOCK]
        alive = torch.ones(block.shape[0], dtype=torch.bool, device=boxes.device)
        if kept_boxes.shape[0] > 0:
            alive = ~(box_iou(kept_boxes, block) > iou_threshold).any(0)
        # 0/1 overlaps as floats: one matrix-vector product counts the kept suppressors of
        # every box (exact: integers far below 2^24), several times faster than bool ops.
        overlap = (box_iou(block, block) > iou_threshold).triu(1).to(torch.float32)
        block_keep = alive
        while True:
            suppressed = (block_keep.to(torch.float32) @ overlap) > 0.5
            updated = alive & ~suppressed
            if torch.equal(updated, block_keep):
                break
            block_keep = updated
        keep[start : start + block.shape[0]] = block_keep
        kept_boxes = torch.cat([kept_boxes, block[block_keep]])
    return keep


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices of the boxes kept by greedy NMS, sorted by decreasing score (torchvision)."""
    _check_nms_args(boxes, scores, iou_threshold)
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = _greedy_keep(boxes[order], float(iou_threshold))
    return order[keep]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS done independently per category ``idxs``; kept indices by decreasing score.

    Boxes of different categories never suppress each other. Each category's boxes are
    compared only with each other (the work is the sum of the squared category sizes, not
    the square of the total), which, unlike the coordinate-offset trick, is also exact for
    any coordinate range.
    """
    _check_nms_args(boxes, scores, iou_threshold)
    if not isinstance(idxs, Tensor) or idxs.shape != scores.shape:
        got = tuple(idxs.shape) if isinstance(idxs, Tensor) else type(idxs).__name__
        raise ValueError(f"idxs must be a Tensor[{scores.shape[0]}] (one per box), got {got}")
    order = torch.sort(scores, descending=True, stable=True).indices
    if order.numel() == 0:
        return order
    # Group by category, score order inside each group (both sorts stable).
    order = order[torch.sort(idxs[order], stable=True).indices]
    counts = torch.unique_consecutive(idxs[order], return_counts=True)[1].tolist()
    groups = torch.split(order, counts)
    keep = torch.cat([_greedy_keep(boxes[group], float(iou_threshold)) for group in groups])
    kept = torch.sort(order[keep]).values  # index order, so the next sort breaks ties by index
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]
