"""Non-maximum suppression with torchvision's semantics, faster than its compiled CPU kernel.

Exact greedy NMS: highest score first, a box is dropped when its IoU with an already kept box
of its group is *greater* than the threshold, ties in score broken by lower index. IoU is
computed with the operations of torchvision's kernel in their order
(``inter / (area_i + area_j - inter)``), so the same pairs cross the threshold.

Two exact ways to find the overlapping pairs, then one resolution of the greedy order:

- *sweep* (the usual case, :func:`_sweep_edges`): overlapping boxes have similar widths and
  nearby corners (within ``(1 - t)`` of their size along x and along y), so with the boxes
  binned by width and banded by height inside their group, and sorted by ``x1``, a sorted
  search gives every box two short windows of candidates; IoU is computed for those pairs
  only. The work grows with the number of nearby similar boxes, not with the square of the
  count.
- *blocked* (crowded inputs whose windows would hold too many pairs, negative thresholds,
  inverted or non-finite boxes): IoU of each block of 1024 boxes with itself and with the
  boxes kept so far, as dense matrices.

The greedy order is then resolved by fixed-point iteration on the overlap graph: ``keep[v] =
not any(keep[u] for u ranked above v with IoU(u, v) > t)``. After step ``k`` the ``k``
highest-ranked boxes are final, and the only fixed point is the sequential answer (induction
on rank), so it stops after (longest suppression chain) steps, usually a handful.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import ArgumentRuntimeError, ragged_arange

# Boxes per block of the blocked path: bounds each IoU matrix to BLOCK x BLOCK.
_NMS_BLOCK = 1024
# The sweep is used while its candidate pairs number at most this many per box (plus a floor):
# beyond it the blocked path's dense matrices are cheaper and bound the memory.
_SWEEP_PAIRS_PER_BOX = 256
_SWEEP_MIN_PAIRS = 1 << 16
# Below this threshold the width bins would be too coarse to pay for the shadow copies.
_MIN_BINNED_THRESHOLD = 0.1


def _threshold(iou_threshold: float | Tensor) -> float:
    try:
        value = float(iou_threshold)
    except (TypeError, ValueError, RuntimeError):
        raise ArgumentRuntimeError(
            f"iou_threshold must be a number, got {iou_threshold!r}"
        ) from None
    if math.isnan(value):
        raise ArgumentRuntimeError("iou_threshold must be a number, got nan")
    return value


def _check_nms_args(boxes: Tensor, scores: Tensor) -> None:
    """torchvision's checks, raised as ``ValueError`` and ``RuntimeError`` (its class)."""
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ArgumentRuntimeError(f"boxes must be a Tensor[N, 4] (x1, y1, x2, y2), got {shape}")
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ArgumentRuntimeError(
            f"scores must be a Tensor[{boxes.shape[0]}] (one per box), got {got}"
        )
    if scores.device != boxes.device:
        raise ArgumentRuntimeError(f"scores are on {scores.device} but boxes are on {boxes.device}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise ArgumentRuntimeError(f"scores must be real numbers, got {scores.dtype}")


def _compute_boxes(boxes: Tensor) -> Tensor:
    """Boxes in the dtype IoU is computed in: float16/bfloat16 in float32 (their areas
    overflow or round badly), integers in float64 (exact), float32/float64 as given."""
    if boxes.dtype in (torch.float16, torch.bfloat16):
        return boxes.float()
    if not boxes.is_floating_point():
        return boxes.double()
    return boxes


def _iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of broadcastable ``(..., 4)`` boxes, with torchvision's kernel's operations."""
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_(min=0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_(min=0)
    inter = w.mul_(h)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter.div_(area_a + area_b - inter)


def _resolve(n: int, above: Tensor, below: Tensor) -> Tensor:
    """Keep mask of greedy NMS given the overlap edges ``above[k]`` (higher rank, smaller
    index) over ``below[k]``, by fixed-point iteration (see the module docstring)."""
    keep = torch.ones(n, dtype=torch.bool, device=above.device)
    if above.numel() == 0:
        return keep
    while True:
        suppressed = torch.zeros(n, dtype=torch.bool, device=above.device)
        suppressed[below[keep[above]]] = True
        updated = ~suppressed
        if torch.equal(updated, keep):
            return keep
        keep = updated


def _sweep_edges(boxes: Tensor, groups: Tensor | None, thr: float) -> tuple[Tensor, Tensor] | None:
    """Overlap edges (IoU > ``thr``, same group) of score-ordered ``boxes`` found by the sweep,
    as (higher-ranked, lower-ranked) index pairs; None when the windows hold too many pairs.

    Needs ``thr >= 0`` and finite, non-inverted boxes. Then a box of zero width or height never
    overlaps (its IoU is 0 or NaN) and is left out, and two overlapping boxes satisfy, for
    ``a`` the one with the smaller coordinate, ``x1_b - x1_a < (1 - t) w_a``, the same along y,
    and each width is more than ``t`` times the other. So:

    - the boxes are binned by log-width in steps of ``1 / t``; each box meets the boxes of its
      own bin and, as a "shadow" copy, those of the next bin up (two shadows of the same bin
      meet again as two home boxes: a repeated edge, harmless);
    - inside a (group, bin) cell, boxes are cut into horizontal bands of height
      ``(1 - t) * tallest``, so overlapping boxes are in the same or adjacent bands;
    - sorted by (cell, band, x1), each box reads a window of its own band (``x1`` up to its
      reach, later boxes only) and one of the next band (``x1`` within the cell's largest
      reach before it, up to its own reach after it).
    """
    device = boxes.device
    width = boxes[:, 2] - boxes[:, 0]
    height = boxes[:, 3] - boxes[:, 1]
    live = torch.nonzero((width > 0) & (height > 0)).squeeze(1)
    none = live[:0]
    if live.numel() < 2:
        return none, none
    x1 = boxes[live, 0].double()
    y1 = boxes[live, 1].double()
    width = width[live].double()
    height = height[live].double()
    cell = torch.zeros_like(live)
    if groups is not None:
        cell = torch.unique(groups[live], return_inverse=True)[1]
    if thr >= _MIN_BINNED_THRESHOLD:
        # Widened by 1e-4 so that float rounding never separates two boxes that overlap.
        step = math.log(1.0 / (thr * (1.0 - 1e-4)))
        bins = torch.floor(torch.log(width) / step).long()
        bins -= bins.min()
        num_bins = int(bins.max()) + 2
        cell = torch.cat([cell * num_bins + bins, cell * num_bins + bins + 1])
        live, x1, y1 = live.repeat(2), x1.repeat(2), y1.repeat(2)
        width, height = width.repeat(2), height.repeat(2)
    num_cells = int(cell.max()) + 1
    # Reaches along x and y, widened to cover float rounding of the IoU.
    reach = (1.0 - thr) * width + 1e-4 * (width + x1.abs() + 1.0)
    reach_y = (1.0 - thr) * height + 1e-4 * (height + y1.abs() + 1.0)
    band_height = torch.zeros(num_cells, dtype=torch.float64, device=device)
    band_height.scatter_reduce_(0, cell, reach_y, "amax")
    cell_reach = torch.zeros(num_cells, dtype=torch.float64, device=device)
    cell_reach.scatter_reduce_(0, cell, reach, "amax")
    band = torch.floor((y1 - y1.min()) / band_height[cell]).long()
    num_bands = int(band.max()) + 2
    # Sort key: x1, offset by (cell, band) so that each occupies its own range of the line.
    x = x1 - x1.min()
    span = float(x.max()) + 2 * float(reach.max()) + 1.0
    row = (cell * num_bands + band).double() * span
    key = x + row
    order = torch.sort(key, stable=True).indices
    key, x, row, reach = key[order], x[order], row[order], reach[order]
    n = key.numel()
    position = torch.arange(n, device=device)
    # Own band: the boxes after this one up to its reach.
    own_end = torch.searchsorted(key, key + reach, right=True)
    own_counts = (own_end - position - 1).clamp_(min=0)
    # Next band: from the cell's largest reach before this box to its own reach after it.
    next_row = row + span
    lo = torch.searchsorted(key, next_row + x - cell_reach[cell[order]])
    hi = torch.searchsorted(key, next_row + x + reach, right=True)
    next_counts = (hi - lo).clamp_(min=0)
    if int(own_counts.sum() + next_counts.sum()) > max(_SWEEP_PAIRS_PER_BOX * n, _SWEEP_MIN_PAIRS):
        return None
    # Candidate pairs as positions (first, second) in the sorted order.
    first, offset = ragged_arange(torch.cat([own_counts, next_counts]))
    start = torch.cat([position + 1, lo])
    second = start[first] + offset
    first = first % n
    box_index = live[order]
    # Coordinates as rows (x1s, y1s, x2s, y2s): the pairwise arithmetic runs on contiguous rows.
    coords = boxes.index_select(0, box_index).t().contiguous()
    hit = _iou(coords.index_select(1, first).T, coords.index_select(1, second).T) > thr
    pairs = hit.nonzero().squeeze(1)
    i = box_index.index_select(0, first.index_select(0, pairs))
    j = box_index.index_select(0, second.index_select(0, pairs))
    return torch.minimum(i, j), torch.maximum(i, j)


def _blocked_keep(boxes: Tensor, thr: float) -> Tensor:
    """Keep mask of greedy NMS over score-ordered ``boxes`` (one group) with dense IoU blocks."""
    n = boxes.shape[0]
    keep = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    kept_boxes = boxes[:0]
    for start in range(0, n, _NMS_BLOCK):
        block = boxes[start : start + _NMS_BLOCK]
        alive = torch.ones(block.shape[0], dtype=torch.bool, device=boxes.device)
        if kept_boxes.shape[0] > 0:
            alive = ~(_iou(kept_boxes[:, None], block[None]) > thr).any(0)
        # 0/1 overlaps as floats: one matrix-vector product counts the kept suppressors of
        # every box (exact: integers far below 2^24), several times faster than bool ops.
        overlap = (_iou(block[:, None], block[None]) > thr).triu(1).to(torch.float32)
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


def _sweep_applies(boxes: Tensor, thr: float) -> bool:
    """The sweep's window bound holds for finite boxes with x2 >= x1, y2 >= y1 and t >= 0."""
    if thr < 0 or not bool(torch.isfinite(boxes).all()):
        return False
    return bool(((boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])).all())


def _greedy_keep(boxes: Tensor, groups: Tensor | None, thr: float) -> Tensor:
    """Keep mask of per-group greedy NMS over ``boxes`` sorted by decreasing score."""
    n = boxes.shape[0]
    if n <= 1:
        return torch.ones(n, dtype=torch.bool, device=boxes.device)
    if _sweep_applies(boxes, thr):
        edges = _sweep_edges(boxes, groups, thr)
        if edges is not None:
            return _resolve(n, *edges)
    if groups is None:
        return _blocked_keep(boxes, thr)
    # Crowded groups: each group's boxes only meet each other (stable sort keeps score order).
    by_group = torch.sort(groups, stable=True).indices
    counts = torch.unique_consecutive(groups[by_group], return_counts=True)[1].tolist()
    keep = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    for members in torch.split(by_group, counts):
        keep[members] = _blocked_keep(boxes[members], thr)
    return keep


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices of the boxes kept by greedy NMS, sorted by decreasing score (torchvision).

    Unlike torchvision's CPU kernel, float16, bfloat16 and integer boxes are accepted (IoU in
    float32, float32 and float64), and scores may have another dtype than the boxes.
    """
    _check_nms_args(boxes, scores)
    thr = _threshold(iou_threshold)
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = _greedy_keep(_compute_boxes(boxes)[order], None, thr)
    return order[keep]


def batched_nms(
    boxes: Tensor, scores: Tensor | None, idxs: Tensor | None, iou_threshold: float
) -> Tensor:
    """NMS done independently per category ``idxs``; kept indices by decreasing score.

    Boxes of different categories never suppress each other. Unlike the coordinate-offset trick
    torchvision uses on large inputs, the groups are kept apart exactly, for any coordinate
    range. Empty ``boxes`` give an empty result whatever ``scores`` and ``idxs`` are, as in
    torchvision.
    """
    if isinstance(boxes, Tensor) and boxes.numel() == 0 and boxes.dim() >= 1:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    _check_nms_args(boxes, scores)
    if not isinstance(idxs, Tensor) or idxs.shape != scores.shape:
        got = tuple(idxs.shape) if isinstance(idxs, Tensor) else type(idxs).__name__
        raise ArgumentRuntimeError(
            f"idxs must be a Tensor[{scores.shape[0]}] (one per box), got {got}"
        )
    if idxs.device != boxes.device:
        raise ArgumentRuntimeError(f"idxs are on {idxs.device} but boxes are on {boxes.device}")
    thr = _threshold(iou_threshold)
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = _greedy_keep(_compute_boxes(boxes)[order], idxs[order], thr)
    return order[keep]
