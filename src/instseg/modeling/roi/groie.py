"""GRoIE, the generic RoI extractor (Rossi, Karimi, Prati, ICPR 2020; spec §2).

Where the single-level extractor pools each RoI from the one FPN level its size selects,
GRoIE pools every RoI from every level, passes each level's features through one shared
pre-processing module, aggregates the levels (sum, or concat along channels), and applies
a post-processing module (attention) to the result. No level mapping is used at all.

The official configs (spec §2.3), used by every GRoIE config of the zoo: RoIAlign with
``sampling_ratio=2`` on P2-P5, pre-module a 5x5 conv + bias + ReLU (no norm), sum, and a
GeneralizedAttention post-module (6 heads, type '0100', kv_stride 2) with mmcv's
transposed-query quirk. Faithful to mmdet: with a single feature level the RoIs are only
pooled (no pre/post module), and in concat mode the channel slots are counted before the
pre-module, which must therefore keep the width. Submodules are named ``pre_module`` and
``post_module`` as in mmdet, so checkpoints map key for key. The extractor does not know
which head it feeds: the box, mask and (later) grid branches each build their own, with
their own weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ...layers import (
    ConvModuleConfig,
    GeneralizedAttentionConfig,
    NonLocalConfig,
)
from ..features import Features, FeatureSpec
from .pooling import LevelPooler, RoIPoolingConfig, rescale_rois

AGGREGATIONS = ("sum", "concat")
PRE_MODULES = ("conv", "none")
POST_MODULES = ("attention", "non_local", "none")


def _groie_attention() -> GeneralizedAttentionConfig:
    return GeneralizedAttentionConfig(
        num_heads=6,
        spatial_range=-1,
        attention_type="0100",
        kv_stride=2,
        mmcv_transposed_query=True,
    )


@dataclass
class GRoIEConfig(RoIPoolingConfig):
    """The GRoIE extractor (``kind="generic"``); defaults are the official configs'
    (RoIAlign with ``sampling_ratio=2`` on P2-P5).

    ``pre`` picks the shared per-level module (``pre_conv`` settings) and ``post`` the
    module after aggregation (``attention`` or ``non_local`` settings); "none" skips it.
    """

    kind: Literal["generic"] = "generic"
    sampling_ratio: int = 2
    aggregation: str = "sum"
    pre: str = "conv"
    pre_conv: ConvModuleConfig = field(
        default_factory=lambda: ConvModuleConfig(kernel_size=5, padding=2, inplace=False)
    )
    post: str = "attention"
    attention: GeneralizedAttentionConfig = field(default_factory=_groie_attention)
    non_local: NonLocalConfig = field(default_factory=NonLocalConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"groie.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}"
            )
        if self.pre not in PRE_MODULES:
            raise ValueError(f"groie.pre must be one of {PRE_MODULES}, got {self.pre!r}")
        if self.post not in POST_MODULES:
            raise ValueError(f"groie.post must be one of {POST_MODULES}, got {self.post!r}")

    def build(self, in_specs: list[FeatureSpec], output_size: int) -> GenericRoIExtractor:
        return GenericRoIExtractor(self, in_specs, output_size)


class GenericRoIExtractor(nn.Module):
    """``forward(feats, rois) -> (K, out_channels, S, S)`` pooled from every level.

    ``out_channels`` is the width of the output: the pre-module's width for sum,
    ``levels * width of the levels`` for concat.
    """

    def __init__(self, cfg: GRoIEConfig, in_specs: list[FeatureSpec], output_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.pooler = LevelPooler(cfg, in_specs, output_size)
        self.output_size = output_size
        in_channels = self.pooler.in_channels
        self.num_levels = len(self.pooler.levels)
        self.pre_module: nn.Module | None = None
        width = in_channels
        if cfg.pre == "conv":
            self.pre_module = cfg.pre_conv.build(in_channels)
            width = self.pre_module.conv.out_channels
        if cfg.aggregation == "concat":
            if width != in_channels:
                raise ValueError(
                    "GRoIE aggregation='concat' counts channels before the pre-module, so "
                    f"pre_conv.out_channels must keep the width {in_channels}, got {width}"
                )
            width = in_channels * self.num_levels
        # One level is only pooled (see forward), so its width is the input's.
        self.out_channels = width if self.num_levels > 1 else in_channels
        self.post_module: nn.Module | None = None
        if cfg.post == "attention":
            self.post_module = cfg.attention.build(width)
        elif cfg.post == "non_local":
            self.post_module = cfg.non_local.build(width)

    def forward(
        self, feats: Features, rois: Tensor, roi_scale_factor: float | None = None
    ) -> Tensor:
        cfg, pooler = self.cfg, self.pooler
        size = self.output_size
        maps = pooler.maps(feats)
        if rois.shape[0] == 0:
            return maps[0].new_zeros((0, self.out_channels, size, size))
        if len(maps) == 1:
            # mmdet: a single level is only pooled, without the pre and post modules.
            return pooler.pool(maps[0], rois, pooler.strides[0])
        if roi_scale_factor is not None:
            rois = rescale_rois(rois, roi_scale_factor)
        pooled = torch.stack(
            [
                pooler.pool(feat, rois, stride)
                for feat, stride in zip(maps, pooler.strides, strict=True)
            ]
        )  # (L, K, C, S, S)
        levels, k = pooled.shape[:2]
        if self.pre_module is not None:
            # One call over all levels: the same weights apply to each.
            pooled = self.pre_module(pooled.flatten(0, 1)).unflatten(0, (levels, k))
        if cfg.aggregation == "sum":
            out = pooled.sum(dim=0)
        else:
            out = pooled.transpose(0, 1).flatten(1, 2)  # (K, L * C, S, S), level-major
        if self.post_module is not None:
            out = self.post_module(out)
        return out
