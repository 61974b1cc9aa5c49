"""Anchors (mmdet ``AnchorGenerator`` with ``center_offset=0``) and box assignment/sampling
(``MaxIoUAssigner``, ``RandomSampler``), shared by the RPN and the R-CNN heads."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import box_iou
from .global_batch import permutation


class AnchorGenerator:
    """Anchors of every FPN level, ordered (location row-major, then anchor) as the heads'
    outputs are flattened.

    A level of stride ``s`` has ``len(ratios) * len(scales)`` anchors per location, of base
    size ``s * scale``, area-preserving aspect ``h / w = ratio``, centred on ``(x*s, y*s)``.
    ``round_base`` rounds the base anchors' corners to integers (torchvision, spec §13.5).
    """

    def __init__(
        self,
        strides: tuple[int, ...] = (4, 8, 16, 32, 64),
        ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        scales: tuple[float, ...] = (8.0,),
        round_base: bool = False,
    ) -> None:
        self.strides = strides
        self.base_anchors = []
        h_ratios = torch.tensor(ratios, dtype=torch.float64).sqrt()
        w_ratios = 1 / h_ratios
        scale = torch.tensor(scales, dtype=torch.float64)
        for stride in strides:
            ws = (stride * w_ratios[:, None] * scale[None, :]).reshape(-1)
            hs = (stride * h_ratios[:, None] * scale[None, :]).reshape(-1)
            base = torch.stack([-ws / 2, -hs / 2, ws / 2, hs / 2], 1).float()
            self.base_anchors.append(base.round() if round_base else base)

    @property
    def num_anchors(self) -> int:
        return self.base_anchors[0].shape[0]

    def grid_anchors(
        self,
        sizes: list[tuple[int, int]],
        device: torch.device,
        input_size: tuple[int, int] | None = None,
    ) -> list[Tensor]:
        """``(H*W*A, 4)`` anchors per level for feature maps of ``sizes``. With
        ``input_size`` (the padded batch's height and width) the centres step by
        ``input_size // size`` per axis instead of the level's stride, as torchvision's
        ``AnchorGenerator`` does (a 13-cell P6 of an 800-pixel input steps by 61, not 64)."""
        anchors = []
        for (height, width), stride, base in zip(
            sizes, self.strides, self.base_anchors, strict=False
        ):
            stride_y = stride_x = stride
            if input_size is not None:
                stride_y, stride_x = input_size[0] // height, input_size[1] // width
            ys = torch.arange(height, device=device, dtype=torch.float32) * stride_y
            xs = torch.arange(width, device=device, dtype=torch.float32) * stride_x
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], -1).reshape(-1, 1, 4)
            anchors.append((shifts + base.to(device)).reshape(-1, 4))
        return anchors

    def valid_flags(
        self, sizes: list[tuple[int, int]], image_size: tuple[int, int], device: torch.device
    ) -> Tensor:
        """Anchors whose location lies inside the image's own padded extent (mmdet rule)."""
        flags = []
        for (height, width), stride in zip(sizes, self.strides, strict=False):
            valid_h = min(math.ceil(image_size[0] / stride), height)
            valid_w = min(math.ceil(image_size[1] / stride), width)
            valid = torch.zeros(height, width, dtype=torch.bool, device=device)
            valid[:valid_h, :valid_w] = True
            flags.append(valid[:, :, None].expand(height, width, self.num_anchors).reshape(-1))
        return torch.cat(flags)


@dataclass
class AssignerConfig:
    """mmdet ``MaxIoUAssigner``: IoU >= ``pos_iou_thr`` is positive, < ``neg_iou_thr`` negative;
    with ``match_low_quality`` each GT also claims the candidates of its best IoU when that is
    >= ``min_pos_iou``. Candidates whose IoF with an ignore region exceeds ``ignore_iof_thr``
    (when > 0) are ignored."""

    pos_iou_thr: float = 0.5
    neg_iou_thr: float = 0.5
    min_pos_iou: float = 0.5
    match_low_quality: bool = False
    ignore_iof_thr: float = -1.0


@dataclass
class SamplerConfig:
    """mmdet ``RandomSampler``: ``num`` samples, at most ``pos_fraction`` of them positive."""

    num: int = 512
    pos_fraction: float = 0.25
    add_gt_as_proposals: bool = True


def assign(
    boxes: Tensor, gt_boxes: Tensor, cfg: AssignerConfig, ignore_boxes: Tensor | None = None
) -> Tensor:
    """Assigned GT per candidate: ``-1`` ignored, ``0`` negative, ``i + 1`` for GT ``i``."""
    n = boxes.shape[0]
    assigned = torch.full((n,), -1, dtype=torch.long, device=boxes.device)
    if gt_boxes.shape[0] == 0:
        assigned[:] = 0
        return assigned
    overlaps = box_iou(gt_boxes, boxes).nan_to_num(0.0)  # (G, N)
    max_overlaps, argmax = overlaps.max(0)
    assigned[(max_overlaps >= 0) & (max_overlaps < cfg.neg_iou_thr)] = 0
    positive = max_overlaps >= cfg.pos_iou_thr
    assigned[positive] = argmax[positive] + 1
    if cfg.match_low_quality:
        gt_max = overlaps.max(1).values
        for_gt = (overlaps == gt_max[:, None]) & (gt_max[:, None] >= cfg.min_pos_iou)
        # Later GTs win ties, as mmdet's loop over GTs does: the highest GT index that
        # claims a candidate (-1 where none does).
        gt_index = torch.arange(overlaps.shape[0], device=overlaps.device)[:, None]
        last_gt = torch.where(for_gt, gt_index, -1).amax(0)
        has = last_gt >= 0
        assigned[has] = last_gt[has] + 1
    if cfg.ignore_iof_thr > 0 and ignore_boxes is not None and ignore_boxes.shape[0] > 0:
        lt = torch.max(boxes[:, None, :2], ignore_boxes[None, :, :2])
        rb = torch.min(boxes[:, None, 2:], ignore_boxes[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1e-6)
        ignored = (inter / area[:, None]).max(1).values > cfg.ignore_iof_thr
        assigned[ignored & (assigned <= 0)] = -1
    return assigned


def sample(
    assigned: Tensor, num: int, pos_fraction: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Random positive and negative indices: up to ``num * pos_fraction`` positives, negatives
    filling the rest. ``generator`` (a CPU generator: the image's own stream) draws them;
    None draws from the global torch RNG on the indices' device."""
    pos = torch.nonzero(assigned > 0).flatten()
    neg = torch.nonzero(assigned == 0).flatten()
    num_pos = min(int(num * pos_fraction), pos.numel())
    pos = pos[permutation(pos.numel(), generator, pos.device)[:num_pos]]
    num_neg = min(num - num_pos, neg.numel())
    neg = neg[permutation(neg.numel(), generator, neg.device)[:num_neg]]
    return pos, neg
