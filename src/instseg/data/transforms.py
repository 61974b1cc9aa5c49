"""Image and target transforms (mmdet semantics), deterministic given a generator.

Training: keep-ratio resize to a scale chosen per image from ``scales`` (single- or
multi-scale: one of the scales, or with ``scale_mode="range"`` edges sampled between two),
horizontal flip with probability ``flip_prob``, normalisation. Testing: the first scale, no
flip. Padding to a multiple of ``size_divisor`` happens when batching
(:func:`instseg.data.loader.collate`), after normalisation, so padding is zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..structures import ImageInfo, InstanceTargets
from .coco import ImageRecord, decode_masks

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass
class TransformConfig:
    """``scales`` are ``(long_edge, short_edge)`` limits; training picks one per image
    (``scale_mode="value"``) or samples one between two of them (``"range"``, see
    :func:`sample_range_scale`). ``mean``/``std`` normalise the channels in the network's
    order: RGB, or BGR with ``bgr`` (detectron2's MSRA backbones: BGR mean, std 1)."""

    scales: tuple[tuple[int, int], ...] = ((1333, 800),)
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size_divisor: int = 32
    bgr: bool = False
    scale_mode: Literal["value", "range"] = "value"
    size_rounding: Literal["round", "floor"] = "round"

    def __post_init__(self) -> None:
        if self.size_rounding not in ("round", "floor"):
            raise ValueError(
                f"size_rounding must be one of ('round', 'floor'), got {self.size_rounding!r}"
            )
        self.scales = tuple(tuple(int(v) for v in s) for s in self.scales)  # type: ignore[assignment]
        if not self.scales or any(len(s) != 2 or min(s) <= 0 for s in self.scales):
            raise ValueError(f"scales must be (long, short) pairs of positive ints: {self.scales}")
        if self.scale_mode not in ("value", "range"):
            raise ValueError(
                f"scale_mode must be one of ('value', 'range'), got {self.scale_mode!r}"
            )
        if self.scale_mode == "range" and len(self.scales) > 2:
            raise ValueError(
                f"scale_mode 'range' samples between two scales, got {len(self.scales)}"
            )
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std must be 3 values, std positive")
        if self.size_divisor <= 0:
            raise ValueError(f"size_divisor must be positive, got {self.size_divisor}")


def rescaled_size(
    height: int, width: int, scale: tuple[int, int], rounding: str = "round"
) -> tuple[int, int]:
    """Keep-ratio size fitting ``scale = (long, short)``: mmcv's ``rescale_size`` (sides
    rounded), or with ``rounding="floor"`` torchvision's ``GeneralizedRCNNTransform``
    (``F.interpolate(scale_factor=...)`` floors them)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    if rounding == "floor":
        return math.floor(height * factor), math.floor(width * factor)
    return int(height * factor + 0.5), int(width * factor + 0.5)


def sample_range_scale(
    scales: tuple[tuple[int, int], ...], rng: torch.Generator
) -> tuple[int, int]:
    """mmdet 2.x ``Resize.random_sample`` (``multiscale_mode="range"``): the long edge is an
    integer drawn uniformly from [min, max] of the scales' long edges (both ends included),
    then the short edge likewise from their short edges; returns ``(long, short)``."""
    if len(scales) != 2:
        raise ValueError(f"a scale range needs two scales, got {scales}")
    longs, shorts = [max(s) for s in scales], [min(s) for s in scales]
    long_edge = int(torch.randint(min(longs), max(longs) + 1, (1,), generator=rng))
    short_edge = int(torch.randint(min(shorts), max(shorts) + 1, (1,), generator=rng))
    return long_edge, short_edge


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of a ``(3, H, W)`` float image (half-pixel centres, no antialias)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


class DetectionTransform:
    """Turns a decoded image and its record into ``(image, targets, info)``."""

    def __init__(self, cfg: TransformConfig, train: bool) -> None:
        self.cfg = cfg
        self.train = train
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std).view(3, 1, 1)

    def prepare_image(
        self, image: np.ndarray, image_id: int = 0, file_name: str = ""
    ) -> tuple[Tensor, ImageInfo]:
        """An image without annotations (e.g. for prediction) through the test-time path."""
        height, width = image.shape[:2]
        new_h, new_w = rescaled_size(height, width, self.cfg.scales[0], self.cfg.size_rounding)
        tensor = self._image_tensor(image, (new_h, new_w), flip=False)
        info = ImageInfo(
            image_id, file_name, (height, width), (new_h, new_w), (new_h / height, new_w / width)
        )
        return tensor, info

    def _image_tensor(self, image: np.ndarray, size: tuple[int, int], flip: bool) -> Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        if self.cfg.bgr:
            tensor = tensor.flip(0)
        tensor = resize_image(tensor, size)
        if flip:
            tensor = tensor.flip(-1)
        return (tensor - self.mean) / self.std

    def __call__(
        self,
        image: np.ndarray,
        record: ImageRecord,
        labels: np.ndarray,
        with_masks: bool,
        rng: torch.Generator,
    ) -> tuple[Tensor, InstanceTargets, ImageInfo]:
        """Resize (and, when training, flip) ``image`` and the record's targets.

        ``labels`` are the record's contiguous class indices (one per box) and ``with_masks``
        says whether to rasterise its segmentations: plain values, so that the transform
        never reaches back into the dataset. ``rng`` draws the scale (an index among several
        scales, or the long then the short edge of a range), then the flip (training only:
        the test path draws nothing).
        """
        if len(labels) != len(record.boxes):
            raise ValueError(
                f"image {record.image_id}: {len(labels)} labels for {len(record.boxes)} boxes"
            )
        height, width = record.height, record.width
        scales = self.cfg.scales
        if self.train and len(scales) > 1 and self.cfg.scale_mode == "range":
            scale = sample_range_scale(scales, rng)
        elif self.train and len(scales) > 1:
            scale = scales[int(torch.randint(len(scales), (1,), generator=rng))]
        else:
            scale = scales[0]
        new_h, new_w = rescaled_size(height, width, scale, self.cfg.size_rounding)
        flip = self.train and float(torch.rand((), generator=rng)) < self.cfg.flip_prob
        sy, sx = new_h / height, new_w / width

        tensor = self._image_tensor(image, (new_h, new_w), flip)
        scale = torch.tensor([sx, sy, sx, sy])
        boxes = torch.from_numpy(record.boxes) * scale
        ignore = torch.from_numpy(record.crowd_boxes) * scale
        masks = None
        if with_masks:
            masks = decode_masks(record.segmentations, height, width, (new_h, new_w))
        if flip:
            boxes = torch.stack(
                [new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], 1
            )
            ignore = torch.stack(
                [new_w - ignore[:, 2], ignore[:, 1], new_w - ignore[:, 0], ignore[:, 3]], 1
            )
            if masks is not None:
                masks = masks.flip(-1)
        limits = torch.tensor([new_w, new_h, new_w, new_h], dtype=boxes.dtype)
        boxes = torch.minimum(boxes.clamp(min=0), limits)
        targets = InstanceTargets(
            boxes=boxes.float(),
            labels=torch.from_numpy(labels),
            masks=masks,
            ignore_boxes=ignore.float(),
        )
        info = ImageInfo(
            image_id=record.image_id,
            file_name=record.file_name,
            original_size=(height, width),
            image_size=(new_h, new_w),
            scale=(sy, sx),
            flipped=flip,
        )
        return tensor, targets, info
