"""The RoI pooling step shared by the RoI extractors: one op call per feature level."""

from __future__ import annotations

import torch
from torch import Tensor

from ...ops import prroi_pool2d, roi_align

ROI_OPS = ("roi_align", "prroi_pool")


def pool_level(
    feat: Tensor,
    rois: Tensor,
    output_size: int,
    stride: int,
    op: str = "roi_align",
    sampling_ratio: int = 0,
    aligned: bool = True,
) -> Tensor:
    """``(K, C, S, S)`` features of ``(K, 5)`` RoIs from one map of the given stride."""
    scale = 1.0 / stride
    if op == "prroi_pool":
        return prroi_pool2d(feat, rois, output_size, output_size, scale)
    if op == "roi_align":
        return roi_align(feat, rois, output_size, scale, sampling_ratio, aligned)
    raise ValueError(f"roi op must be one of {ROI_OPS}, got {op!r}")


def rescale_rois(rois: Tensor, scale_factor: float) -> Tensor:
    """``(K, 5)`` RoIs with width and height times ``scale_factor`` about their centres
    (mmdet's ``roi_rescale``); the batch index is kept."""
    cx = (rois[:, 1] + rois[:, 3]) * 0.5
    cy = (rois[:, 2] + rois[:, 4]) * 0.5
    half_w = (rois[:, 3] - rois[:, 1]) * (0.5 * scale_factor)
    half_h = (rois[:, 4] - rois[:, 2]) * (0.5 * scale_factor)
    return torch.stack([rois[:, 0], cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1)
