"""COCO-format datasets, transforms and batching."""

from .coco import Category, CocoDataset, DataError, ImageRecord, decode_masks, load_json, read_image
from .loader import GroupedBatchSampler, build_loader, make_collate, pad_images
from .transforms import DetectionTransform, TransformConfig, rescaled_size

__all__ = [
    "Category",
    "CocoDataset",
    "DataError",
    "DetectionTransform",
    "GroupedBatchSampler",
    "ImageRecord",
    "TransformConfig",
    "build_loader",
    "decode_masks",
    "load_json",
    "make_collate",
    "pad_images",
    "read_image",
    "rescaled_size",
]
