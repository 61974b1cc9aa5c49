"""RoI feature extraction (single-level and GRoIE) and the R-CNN heads."""

from .extractor import (
    EXTRACTOR_KINDS,
    RoIExtractorConfig,
    SingleRoIExtractor,
    build_roi_extractor,
    map_roi_levels,
)
from .groie import GenericRoIExtractor, GRoIEConfig
from .heads import BoxHeadConfig, FCNMaskHead, MaskHeadConfig, Shared2FCBoxHead
from .pooling import pool_level, rescale_rois
from .refine_roi_head import RefineRoIHead
from .refinemask import REFINEMASK_VARIANTS, RefineMaskHead, RefineMaskHeadConfig
from .standard import MASK_HEAD_KINDS, RoIHeadConfig, StandardRoIHead

__all__ = [
    "EXTRACTOR_KINDS",
    "MASK_HEAD_KINDS",
    "REFINEMASK_VARIANTS",
    "BoxHeadConfig",
    "FCNMaskHead",
    "GRoIEConfig",
    "GenericRoIExtractor",
    "MaskHeadConfig",
    "RefineMaskHead",
    "RefineMaskHeadConfig",
    "RefineRoIHead",
    "RoIExtractorConfig",
    "RoIHeadConfig",
    "Shared2FCBoxHead",
    "SingleRoIExtractor",
    "StandardRoIHead",
    "build_roi_extractor",
    "map_roi_levels",
    "pool_level",
    "rescale_rois",
]
