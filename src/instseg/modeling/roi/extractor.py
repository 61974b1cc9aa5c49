"""RoI feature extractors: the single-level one (mmdet ``SingleRoIExtractor``, spec §1.2)
and the choice between it and GRoIE (:mod:`.groie`, spec §2).

The single-level extractor pools each RoI from one FPN level chosen by its size:
``level = floor(log2(sqrt(w * h) / finest_scale + 1e-6))`` clamped to the available levels,
so sides below 112 px go to P2, [112, 224) to P3, [224, 448) to P4 and larger to P5
(torchvision's ``LevelMapper`` adds the 1e-6 after the log instead: ``level_mapping=
"torchvision"``). The RoI operation is selectable in both: RoIAlign (torchvision
semantics) or Precise RoI Pooling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..features import Features, FeatureSpec
from .groie import GenericRoIExtractor, GRoIEConfig
from .pooling import LevelPooler, RoIPoolingConfig, rescale_rois


@dataclass
class RoIExtractorConfig(RoIPoolingConfig):
    """The single-level extractor: each RoI from the one level its size selects
    (``finest_scale``). The other choice is :class:`GRoIEConfig` (``kind="generic"``)."""

    kind: Literal["single"] = "single"
    finest_scale: float = 56.0
    level_mapping: str = "mmdet"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.level_mapping not in LEVEL_MAPPINGS:
            raise ValueError(
                f"roi extractor level_mapping must be one of {LEVEL_MAPPINGS}, got "
                f"{self.level_mapping!r}"
            )

    def build(self, in_specs: list[FeatureSpec], output_size: int) -> SingleRoIExtractor:
        return SingleRoIExtractor(self, in_specs, output_size)


LEVEL_MAPPINGS = ("mmdet", "torchvision")
RoIExtractorChoice = RoIExtractorConfig | GRoIEConfig
"""An extractor config: ``kind`` "single" or "generic" (GRoIE)."""


def map_roi_levels(
    rois: Tensor, num_levels: int, finest_scale: float = 56.0, mapping: str = "mmdet"
) -> Tensor:
    """FPN level index of each ``(K, 5)`` RoI (spec §1.2; "torchvision": §13.6)."""
    scale = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).clamp(min=0).sqrt()
    if mapping == "torchvision":  # its float32 steps: canonical level 4 at 224 px, P2 first
        level = torch.floor(4 + torch.log2(scale / (4 * finest_scale)) + 1e-6) - 2
    else:
        level = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return level.clamp(0, num_levels - 1).long()


class SingleRoIExtractor(nn.Module):
    """Each RoI pooled from the one level its size selects; no parameters. ``out_channels``
    is the width of the levels it reads."""

    def __init__(
        self, cfg: RoIExtractorConfig, in_specs: list[FeatureSpec], output_size: int
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.pooler = LevelPooler(cfg, in_specs, output_size)
        self.output_size = output_size
        self.out_channels = self.pooler.in_channels

    def forward(
        self, feats: Features, rois: Tensor, roi_scale_factor: float | None = None
    ) -> Tensor:
        """``(K, C, S, S)`` features for ``(K, 5)`` RoIs from the extractor's levels.

        With ``roi_scale_factor`` the RoIs are enlarged about their centres before pooling;
        the level is still chosen from the original size (mmdet)."""
        pooler = self.pooler
        maps = pooler.maps(feats)
        levels = len(maps)
        pooled_rois = rois if roi_scale_factor is None else rescale_rois(rois, roi_scale_factor)
        if levels == 1:
            return pooler.pool(maps[0], pooled_rois, pooler.strides[0])
        if rois.shape[0] == 0:
            size = self.output_size
            return maps[0].new_zeros((0, maps[0].shape[1], size, size))
        # Pool each level's RoIs in level order, then put the rows back in RoI order.
        target = map_roi_levels(rois, levels, self.cfg.finest_scale, self.cfg.level_mapping)
        order = torch.argsort(target, stable=True)
        counts = torch.bincount(target, minlength=levels).tolist()
        parts = [
            pooler.pool(feat, level_rois, stride)
            for feat, stride, level_rois in zip(
                maps, pooler.strides, pooled_rois[order].split(counts), strict=True
            )
            if level_rois.shape[0] > 0
        ]
        return _Unsort.apply(torch.cat(parts), order)


class _Unsort(torch.autograd.Function):
    """``out[order] = pooled``: RoI features pooled in the level-sorted ``order`` put back in
    RoI order. Both directions are gathers of whole rows (autograd's backward of an indexing
    would be an accumulating scatter, several times slower for the same permutation), and a
    channels-last layout is kept (plain indexing returns a contiguous copy, which would put
    the heads back in NCHW)."""

    @staticmethod
    def forward(ctx, pooled: Tensor, order: Tensor) -> Tensor:  # type: ignore[override]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        ctx.save_for_backward(order)
        return _take_rows(pooled, inverse)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (order,) = ctx.saved_tensors
        return _take_rows(grad, order), None


def _take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` for ``(K, C, S, S)`` ``x``, channels-last in, channels-last out."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return x[index]
    return x.permute(0, 2, 3, 1)[index].permute(0, 3, 1, 2)


def build_roi_extractor(
    cfg: RoIExtractorChoice, in_specs: list[FeatureSpec], output_size: int
) -> SingleRoIExtractor | GenericRoIExtractor:
    """The extractor ``cfg`` describes over the neck levels ``in_specs``, pooling
    ``output_size`` x ``output_size``; its ``out_channels`` is the width its head takes."""
    return cfg.build(in_specs, output_size)
