"""One-stage detectors: backbone -> FPN -> dense head (FCOS) [-> CondInst mask head].

FCOS is this detector with ``mask_head=None``; CondInst adds the dynamic mask head, whose
parameters the box head predicts (its controller width comes from the mask head's config, so
``--set model.mask_head=none`` / ``=condinst`` switches between the two).
Batches are padded images (``ImageBatch``); the heads work on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from torch import Tensor

from ...structures import ImageBatch, ImageInfo, Instances, InstanceTargets, TrainingContext
from ..backbone import ResNetConfig
from ..condinst import CondInstMaskHead, CondInstMaskHeadConfig
from ..dense_heads.fcos import FCOSHead, FCOSHeadConfig
from ..neck import FPNConfig
from ..postprocess import rescale_to_original
from .base import PyramidDetector


def _fcos_neck() -> FPNConfig:
    return FPNConfig(start_level=1, add_extra_convs="on_output", relu_before_extra_convs=True)


@dataclass
class OneStageConfig:
    kind: Literal["one_stage"] = "one_stage"
    backbone: ResNetConfig = field(default_factory=ResNetConfig)
    neck: FPNConfig = field(default_factory=_fcos_neck)
    bbox_head: FCOSHeadConfig = field(default_factory=FCOSHeadConfig)
    mask_head: CondInstMaskHeadConfig | None = None

    @property
    def with_masks(self) -> bool:
        return self.mask_head is not None

    def build(self, num_classes: int) -> OneStageDetector:
        return OneStageDetector(self, num_classes)

    def raise_detection_cap(self, max_dets: int) -> None:
        """At least ``max_dets`` detections per image (and candidates before NMS)."""
        self.bbox_head.max_per_image = max(self.bbox_head.max_per_image, max_dets)
        self.bbox_head.nms_pre = max(self.bbox_head.nms_pre, max_dets)


class OneStageDetector(PyramidDetector):
    def __init__(self, cfg: OneStageConfig, num_classes: int) -> None:
        super().__init__(cfg.backbone, cfg.neck)
        self.cfg = cfg
        self.num_classes = num_classes
        # The controller is as wide as the mask head's dynamic network needs (none for FCOS).
        num_params = 0 if cfg.mask_head is None else cfg.mask_head.num_params
        self.bbox_head = FCOSHead(cfg.bbox_head, self.feature_specs, num_classes, num_params)
        self.mask_head = (
            None if cfg.mask_head is None else CondInstMaskHead(cfg.mask_head, self.feature_specs)
        )
        self.with_masks = self.mask_head is not None

    def forward(
        self,
        images: ImageBatch,
        targets: list[InstanceTargets],
        context: TrainingContext | None = None,
    ) -> dict[str, Tensor]:
        """Training losses for a batch (``context`` is not used by this detector)."""
        feats = self.features(images)
        # GT masks at the batch shape, once for both heads (mmdet's pad_mask): CondInst samples
        # them on the padded grid and takes the FCOS sampling centres from them.
        targets = _pad_masks(targets, tuple(images.tensor.shape[-2:]))
        losses, positives = self.bbox_head.loss(self.bbox_head(feats), targets)
        if self.mask_head is not None:
            losses.update(self.mask_head.loss(feats, positives, targets))
        return losses

    def predict(self, images: ImageBatch, infos: list[ImageInfo] | None = None) -> list[Instances]:
        """Detections per image (original image coordinates when ``infos`` is given)."""
        feats = self.features(images)
        detections = self.bbox_head.predict(self.bbox_head(feats), images.image_sizes)
        results = [Instances(d.boxes, d.scores, d.labels) for d in detections]
        out_sizes = images.image_sizes if infos is None else [i.original_size for i in infos]
        if self.mask_head is not None:
            masks = self.mask_head.predict(feats, detections, images.image_sizes, out_sizes)
            for result, m in zip(results, masks, strict=True):
                result.masks = m
        if infos is not None:
            rescale_to_original(results, infos)
        return results


def _pad_masks(targets: list[InstanceTargets], size: tuple[int, int]) -> list[InstanceTargets]:
    """The targets with their ``(G, h, w)`` masks zero-padded at the bottom and right to
    ``size`` (box-only targets and masks already of that size as they are)."""
    padded = []
    for target in targets:
        masks = target.masks
        if masks is not None and tuple(masks.shape[-2:]) != tuple(size):
            out = masks.new_zeros((masks.shape[0], *size))
            out[:, : masks.shape[-2], : masks.shape[-1]] = masks
            target = replace(target, masks=out)
        padded.append(target)
    return padded
