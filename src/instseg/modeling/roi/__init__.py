"""RoI feature extraction (single-level and GRoIE), sampling, the R-CNN heads (box; mask:
FCN, RefineMask, IFR) and the RoI heads that drive them (single-stage, cascade, Grid R-CNN)."""

from .cascade import CascadeRoIHead, CascadeRoIHeadConfig
from .extractor import (
    RoIExtractorChoice,
    RoIExtractorConfig,
    SingleRoIExtractor,
    build_roi_extractor,
    map_roi_levels,
)
from .grid import GridHead, GridHeadConfig, GridRoIHead, GridRoIHeadConfig
from .groie import GenericRoIExtractor, GRoIEConfig
from .heads import (
    BoxHeadConfig,
    FCNMaskHead,
    FCNMaskHeadConfig,
    Shared2FCBoxHead,
    select_class,
)
from .ifr import IFRMaskHead, IFRMaskHeadConfig
from .mask_branch import MaskHead, MaskHeadConfig, crop_mask_targets
from .pooling import RoIPoolingConfig, pool_level, rescale_rois
from .refinemask import REFINEMASK_VARIANTS, RefineMaskHead, RefineMaskHeadConfig
from .sampling import SampledRoIs, boxes_to_rois, label_rois, sample_rois
from .standard import MaskHeadChoice, RoIHeadConfig, StandardRoIHead

__all__ = [
    "REFINEMASK_VARIANTS",
    "BoxHeadConfig",
    "CascadeRoIHead",
    "CascadeRoIHeadConfig",
    "FCNMaskHead",
    "FCNMaskHeadConfig",
    "GRoIEConfig",
    "GenericRoIExtractor",
    "GridHead",
    "GridHeadConfig",
    "GridRoIHead",
    "GridRoIHeadConfig",
    "IFRMaskHead",
    "IFRMaskHeadConfig",
    "MaskHead",
    "MaskHeadChoice",
    "MaskHeadConfig",
    "RefineMaskHead",
    "RefineMaskHeadConfig",
    "RoIExtractorChoice",
    "RoIExtractorConfig",
    "RoIHeadConfig",
    "RoIPoolingConfig",
    "SampledRoIs",
    "Shared2FCBoxHead",
    "SingleRoIExtractor",
    "StandardRoIHead",
    "boxes_to_rois",
    "build_roi_extractor",
    "crop_mask_targets",
    "label_rois",
    "map_roi_levels",
    "pool_level",
    "rescale_rois",
    "sample_rois",
    "select_class",
]
