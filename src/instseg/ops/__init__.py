"""Tensor operators with autograd, pure PyTorch, CPU and CUDA.

``roi_align``, ``roi_pool``, ``nms``, ``batched_nms`` and the box helpers follow
``torchvision.ops`` signatures and numbers; ``prroi_pool2d`` / ``PrRoIPool2D`` follow the
official Precise RoI Pooling API.
"""

from .boxes import (
    box_area,
    box_convert,
    box_iou,
    clip_boxes_to_image,
    decode_deltas,
    encode_deltas,
    remove_small_boxes,
)
from .masks import paste_masks_in_image
from .nms import batched_nms, nms
from .prroi_pool import PrRoIPool2D, prroi_pool2d
from .roi_align import RoIAlign, roi_align
from .roi_pool import RoIPool, roi_pool

__all__ = [
    "PrRoIPool2D",
    "RoIAlign",
    "RoIPool",
    "batched_nms",
    "box_area",
    "box_convert",
    "box_iou",
    "clip_boxes_to_image",
    "decode_deltas",
    "encode_deltas",
    "nms",
    "paste_masks_in_image",
    "prroi_pool2d",
    "remove_small_boxes",
    "roi_align",
    "roi_pool",
]
