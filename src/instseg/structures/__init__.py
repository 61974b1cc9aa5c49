"""The few containers that flow between stages.

``ImageBatch`` + one ``InstanceTargets`` per image go into a detector during training; one
``Instances`` per image comes out of it at inference. ``ImageInfo`` carries what is needed to
map predictions back to the original image and dataset ids. ``TrainingContext`` tells a model
in training where the run stands (for losses or solvers that change over the schedule).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class ImageBatch:
    """Normalised images padded to a common size (a multiple of the size divisor).

    ``tensor`` is ``(B, 3, H, W)`` float; ``image_sizes[i] = (h, w)`` is the extent of image i
    inside the padding (after resizing).
    """

    tensor: Tensor
    image_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return self.tensor.shape[0]

    @property
    def input_size(self) -> tuple[int, int]:
        """The padded ``(H, W)`` every image of the batch shares."""
        return (int(self.tensor.shape[-2]), int(self.tensor.shape[-1]))

    def to(self, device: torch.device | str) -> ImageBatch:
        return ImageBatch(self.tensor.to(device, non_blocking=True), list(self.image_sizes))


@dataclass
class ImageInfo:
    """Where an image came from and how it was transformed.

    ``scale = (sy, sx)`` maps original pixel coordinates to the resized image:
    ``x_resized = x_original * sx``; ``flipped`` means a horizontal flip after resizing.
    """

    image_id: int
    file_name: str
    original_size: tuple[int, int]
    image_size: tuple[int, int]
    scale: tuple[float, float] = (1.0, 1.0)
    flipped: bool = False


@dataclass
class InstanceTargets:
    """Ground truth of one image, in the resized (and possibly flipped) image frame.

    ``labels`` are contiguous class indices ``0..num_classes-1``; ``masks`` is ``(N, h, w)``
    bool at the image size (not padded) or None for box-only data; ``ignore_boxes`` are the
    crowd regions (``iscrowd: 1``), never training targets. ``seed`` (set by the trainer,
    the image's sample seed) seeds the random choices a model makes for this image
    (:meth:`generator`), so they do not depend on which process holds the image.
    """

    boxes: Tensor
    labels: Tensor
    masks: Tensor | None = None
    ignore_boxes: Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    seed: int | None = None

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def to(self, device: torch.device | str) -> InstanceTargets:
        return InstanceTargets(
            self.boxes.to(device),
            self.labels.to(device),
            None if self.masks is None else self.masks.to(device),
            self.ignore_boxes.to(device),
            self.seed,
        )

    def generator(self, purpose: str) -> torch.Generator | None:
        """A CPU generator for one random choice on this image, seeded from ``seed`` and
        ``purpose`` (distinct choices draw distinct streams); None without a seed (the
        caller then draws from the global RNG)."""
        return None if self.seed is None else seeded_generator(self.seed, purpose)


@dataclass
class Instances:
    """Predictions for one image: ``boxes (N, 4)`` xyxy, ``scores (N,)``, ``labels (N,)``
    contiguous class indices, and optionally ``masks (N, H, W)`` bool, all in one frame (the
    original image after post-processing)."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor | None = None

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def __getitem__(self, index: Tensor | slice) -> Instances:
        return Instances(
            self.boxes[index],
            self.scores[index],
            self.labels[index],
            None if self.masks is None else self.masks[index],
        )

    def to(self, device: torch.device | str) -> Instances:
        return replace(
            self,
            boxes=self.boxes.to(device),
            scores=self.scores.to(device),
            labels=self.labels.to(device),
            masks=None if self.masks is None else self.masks.to(device),
        )


@dataclass(frozen=True)
class TrainingContext:
    """Where a training run stands when a step is taken.

    ``iteration`` is the number of iterations completed before this step (0 on the first,
    the value the learning-rate schedule sees); ``max_iters`` is the length of the run.
    ``batch_seed`` (every process of a data-parallel run has the same) seeds the random
    choices made over the whole batch (:meth:`generator`).
    """

    iteration: int
    max_iters: int
    batch_seed: int | None = None

    def generator(self, purpose: str) -> torch.Generator | None:
        """A CPU generator for one random choice over the batch (None without a seed)."""
        return None if self.batch_seed is None else seeded_generator(self.batch_seed, purpose)


def seeded_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and the name of what it draws for."""
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + zlib.crc32(purpose.encode())) % 2**63
    return torch.Generator().manual_seed(mixed)


__all__ = [
    "ImageBatch",
    "ImageInfo",
    "InstanceTargets",
    "Instances",
    "TrainingContext",
    "seeded_generator",
]
