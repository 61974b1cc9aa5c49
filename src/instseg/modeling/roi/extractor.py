"""RoI feature extractors: the single-level one (mmdet ``SingleRoIExtractor``, spec §1.2)
and the choice between it and GRoIE (:mod:`.groie`, spec §2).

The single-level extractor pools each RoI from one FPN level chosen by its size:
``level = floor(log2(sqrt(w * h) / finest_scale + 1e-6))`` clamped to the available levels,
so sides below 112 px go to P2, [112, 224) to P3, [224, 448) to P4 and larger to P5. The RoI
operation is selectable in both: RoIAlign (torchvision semantics) or Precise RoI Pooling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .groie import GenericRoIExtractor, GRoIEConfig
from .pooling import ROI_OPS, pool_level, rescale_rois

EXTRACTOR_KINDS = ("single", "generic")


@dataclass
class RoIExtractorConfig:
    """How RoI features are pooled. ``kind="single"``: one level per RoI (``finest_scale``);
    ``kind="generic"``: GRoIE, every level, with the ``groie`` settings."""

    output_size: int = 7
    op: str = "roi_align"
    sampling_ratio: int = 0
    aligned: bool = True
    strides: tuple[int, ...] = (4, 8, 16, 32)
    finest_scale: float = 56.0
    kind: str = "single"
    groie: GRoIEConfig = field(default_factory=GRoIEConfig)

    def __post_init__(self) -> None:
        if self.op not in ROI_OPS:
            raise ValueError(f"roi extractor op must be one of {ROI_OPS}, got {self.op!r}")
        if self.kind not in EXTRACTOR_KINDS:
            raise ValueError(
                f"roi extractor kind must be one of {EXTRACTOR_KINDS}, got {self.kind!r}"
            )
        if self.output_size <= 0:
            raise ValueError(f"roi extractor output_size must be positive, got {self.output_size}")
        if self.sampling_ratio < 0:
            raise ValueError(
                f"roi extractor sampling_ratio must be >= 0, got {self.sampling_ratio}"
            )
        if not self.strides:
            raise ValueError("roi extractor strides must not be empty")


def map_roi_levels(rois: Tensor, num_levels: int, finest_scale: float = 56.0) -> Tensor:
    """FPN level index of each ``(K, 5)`` RoI (spec §1.2)."""
    scale = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).clamp(min=0).sqrt()
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


class SingleRoIExtractor(nn.Module):
    """Each RoI pooled from the one level its size selects; no parameters."""

    def __init__(self, cfg: RoIExtractorConfig, in_channels: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.out_channels = in_channels

    def pool(self, feat: Tensor, rois: Tensor, stride: int) -> Tensor:
        cfg = self.cfg
        return pool_level(
            feat, rois, cfg.output_size, stride, cfg.op, cfg.sampling_ratio, cfg.aligned
        )

    def forward(
        self, feats: list[Tensor], rois: Tensor, roi_scale_factor: float | None = None
    ) -> Tensor:
        """``(K, C, S, S)`` features for ``(K, 5)`` RoIs from the first ``len(strides)`` maps.

        With ``roi_scale_factor`` the RoIs are enlarged about their centres before pooling;
        the level is still chosen from the original size (mmdet)."""
        levels = len(self.cfg.strides)
        feats = feats[:levels]
        pooled_rois = rois if roi_scale_factor is None else rescale_rois(rois, roi_scale_factor)
        if len(feats) == 1:
            return self.pool(feats[0], pooled_rois, self.cfg.strides[0])
        if rois.shape[0] == 0:
            size = self.cfg.output_size
            return feats[0].new_zeros((0, feats[0].shape[1], size, size))
        # Pool each level's RoIs in level order, then put the rows back in RoI order (a
        # gather, whose backward keeps only the index, unlike an index_copy into zeros).
        target = map_roi_levels(rois, levels, self.cfg.finest_scale)
        order = torch.argsort(target, stable=True)
        counts = torch.bincount(target, minlength=levels).tolist()
        parts = [
            self.pool(feat, level_rois, stride)
            for feat, stride, level_rois in zip(
                feats, self.cfg.strides, pooled_rois[order].split(counts), strict=True
            )
            if level_rois.shape[0] > 0
        ]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return torch.cat(parts)[inverse]


def build_roi_extractor(
    cfg: RoIExtractorConfig, in_channels: int
) -> SingleRoIExtractor | GenericRoIExtractor:
    """The extractor ``cfg.kind`` names, over feature maps of ``in_channels`` channels; its
    ``out_channels`` is the width the head must take."""
    if cfg.kind == "generic":
        return GenericRoIExtractor(cfg, in_channels)
    return SingleRoIExtractor(cfg, in_channels)
