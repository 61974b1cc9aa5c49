"""COCO-format datasets, transforms and batching."""

from .coco import Category, CocoDataset, DataError, ImageRecord, decode_masks, load_json, read_image
from .loader import GroupedBatchSampler, build_loader, make_collate, pad_images
from .shapes import CATEGORIES as SHAPES_CATEGORIES
from .shapes import ShapesConfig, generate_shapes, make_demo_splits
from .transforms import DetectionTransform, TransformConfig, rescaled_size

__all__ = [
    "SHAPES_CATEGORIES",
    "Category",
    "CocoDataset",
    "DataError",
    "DetectionTransform",
    "GroupedBatchSampler",
    "ImageRecord",
    "ShapesConfig",
    "TransformConfig",
    "build_loader",
    "decode_masks",
    "generate_shapes",
    "load_json",
    "make_collate",
    "make_demo_splits",
    "pad_images",
    "read_image",
    "rescaled_size",
]
