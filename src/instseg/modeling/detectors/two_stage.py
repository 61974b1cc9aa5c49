"""Faster R-CNN and Mask R-CNN: backbone -> FPN -> RPN -> RoI heads -> post-process.

Mask R-CNN is Faster R-CNN with ``roi_head.with_mask = True``; RefineMask is Mask R-CNN with
``roi_head.mask_head_kind = "refinemask"``. Batches hold images of
different sizes padded together (``ImageBatch``); every stage works on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ...structures import ImageBatch, ImageInfo, Instances, InstanceTargets
from ..backbone import ResNet, ResNetConfig
from ..dense_heads import RPNConfig, RPNHead
from ..neck import FPN, FPNConfig
from ..roi import RefineRoIHead, RoIHeadConfig, StandardRoIHead


@dataclass
class TwoStageConfig:
    backbone: ResNetConfig = field(default_factory=ResNetConfig)
    neck: FPNConfig = field(default_factory=FPNConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_head: RoIHeadConfig = field(default_factory=RoIHeadConfig)


class TwoStageDetector(nn.Module):
    def __init__(self, cfg: TwoStageConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNet(cfg.backbone)
        self.neck = FPN(list(self.backbone.out_channels), cfg.neck)
        self.rpn_head = RPNHead(cfg.rpn)
        head = RefineRoIHead if cfg.roi_head.mask_head_kind == "refinemask" else StandardRoIHead
        self.roi_head = head(cfg.roi_head, cfg.neck.out_channels)

    def features(self, images: ImageBatch) -> list[Tensor]:
        return self.neck(self.backbone(images.tensor))

    def forward(
        self, images: ImageBatch, targets: list[InstanceTargets], context: object = None
    ) -> dict[str, Tensor]:
        """Training losses for a batch (``context``: the trainer's iteration, unused here)."""
        feats = self.features(images)
        logits, deltas = self.rpn_head(feats)
        sizes = [tuple(f.shape[-2:]) for f in feats]
        losses = self.rpn_head.loss(logits, deltas, sizes, images.image_sizes, targets)
        proposals = self.rpn_head.proposals(logits, deltas, sizes, images.image_sizes)
        losses.update(self.roi_head.loss(feats, proposals, targets))
        return losses

    def predict(self, images: ImageBatch, infos: list[ImageInfo] | None = None) -> list[Instances]:
        """Detections per image (original image coordinates when ``infos`` is given)."""
        feats = self.features(images)
        logits, deltas = self.rpn_head(feats)
        sizes = [tuple(f.shape[-2:]) for f in feats]
        proposals = self.rpn_head.proposals(logits, deltas, sizes, images.image_sizes)
        return self.roi_head.predict(feats, proposals, images.image_sizes, infos)
