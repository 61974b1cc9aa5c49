"""Losses shared by the detectors (FCOS, CondInst: spec §4.3, §4.5; the R-CNN box losses), with
mmdet's formulas.

Each returns per-element (or per-instance) losses; the caller sums and normalises, as the
recipes normalise by counts gathered over the whole batch. ``average`` is mmdet's
``weight_reduce_loss`` with an ``avg_factor``: the sum over ``avg_factor + eps(float32)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_FLOAT32_EPS = torch.finfo(torch.float32).eps


def average(losses: Tensor, avg_factor: float | Tensor) -> Tensor:
    """``losses.sum() / (avg_factor + eps)``: mmdet's mean with an explicit normaliser."""
    return losses.sum() / (avg_factor + _FLOAT32_EPS)


def smooth_l1(diff: Tensor, beta: float) -> Tensor:
    """Per-element smooth L1 of ``diff = pred - target``: ``0.5 d^2 / beta`` below ``beta``,
    ``|d| - beta / 2`` above; ``beta = 0`` is L1 (mmdet ``SmoothL1Loss``, detectron2's)."""
    d = diff.abs()
    if beta <= 0:
        return d
    return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def sigmoid_focal_loss(
    logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Per-element focal loss of ``(N, C)`` logits against ``(N,)`` labels in ``0..C`` (``C``:
    background, an all-zero target row)."""
    num_classes = logits.shape[1]
    target = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(logits.dtype)
    prob = logits.sigmoid()
    pt = (1 - prob) * target + prob * (1 - target)
    weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """``1 - GIoU`` of aligned ``(N, 4)`` xyxy boxes (mmdet ``GIoULoss``: the union and the
    enclosing area are clamped below at ``eps``)."""
    area1 = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area2 = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    eps_t = pred.new_tensor([eps])
    union = torch.max(area1 + area2 - overlap, eps_t)
    enclose_wh = (
        torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])
    ).clamp(min=0)
    enclose = torch.max(enclose_wh[:, 0] * enclose_wh[:, 1], eps_t)
    giou = overlap / union - (enclose - union) / enclose
    return 1 - giou


def dice_loss(logits: Tensor, targets: Tensor, eps: float = 5e-6) -> Tensor:
    """Per-instance ``1 - 2 sum(p t) / ((sum p^2 + eps) + (sum t^2 + eps))``, ``p`` the sigmoid
    of ``(N, ...)`` logits (mmdet ``DiceLoss``, ``naive_dice=False``)."""
    p = logits.sigmoid().flatten(1)
    t = targets.flatten(1).to(p.dtype)
    a = (p * t).sum(1)
    b = (p * p).sum(1) + eps
    c = (t * t).sum(1) + eps
    return 1 - 2 * a / (b + c)
