"""Faster R-CNN and Mask R-CNN: backbone -> FPN -> RPN -> RoI heads -> post-process.

Mask R-CNN is Faster R-CNN with a mask head (``roi_head.mask_head``, None for Faster
R-CNN); RefineMask is Mask R-CNN with ``roi_head.mask_head=refinemask``, IFR with
``roi_head.mask_head=ifr``; GRoIE swaps the RoI extractors; Cascade R-CNN is
``roi_head=cascade``, Grid R-CNN ``roi_head=grid``. Batches hold images of different sizes
padded together (``ImageBatch``); every stage works on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from ...structures import ImageBatch, ImageInfo, Instances, InstanceTargets, TrainingContext
from ..backbone import ResNetConfig
from ..dense_heads import RPNConfig, RPNHead
from ..neck import FPNConfig
from ..roi import CascadeRoIHeadConfig, GridRoIHeadConfig, RoIHeadConfig
from .base import PyramidDetector


@dataclass
class TwoStageConfig:
    kind: Literal["two_stage"] = "two_stage"
    backbone: ResNetConfig = field(default_factory=ResNetConfig)
    neck: FPNConfig = field(default_factory=FPNConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_head: RoIHeadConfig | CascadeRoIHeadConfig | GridRoIHeadConfig = field(
        default_factory=RoIHeadConfig
    )

    @property
    def with_masks(self) -> bool:
        return self.roi_head.mask_head is not None

    def build(self, num_classes: int) -> TwoStageDetector:
        return TwoStageDetector(self, num_classes)

    def raise_detection_cap(self, max_dets: int) -> None:
        """At least ``max_dets`` detections and proposals per image."""
        self.roi_head.max_per_image = max(self.roi_head.max_per_image, max_dets)
        self.rpn.test_max_per_image = max(self.rpn.test_max_per_image, max_dets)
        self.rpn.test_nms_pre = max(self.rpn.test_nms_pre, max_dets)


class TwoStageDetector(PyramidDetector):
    def __init__(self, cfg: TwoStageConfig, num_classes: int) -> None:
        super().__init__(cfg.backbone, cfg.neck)
        self.cfg = cfg
        self.num_classes = num_classes
        self.rpn_head = RPNHead(cfg.rpn, self.feature_specs)
        self.roi_head = cfg.roi_head.build(self.feature_specs, num_classes)
        self.with_masks = self.roi_head.with_mask

    def forward(
        self,
        images: ImageBatch,
        targets: list[InstanceTargets],
        context: TrainingContext | None = None,
    ) -> dict[str, Tensor]:
        """Training losses for a batch; ``context`` reaches the RoI head's mask head (IFR's
        phase switch)."""
        feats = self.features(images)
        losses, proposals = self.rpn_head.loss_and_proposals(
            feats, images.image_sizes, targets, images.input_size
        )
        losses.update(self.roi_head.loss(feats, proposals, targets, images.image_sizes, context))
        return losses

    def predict(self, images: ImageBatch, infos: list[ImageInfo] | None = None) -> list[Instances]:
        """Detections per image (original image coordinates when ``infos`` is given)."""
        feats = self.features(images)
        proposals = self.rpn_head.predict(feats, images.image_sizes, images.input_size)
        return self.roi_head.predict(feats, proposals, images.image_sizes, infos)
