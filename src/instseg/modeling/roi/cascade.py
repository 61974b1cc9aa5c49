"""Cascade R-CNN / Cascade Mask R-CNN RoI head (Cai & Vasconcelos; spec §10, §5.7).

A sequence of box stages, each with its own extractor and class-agnostic box head trained at
a rising IoU (0.5 / 0.6 / 0.7) with its own coder stds; each stage's regressed boxes
(detached) are the next stage's RoIs. Two recipes, chosen by named fields:

================================  ===========================  ===========================
field                             mmdet (``CascadeRoIHead``)   cvpods / detectron2 (IFR)
================================  ===========================  ===========================
``later_stages``                  "resample": re-assign,       "relabel": every RoI of the
                                  re-sample 512 with the GT    previous stage relabelled,
                                  added, GT-RoIs dropped       empty boxes dropped, GT kept
``stage_loss_weights``            1, 0.5, 0.25                 1, 1, 1
``stage_gradient_scale``          1                            1/3 on each stage's features
``mask_per_stage``                True: one mask head per      False: one mask head on the
                                  stage, test mean of probs    first stage's positives
``score_merge``                   "mean_logits", then softmax  "mean_probs" (softmax first)
================================  ===========================  ===========================

Parameter names follow mmdetection 3.3 (``roi_head.bbox_head.0..2``,
``roi_head.mask_head.0..2``); with one mask head it is ``roi_head.mask_head``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...structures import ImageInfo, Instances, InstanceTargets, TrainingContext
from ..anchors import AssignerConfig, SamplerConfig
from ..features import Features, FeatureSpec
from .extractor import RoIExtractorChoice, RoIExtractorConfig, build_roi_extractor
from .heads import BoxHeadConfig, FCNMaskHeadConfig, Shared2FCBoxHead, select_class
from .sampling import SampledRoIs, boxes_to_rois, label_rois, sample_rois
from .standard import MaskHeadChoice, check_detection_settings, detect

CASCADE_STDS = (
    (0.1, 0.1, 0.2, 0.2),
    (0.05, 0.05, 0.1, 0.1),
    (0.033, 0.033, 0.067, 0.067),
)


@dataclass
class CascadeRoIHeadConfig:
    """The cascade RoI head (``kind="cascade"``); defaults: mmdet's
    ``cascade-mask-rcnn_r50_fpn_1x_coco`` (§10.1). ``stage_ious[t]`` is stage t's assigner
    threshold (positive >= it, negative below, no low-quality matches); ``stage_target_stds``
    its coder stds (detectron2's weights w are stds 1/w); ``box_head`` is shared by every
    stage but for the stds; the test-time fields are those of the single-stage head."""

    kind: Literal["cascade"] = "cascade"
    box_extractor: RoIExtractorChoice = field(default_factory=RoIExtractorConfig)
    box_head: BoxHeadConfig = field(
        default_factory=lambda: BoxHeadConfig(class_agnostic=True, loss_bbox_beta=1.0)
    )
    stage_ious: tuple[float, ...] = (0.5, 0.6, 0.7)
    stage_target_stds: tuple[tuple[float, float, float, float], ...] = CASCADE_STDS
    stage_loss_weights: tuple[float, ...] = (1.0, 0.5, 0.25)
    later_stages: str = "resample"
    stage_gradient_scale: float = 1.0
    score_merge: str = "mean_logits"
    mask_extractor: RoIExtractorChoice = field(default_factory=RoIExtractorConfig)
    mask_head: MaskHeadChoice | None = field(default_factory=FCNMaskHeadConfig)
    mask_per_stage: bool = True
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    score_thr: float = 0.05
    nms_iou: float = 0.5
    max_per_image: int = 100
    mask_thr: float = 0.5
    min_box_size: float = 0.0
    mask_paste: str = "grid_sample"

    def __post_init__(self) -> None:
        check_detection_settings(self)
        key = "roi_head"
        n = len(self.stage_ious)
        if n == 0:
            raise ValueError(f"{key}.stage_ious must name at least one stage")
        if len(self.stage_target_stds) != n or len(self.stage_loss_weights) != n:
            raise ValueError(
                f"{key}: stage_ious, stage_target_stds and stage_loss_weights need one entry "
                f"per stage, got {n}, {len(self.stage_target_stds)}, "
                f"{len(self.stage_loss_weights)}"
            )
        self.stage_target_stds = tuple(tuple(s) for s in self.stage_target_stds)  # type: ignore[assignment]
        if any(len(s) != 4 or min(s) <= 0 for s in self.stage_target_stds):
            raise ValueError(f"{key}.stage_target_stds must be 4 positive values per stage")
        if any(not 0 < iou <= 1 for iou in self.stage_ious):
            raise ValueError(f"{key}.stage_ious must be in (0, 1], got {self.stage_ious}")
        for name, allowed in (
            ("later_stages", ("resample", "relabel")),
            ("score_merge", ("mean_logits", "mean_probs")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{key}.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.stage_gradient_scale <= 0:
            raise ValueError(f"{key}.stage_gradient_scale must be positive")

    @property
    def num_stages(self) -> int:
        return len(self.stage_ious)

    def stage_box_head(self, stage: int) -> BoxHeadConfig:
        return replace(self.box_head, target_stds=self.stage_target_stds[stage])

    def stage_assigner(self, stage: int) -> AssignerConfig:
        iou = self.stage_ious[stage]
        return AssignerConfig(iou, iou, iou, match_low_quality=False)

    def build(self, in_specs: list[FeatureSpec], num_classes: int) -> CascadeRoIHead:
        return CascadeRoIHead(self, in_specs, num_classes)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward, gradient times ``scale`` backward (detectron2's cascade)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class CascadeRoIHead(nn.Module):
    """Box stages (and mask heads) over the neck levels ``in_specs``."""

    def __init__(self, cfg: CascadeRoIHeadConfig, in_specs: list[FeatureSpec], num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.with_mask = cfg.mask_head is not None
        stages = range(cfg.num_stages)
        self.bbox_roi_extractor = nn.ModuleList(
            build_roi_extractor(cfg.box_extractor, in_specs, cfg.box_head.roi_size) for _ in stages
        )
        self.bbox_head = nn.ModuleList(
            Shared2FCBoxHead(cfg.stage_box_head(t), extractor.out_channels, num_classes)
            for t, extractor in zip(stages, self.bbox_roi_extractor, strict=True)
        )
        if cfg.mask_head is not None:
            mask_cfg = cfg.mask_head

            def extractor() -> nn.Module:
                return build_roi_extractor(cfg.mask_extractor, in_specs, mask_cfg.roi_size)

            def head(width: int) -> nn.Module:
                return mask_cfg.build(width, in_specs, num_classes)

            if cfg.mask_per_stage:
                self.mask_roi_extractor = nn.ModuleList(extractor() for _ in stages)
                self.mask_head = nn.ModuleList(
                    head(e.out_channels) for e in self.mask_roi_extractor
                )
            else:
                self.mask_roi_extractor = extractor()
                self.mask_head = head(self.mask_roi_extractor.out_channels)

    # ---------------------------------------------------------------------- training

    def loss(
        self,
        feats: Features,
        proposals: list[Tensor],
        targets: list[InstanceTargets],
        image_sizes: list[tuple[int, int]],
        context: TrainingContext | None = None,
    ) -> dict[str, Tensor]:
        """Stage t's losses as ``s{t}.loss_cls`` / ``s{t}.loss_bbox`` (and ``s{t}.loss_mask``
        with a mask head per stage, ``loss_mask`` with one), times the stage's weight."""
        cfg = self.cfg
        losses: dict[str, Tensor] = {}
        boxes = proposals
        for t in range(cfg.num_stages):
            if t == 0 or cfg.later_stages == "resample":
                sampled = sample_rois(
                    boxes,
                    targets,
                    cfg.stage_assigner(t),
                    cfg.sampler,
                    self.num_classes,
                    purpose=f"rcnn.stage{t}",
                )
            else:
                sampled = label_rois(boxes, targets, cfg.stage_assigner(t), self.num_classes)
            cls_score, bbox_pred = self._box_forward(t, feats, sampled.rois)
            weight = cfg.stage_loss_weights[t]
            for name, value in self.bbox_head[t].loss(cls_score, bbox_pred, sampled).items():
                losses[f"s{t}.{name}"] = weight * value
            if self.with_mask and cfg.mask_per_stage:
                mask = self.mask_head[t].loss(
                    feats, self.mask_roi_extractor[t], sampled, targets, context
                )
                for name, value in mask.items():
                    losses[f"s{t}.{name}"] = weight * value if name.startswith("loss") else value
            elif self.with_mask and t == 0:
                losses.update(
                    self.mask_head.loss(feats, self.mask_roi_extractor, sampled, targets, context)
                )
            if t + 1 < cfg.num_stages:
                with torch.no_grad():
                    boxes = self._next_stage_boxes(t, sampled, cls_score, bbox_pred, image_sizes)
        return losses

    def _box_forward(self, stage: int, feats: Features, rois: Tensor) -> tuple[Tensor, Tensor]:
        roi_feats = self.bbox_roi_extractor[stage](feats, rois)
        if self.training and self.cfg.stage_gradient_scale != 1.0:
            roi_feats = _ScaleGradient.apply(roi_feats, self.cfg.stage_gradient_scale)
        return self.bbox_head[stage](roi_feats)

    def _next_stage_boxes(
        self,
        stage: int,
        sampled: SampledRoIs,
        cls_score: Tensor,
        bbox_pred: Tensor,
        image_sizes: list[tuple[int, int]],
    ) -> list[Tensor]:
        """Stage ``stage``'s boxes of every sampled RoI, clipped to its image: "resample"
        drops the RoIs that were GT boxes (mmdet ``refine_bboxes``), "relabel" the empty
        boxes (detectron2). Class-specific heads use the GT label of the positives and the
        best foreground class of the others."""
        labels = torch.where(
            sampled.labels == self.num_classes,
            cls_score[:, : self.num_classes].argmax(1),
            sampled.labels,
        )
        counts = [b.shape[0] for b in sampled.boxes]
        refined = []
        for i, (boxes, deltas, image_labels) in enumerate(
            zip(sampled.boxes, bbox_pred.split(counts), labels.split(counts), strict=True)
        ):
            new = self._regress(stage, boxes, deltas, image_labels, image_sizes[i])
            if self.cfg.later_stages == "resample":
                assert sampled.is_gt is not None
                new = new[~sampled.is_gt[i]]
            else:
                new = new[(new[:, 2] > new[:, 0]) & (new[:, 3] > new[:, 1])]
            refined.append(new)
        return refined

    def _regress(
        self,
        stage: int,
        boxes: Tensor,
        deltas: Tensor,
        labels: Tensor,
        image_size: tuple[int, int],
    ) -> Tensor:
        """One image's boxes moved by stage ``stage``'s deltas (of ``labels``' class when
        class-specific), clipped to ``image_size``."""
        head = self.bbox_head[stage]
        decoded = head.decode(boxes, deltas, image_size)  # (N, C, 4), clipped
        return select_class(decoded, labels) if not head.cfg.class_agnostic else decoded[:, 0]

    # ---------------------------------------------------------------------- inference

    @torch.no_grad()
    def predict(
        self,
        feats: Features,
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        infos: list[ImageInfo] | None = None,
    ) -> list[Instances]:
        """Every stage scores the previous stage's boxes (the first the proposals); the
        class scores are merged over the stages (``score_merge``), the boxes are the last
        stage's; then NMS and, with masks, the mask head(s) on the detections (the stages'
        probabilities averaged)."""
        cfg = self.cfg
        counts = [p.shape[0] for p in proposals]
        boxes = proposals
        stage_scores = []
        for t in range(cfg.num_stages):
            cls_score, bbox_pred = self._box_forward(t, feats, boxes_to_rois(boxes))
            stage_scores.append(
                cls_score if cfg.score_merge == "mean_logits" else F.softmax(cls_score, 1)
            )
            if t + 1 < cfg.num_stages:
                labels = cls_score[:, : self.num_classes].argmax(1)
                boxes = [
                    self._regress(t, b, d, lab, image_sizes[i])
                    for i, (b, d, lab) in enumerate(
                        zip(boxes, bbox_pred.split(counts), labels.split(counts), strict=True)
                    )
                ]
        merged = torch.stack(stage_scores).mean(0)
        scores = F.softmax(merged, 1) if cfg.score_merge == "mean_logits" else merged
        last = self.bbox_head[cfg.num_stages - 1]
        decoded = [
            last.decode(b, d, image_sizes[i])
            for i, (b, d) in enumerate(zip(boxes, bbox_pred.split(counts), strict=True))
        ]
        scores = scores[:, : self.num_classes]
        return detect(
            decoded,
            list(scores.split(counts)),
            cfg,
            image_sizes,
            infos,
            self._mask_probs(feats) if self.with_mask else None,
        )

    def _mask_probs(self, feats: Features):
        def probs(rois: Tensor, labels: Tensor) -> Tensor:
            if not self.cfg.mask_per_stage:
                return self.mask_head.predict_probs(feats, self.mask_roi_extractor, rois, labels)
            per_stage = [
                head.predict_probs(feats, extractor, rois, labels)
                for head, extractor in zip(self.mask_head, self.mask_roi_extractor, strict=True)
            ]
            return torch.stack(per_stage).mean(0)

        return probs
