"""The Mask R-CNN RoI head (mmdet ``StandardRoIHead``), composed of parts.

Training: :func:`.sampling.sample_rois` (GT boxes join the proposals, MaxIoU 0.5 / 0.5,
512 random samples at 25% positive), then the box branch (extractor -> box head, whose loss
is softmax cross-entropy and L1 on normalised deltas) and, when the config has a mask head,
the mask branch (its extractor -> any :class:`.mask_branch.MaskHead`: FCN, RefineMask).

Inference: softmax scores, boxes decoded by the box head and clipped to the image,
per-class NMS over the candidates above ``score_thr``, the best ``max_per_image``; the mask
head's probabilities for the kept boxes are pasted into the original image (spec §1.4).
A cascade RoI head drives the same parts stage by stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...structures import ImageInfo, Instances, InstanceTargets
from ..anchors import AssignerConfig, SamplerConfig
from ..features import Features, FeatureSpec
from ..postprocess import multiclass_nms, paste_masks, rescale_to_original
from .extractor import RoIExtractorChoice, RoIExtractorConfig, build_roi_extractor
from .heads import BoxHeadConfig, FCNMaskHeadConfig, Shared2FCBoxHead
from .refinemask import RefineMaskHeadConfig
from .sampling import boxes_to_rois, sample_rois

MaskHeadChoice = FCNMaskHeadConfig | RefineMaskHeadConfig
"""A mask head config: ``kind`` "fcn" (Mask R-CNN) or "refinemask" (spec §3)."""


@dataclass
class RoIHeadConfig:
    """The single-stage RoI head (``kind="standard"``): box branch, optional mask branch
    (``mask_head=None``: Faster R-CNN), sampling, and the test-time settings. Each branch's
    extractor pools at the size its head asks for."""

    kind: Literal["standard"] = "standard"
    box_extractor: RoIExtractorChoice = field(default_factory=RoIExtractorConfig)
    box_head: BoxHeadConfig = field(default_factory=BoxHeadConfig)
    mask_extractor: RoIExtractorChoice = field(default_factory=RoIExtractorConfig)
    mask_head: MaskHeadChoice | None = field(default_factory=FCNMaskHeadConfig)
    assigner: AssignerConfig = field(default_factory=AssignerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    score_thr: float = 0.05
    nms_iou: float = 0.5
    max_per_image: int = 100
    mask_thr: float = 0.5

    def __post_init__(self) -> None:
        if self.max_per_image <= 0:
            raise ValueError(f"roi_head.max_per_image must be positive, got {self.max_per_image}")

    def build(self, in_specs: list[FeatureSpec], num_classes: int) -> StandardRoIHead:
        return StandardRoIHead(self, in_specs, num_classes)


class StandardRoIHead(nn.Module):
    """Box (and mask) branch over the neck levels ``in_specs``; each branch has its own RoI
    extractor (single-level or GRoIE, with its own weights)."""

    def __init__(self, cfg: RoIHeadConfig, in_specs: list[FeatureSpec], num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.with_mask = cfg.mask_head is not None
        self.bbox_roi_extractor = build_roi_extractor(
            cfg.box_extractor, in_specs, cfg.box_head.roi_size
        )
        self.bbox_head = Shared2FCBoxHead(
            cfg.box_head, self.bbox_roi_extractor.out_channels, num_classes
        )
        if cfg.mask_head is not None:
            self.mask_roi_extractor = build_roi_extractor(
                cfg.mask_extractor, in_specs, cfg.mask_head.roi_size
            )
            self.mask_head = cfg.mask_head.build(
                self.mask_roi_extractor.out_channels, in_specs, num_classes
            )

    def loss(
        self, feats: Features, proposals: list[Tensor], targets: list[InstanceTargets]
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        sampled = sample_rois(proposals, targets, cfg.assigner, cfg.sampler, self.num_classes)
        cls_score, bbox_pred = self.bbox_head(self.bbox_roi_extractor(feats, sampled.rois))
        losses = self.bbox_head.loss(cls_score, bbox_pred, sampled)
        if self.with_mask:
            losses.update(self.mask_head.loss(feats, self.mask_roi_extractor, sampled, targets))
        return losses

    @torch.no_grad()
    def predict(
        self,
        feats: Features,
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        infos: list[ImageInfo] | None = None,
    ) -> list[Instances]:
        """Detections per image, in original image coordinates when ``infos`` is given (else
        in the network input frame)."""
        cfg = self.cfg
        rois = boxes_to_rois(proposals)
        cls_score, bbox_pred = self.bbox_head(self.bbox_roi_extractor(feats, rois))
        scores_all = F.softmax(cls_score, dim=1)[:, : self.num_classes]
        counts = [p.shape[0] for p in proposals]
        results = [
            multiclass_nms(
                self.bbox_head.decode(props, deltas, image_sizes[i]),
                scores,
                cfg.score_thr,
                cfg.nms_iou,
                cfg.max_per_image,
            )
            for i, (props, scores, deltas) in enumerate(
                zip(proposals, scores_all.split(counts), bbox_pred.split(counts), strict=True)
            )
        ]
        # Mask RoIs live in the network input frame: take the boxes before rescaling them.
        input_boxes = [r.boxes for r in results]
        if infos is not None:
            rescale_to_original(results, infos)
        if self.with_mask:
            self._predict_masks(feats, results, input_boxes, image_sizes, infos)
        return results

    def _predict_masks(
        self,
        feats: Features,
        results: list[Instances],
        input_boxes: list[Tensor],
        image_sizes: list[tuple[int, int]],
        infos: list[ImageInfo] | None,
    ) -> None:
        rois = boxes_to_rois(input_boxes)
        labels = torch.cat([r.labels for r in results])
        probs = None
        if rois.shape[0]:
            probs = self.mask_head.predict_probs(feats, self.mask_roi_extractor, rois, labels)
        out_sizes = [i.original_size for i in infos] if infos is not None else image_sizes
        paste_masks(results, probs, out_sizes, self.cfg.mask_thr, rois.device)
