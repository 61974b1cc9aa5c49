"""RoI feature extraction and the R-CNN heads."""

from .extractor import RoIExtractorConfig, SingleRoIExtractor, map_roi_levels
from .heads import BoxHeadConfig, FCNMaskHead, MaskHeadConfig, Shared2FCBoxHead
from .standard import RoIHeadConfig, StandardRoIHead

__all__ = [
    "BoxHeadConfig",
    "FCNMaskHead",
    "MaskHeadConfig",
    "RoIExtractorConfig",
    "RoIHeadConfig",
    "Shared2FCBoxHead",
    "SingleRoIExtractor",
    "StandardRoIHead",
    "map_roi_levels",
]
