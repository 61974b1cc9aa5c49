"""Single-level RoI feature extractor (mmdet ``SingleRoIExtractor``, spec §1.2).

Each RoI is pooled from one FPN level chosen by its size:
``level = floor(log2(sqrt(w * h) / finest_scale + 1e-6))`` clamped to the available levels,
so sides below 112 px go to P2, [112, 224) to P3, [224, 448) to P4 and larger to P5. The RoI
operation is selectable: RoIAlign (torchvision semantics) or Precise RoI Pooling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...ops import prroi_pool2d, roi_align

ROI_OPS = ("roi_align", "prroi_pool")


@dataclass
class RoIExtractorConfig:
    output_size: int = 7
    op: str = "roi_align"
    sampling_ratio: int = 0
    aligned: bool = True
    strides: tuple[int, ...] = (4, 8, 16, 32)
    finest_scale: float = 56.0

    def __post_init__(self) -> None:
        if self.op not in ROI_OPS:
            raise ValueError(f"roi extractor op must be one of {ROI_OPS}, got {self.op!r}")
        if self.output_size <= 0:
            raise ValueError(f"roi extractor output_size must be positive, got {self.output_size}")
        if not self.strides:
            raise ValueError("roi extractor strides must not be empty")


def map_roi_levels(rois: Tensor, num_levels: int, finest_scale: float = 56.0) -> Tensor:
    """FPN level index of each ``(K, 5)`` RoI (spec §1.2)."""
    scale = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).clamp(min=0).sqrt()
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


class SingleRoIExtractor(nn.Module):
    def __init__(self, cfg: RoIExtractorConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def pool(self, feat: Tensor, rois: Tensor, stride: int) -> Tensor:
        size, scale = self.cfg.output_size, 1.0 / stride
        if self.cfg.op == "prroi_pool":
            return prroi_pool2d(feat, rois, size, size, scale)
        return roi_align(feat, rois, size, scale, self.cfg.sampling_ratio, self.cfg.aligned)

    def forward(self, feats: list[Tensor], rois: Tensor) -> Tensor:
        """``(K, C, S, S)`` features for ``(K, 5)`` RoIs from the first ``len(strides)`` maps."""
        levels = len(self.cfg.strides)
        feats = feats[:levels]
        if len(feats) == 1:
            return self.pool(feats[0], rois, self.cfg.strides[0])
        size = self.cfg.output_size
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], size, size))
        target = map_roi_levels(rois, levels, self.cfg.finest_scale)
        for level, (feat, stride) in enumerate(zip(feats, self.cfg.strides, strict=True)):
            index = torch.nonzero(target == level).flatten()
            if index.numel() > 0:
                out = out.index_copy(0, index, self.pool(feat, rois[index], stride))
        return out
