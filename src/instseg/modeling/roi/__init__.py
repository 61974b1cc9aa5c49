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
from .standard import RoIHeadConfig, StandardRoIHead

__all__ = [
    "EXTRACTOR_KINDS",
    "BoxHeadConfig",
    "FCNMaskHead",
    "GRoIEConfig",
    "GenericRoIExtractor",
    "MaskHeadConfig",
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
