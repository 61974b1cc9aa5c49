"""The RoI pooling step shared by the RoI extractors: one op call per feature level, and the
settings every extractor has (which op, which levels)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...ops import prroi_pool2d
from ...ops.roi_align import roi_align_keep_layout
from ..features import Features, FeatureSpec, common_width, select_specs

ROI_OPS = ("roi_align", "prroi_pool")


@dataclass
class RoIPoolingConfig:
    """What every RoI extractor shares: the RoI op (RoIAlign or Precise RoI Pooling), its
    settings, and the neck levels it reads (by name; their strides come from the neck).
    The output size is not here: the head an extractor feeds decides it."""

    op: str = "roi_align"
    sampling_ratio: int = 0
    aligned: bool = True
    levels: tuple[str, ...] = ("p2", "p3", "p4", "p5")

    def __post_init__(self) -> None:
        if self.op not in ROI_OPS:
            raise ValueError(f"roi extractor op must be one of {ROI_OPS}, got {self.op!r}")
        if self.sampling_ratio < 0:
            raise ValueError(
                f"roi extractor sampling_ratio must be >= 0, got {self.sampling_ratio}"
            )
        if not self.levels:
            raise ValueError("roi extractor levels must name at least one feature level")


class LevelPooler:
    """The levels an extractor reads (names, strides, one width) and its pooling call."""

    def __init__(
        self, cfg: RoIPoolingConfig, in_specs: list[FeatureSpec], output_size: int
    ) -> None:
        if output_size <= 0:
            raise ValueError(f"roi extractor output size must be positive, got {output_size}")
        specs = select_specs(in_specs, cfg.levels, "roi extractor levels")
        self.cfg = cfg
        self.levels = [s.name for s in specs]
        self.strides = [s.stride for s in specs]
        self.in_channels = common_width(specs, "a roi extractor")
        self.output_size = output_size

    def maps(self, feats: Features) -> list[Tensor]:
        return [feats[name] for name in self.levels]

    def pool(self, feat: Tensor, rois: Tensor, stride: int) -> Tensor:
        cfg = self.cfg
        return pool_level(
            feat, rois, self.output_size, stride, cfg.op, cfg.sampling_ratio, cfg.aligned
        )


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
        return roi_align_keep_layout(feat, rois, output_size, scale, sampling_ratio, aligned)
    raise ValueError(f"roi op must be one of {ROI_OPS}, got {op!r}")


def rescale_rois(rois: Tensor, scale_factor: float) -> Tensor:
    """``(K, 5)`` RoIs with width and height times ``scale_factor`` about their centres
    (mmdet's ``roi_rescale``); the batch index is kept."""
    cx = (rois[:, 1] + rois[:, 3]) * 0.5
    cy = (rois[:, 2] + rois[:, 4]) * 0.5
    half_w = (rois[:, 3] - rois[:, 1]) * (0.5 * scale_factor)
    half_h = (rois[:, 4] - rois[:, 2]) * (0.5 * scale_factor)
    return torch.stack([rois[:, 0], cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1)
