"""The experiment schema: what a run is made of (model, data, training, evaluation).

The model is one of the detector configs of :data:`instseg.modeling.detectors.ModelChoice`,
tagged by ``kind``. Saved configs (``config.json``, checkpoint jsons) of the earlier
format are upgraded on load by :func:`instseg.configs.compat.upgrade_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..engine import TrainConfig
from ..modeling.detectors import ModelChoice, TwoStageConfig


@dataclass
class DataConfig:
    """Where the data is, how images are sized and normalised. Paths may also come from the
    CLI. ``pixel_mean``/``pixel_std`` are in the network's channel order: RGB, or BGR with
    ``bgr=True`` (detectron2/cvpods MSRA backbones: mean (103.53, 116.28, 123.675), std 1).

    ``train_scale_mode`` is mmdet 2.x's ``multiscale_mode``: "value" picks one of
    ``train_scales`` per image, "range" samples the long and the short edge as integers
    between those of two scales (one scale: that scale, as mmdet). ``repeat_threshold`` is
    mmdet's ``ClassBalancedDataset`` ``oversample_thr`` (LVIS: 1e-3): images with categories
    rarer than it are repeated in every epoch (:func:`instseg.data.loader.repeat_factors`); None
    trains on each image once per epoch. ``size_rounding`` "floor" sizes resized images as
    torchvision's detection transform does (mmdet: "round")."""

    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    train_scales: tuple[tuple[int, int], ...] = ((1333, 800),)
    test_scale: tuple[int, int] = (1333, 800)
    flip_prob: float = 0.5
    skip_empty: bool = True
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    bgr: bool = False
    train_scale_mode: Literal["value", "range"] = "value"
    repeat_threshold: float | None = None
    size_rounding: Literal["round", "floor"] = "round"

    def __post_init__(self) -> None:
        if not self.train_scales:
            raise ValueError("data.train_scales must not be empty")
        if self.train_scale_mode not in ("value", "range"):
            raise ValueError(
                "data.train_scale_mode must be one of ('value', 'range'), got "
                f"{self.train_scale_mode!r}"
            )
        if self.train_scale_mode == "range" and len(self.train_scales) > 2:
            raise ValueError(
                "data.train_scale_mode 'range' samples between two data.train_scales (the "
                f"smallest and largest edges), got {len(self.train_scales)} scales"
            )
        if self.size_rounding not in ("round", "floor"):
            raise ValueError(
                f"data.size_rounding must be one of ('round', 'floor'), got {self.size_rounding!r}"
            )
        threshold = self.repeat_threshold
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0 < threshold <= 1
        ):
            raise ValueError(f"data.repeat_threshold must be None or in (0, 1], got {threshold!r}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"data.flip_prob must be in [0, 1], got {self.flip_prob}")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ValueError(
                "data.pixel_mean and data.pixel_std must be 3 values each, the std positive; "
                f"got {self.pixel_mean}, {self.pixel_std}"
            )


@dataclass
class EvalConfig:
    """Evaluation after training and by ``instseg eval``. ``max_dets`` is the per-image
    detection cap (COCO ``maxDets``; the LVIS recipes use 300). ``cityscapes_gt_dir``, a
    gtFine split folder (``gtFine/val``), adds the official Cityscapes instance evaluation
    (cityscapesScripts: AP, AP50, per-class AP) of the predictions, as ``metrics["cityscapes"]``;
    the images must be Cityscapes images (``<city>_<seq>_<frame>_leftImg8bit.png``) and the
    model's categories Cityscapes label ids (``instseg cityscapes-to-coco`` writes both)."""

    max_dets: int = 100
    batch_size: int = 2
    cityscapes_gt_dir: str | None = None

    def __post_init__(self) -> None:
        if self.max_dets < 10:
            raise ValueError(f"eval.max_dets must be at least 10, got {self.max_dets}")


@dataclass
class ExperimentConfig:
    """Everything a run needs. ``num_classes=None`` takes the training set's categories."""

    name: str = "custom"
    description: str = ""
    num_classes: int | None = None
    model: ModelChoice = field(default_factory=TwoStageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_iters=1000))
    eval: EvalConfig = field(default_factory=EvalConfig)
