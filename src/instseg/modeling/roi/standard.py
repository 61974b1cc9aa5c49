"""The Mask R-CNN RoI head (mmdet ``StandardRoIHead``), composed of parts.

Training: :func:`.sampling.sample_rois` (GT boxes join the proposals, MaxIoU 0.5 / 0.5,
512 random samples at 25% positive), then the box branch (extractor -> box head, whose loss
is softmax cross-entropy and L1 on normalised deltas) and, when the config has a mask head,
the mask branch (its extractor -> any :class:`.mask_branch.MaskHead`: FCN, RefineMask).

Inference: softmax scores, boxes decoded by the box head and clipped to the image,
per-class NMS over the candidates above ``score_thr``, the best ``max_per_image``; the mask
head's probabilities for the kept boxes are pasted into the original image (spec §1.4).
A cascade RoI head (:mod:`.cascade`) drives the same parts stage by stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops.masks import PASTE_MODES
from ...structures import ImageInfo, Instances, InstanceTargets, TrainingContext
from ..anchors import AssignerConfig, SamplerConfig
from ..features import Features, FeatureSpec
from ..postprocess import multiclass_nms, paste_masks, rescale_to_original
from .extractor import RoIExtractorChoice, RoIExtractorConfig, build_roi_extractor
from .heads import BoxHeadConfig, FCNMaskHeadConfig, Shared2FCBoxHead
from .ifr import IFRMaskHeadConfig
from .refinemask import RefineMaskHeadConfig
from .sampling import boxes_to_rois, sample_rois

MaskHeadChoice = FCNMaskHeadConfig | RefineMaskHeadConfig | IFRMaskHeadConfig
"""A mask head config: ``kind`` "fcn" (Mask R-CNN), "refinemask" (spec §3) or "ifr" (§5)."""


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
    min_box_size: float = 0.0
    mask_paste: str = "grid_sample"

    def __post_init__(self) -> None:
        check_detection_settings(self)

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
        self,
        feats: Features,
        proposals: list[Tensor],
        targets: list[InstanceTargets],
        image_sizes: list[tuple[int, int]],
        context: TrainingContext | None = None,
    ) -> dict[str, Tensor]:
        """Box (and mask) losses on the RoIs sampled from ``proposals``; ``image_sizes`` is
        unused here (a cascade clips its refined boxes to them)."""
        cfg = self.cfg
        sampled = sample_rois(proposals, targets, cfg.assigner, cfg.sampler, self.num_classes)
        cls_score, bbox_pred = self.bbox_head(self.bbox_roi_extractor(feats, sampled.rois))
        losses = self.bbox_head.loss(cls_score, bbox_pred, sampled)
        if self.with_mask:
            losses.update(
                self.mask_head.loss(feats, self.mask_roi_extractor, sampled, targets, context)
            )
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
        rois = boxes_to_rois(proposals)
        cls_score, bbox_pred = self.bbox_head(self.bbox_roi_extractor(feats, rois))
        scores = F.softmax(cls_score, dim=1)[:, : self.num_classes]
        counts = [p.shape[0] for p in proposals]
        boxes = [
            self.bbox_head.decode(props, deltas, image_sizes[i])
            for i, (props, deltas) in enumerate(
                zip(proposals, bbox_pred.split(counts), strict=True)
            )
        ]
        mask_probs = None
        if self.with_mask:

            def mask_probs(rois: Tensor, labels: Tensor) -> Tensor:
                return self.mask_head.predict_probs(feats, self.mask_roi_extractor, rois, labels)

        return detect(boxes, list(scores.split(counts)), self.cfg, image_sizes, infos, mask_probs)


def detect(
    boxes: list[Tensor],
    scores: list[Tensor],
    cfg: DetectionSettings,
    image_sizes: list[tuple[int, int]],
    infos: list[ImageInfo] | None,
    mask_probs: Callable[[Tensor, Tensor], Tensor] | None,
    refine: Callable[[list[Instances]], None] | None = None,
) -> list[Instances]:
    """The R-CNN test-time tail shared by the RoI heads: per image, ``(N, C, 4)`` decoded
    boxes and ``(N, C)`` class scores -> per-class NMS over the pairs above ``score_thr``,
    the best ``max_per_image``; ``refine(results)`` may then move the boxes (Grid R-CNN, in
    the network input frame); boxes back to the original frame when ``infos`` is given;
    then, with ``mask_probs(rois, labels)`` (the mask head's ``(K, M, M)`` probabilities of
    RoIs in the network input frame), masks pasted into each detection's final box."""
    results = [
        multiclass_nms(b, s, cfg.score_thr, cfg.nms_iou, cfg.max_per_image, cfg.min_box_size)
        for b, s in zip(boxes, scores, strict=True)
    ]
    if refine is not None:
        refine(results)
    # Mask RoIs live in the network input frame: take the boxes before rescaling them.
    rois = boxes_to_rois([r.boxes for r in results])
    if infos is not None:
        rescale_to_original(results, infos)
    if mask_probs is not None:
        labels = torch.cat([r.labels for r in results])
        probs = mask_probs(rois, labels) if rois.shape[0] else None
        out_sizes = [i.original_size for i in infos] if infos is not None else image_sizes
        paste_masks(results, probs, out_sizes, cfg.mask_thr, rois.device, cfg.mask_paste)
    return results


class DetectionSettings(Protocol):
    """The test-time fields every RoI head config has. ``min_box_size`` drops detections
    narrower or lower than it before NMS (torchvision: 1e-2; 0: none); ``mask_paste`` is
    how masks are pasted (:data:`instseg.ops.masks.PASTE_MODES`: mmdet's "grid_sample" or
    "torchvision")."""

    score_thr: float
    nms_iou: float
    max_per_image: int
    mask_thr: float
    min_box_size: float
    mask_paste: str


def check_detection_settings(cfg: DetectionSettings) -> None:
    """Errors naming the bad ``roi_head`` test-time field."""
    if cfg.max_per_image <= 0:
        raise ValueError(f"roi_head.max_per_image must be positive, got {cfg.max_per_image}")
    if cfg.min_box_size < 0:
        raise ValueError(f"roi_head.min_box_size must be >= 0, got {cfg.min_box_size}")
    if cfg.mask_paste not in PASTE_MODES:
        raise ValueError(
            f"roi_head.mask_paste must be one of {PASTE_MODES}, got {cfg.mask_paste!r}"
        )
