"""The Mask R-CNN RoI head (mmdet ``StandardRoIHead``): sampling, targets, losses, inference.

Training, per image: the GT boxes join the proposals, MaxIoU assignment (0.5 / 0.5), 512
random samples at 25% positive. Box branch: softmax cross-entropy over ``num_classes + 1``
(background last) averaged over the sampled RoIs, L1 on class-specific deltas (normalised by
stds 0.1/0.1/0.2/0.2) summed over positives and divided by the number of sampled RoIs. Mask
branch (positives only): the assigned GT mask cropped by the proposal with RoIAlign
(aligned, 28x28) and binarised at 0.5 is the target of a per-pixel BCE on the GT class's
logit map, averaged over pixels.

Inference: softmax scores, class-specific boxes clipped to the image, per-class NMS over the
candidates above ``score_thr``, the best ``max_per_image``; masks are predicted for the kept
boxes and pasted into the original image (spec §1.4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import (
    batched_nms,
    clip_boxes_to_image,
    decode_deltas,
    encode_deltas,
    paste_masks_in_image,
    roi_align,
)
from ...structures import ImageInfo, Instances, InstanceTargets
from ..anchors import AssignerConfig, SamplerConfig, assign, sample
from .extractor import RoIExtractorConfig, build_roi_extractor
from .heads import BoxHeadConfig, FCNMaskHead, MaskHeadConfig, Shared2FCBoxHead, select_class
from .refinemask import RefineMaskHeadConfig

MASK_HEAD_KINDS = ("fcn", "refinemask")


@dataclass
class RoIHeadConfig:
    num_classes: int = 80
    with_mask: bool = True
    box_extractor: RoIExtractorConfig = field(default_factory=lambda: RoIExtractorConfig(7))
    mask_extractor: RoIExtractorConfig = field(default_factory=lambda: RoIExtractorConfig(14))
    box_head: BoxHeadConfig = field(default_factory=BoxHeadConfig)
    # "fcn": Mask R-CNN's FCNMaskHead (``mask_head``); "refinemask": the RefineMask head
    # (``refine_mask``, spec §3), which also reads FPN P2 for its semantic branch.
    mask_head_kind: str = "fcn"
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    refine_mask: RefineMaskHeadConfig = field(default_factory=RefineMaskHeadConfig)
    assigner: AssignerConfig = field(default_factory=AssignerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    target_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 1.0
    loss_mask_weight: float = 1.0
    score_thr: float = 0.05
    nms_iou: float = 0.5
    max_per_image: int = 100
    mask_thr: float = 0.5

    def __post_init__(self) -> None:
        if self.num_classes <= 0:
            raise ValueError(f"roi_head.num_classes must be positive, got {self.num_classes}")
        if self.max_per_image <= 0:
            raise ValueError(f"roi_head.max_per_image must be positive, got {self.max_per_image}")
        if self.mask_head_kind not in MASK_HEAD_KINDS:
            raise ValueError(
                f"roi_head.mask_head_kind must be one of {MASK_HEAD_KINDS}, "
                f"got {self.mask_head_kind!r}"
            )
        if self.mask_head_kind != "fcn" and not self.with_mask:
            raise ValueError(
                f"roi_head.mask_head_kind is {self.mask_head_kind!r} but roi_head.with_mask is "
                "False; set with_mask=True or use mask_head_kind='fcn'"
            )


def boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """Per-image ``(N_i, 4)`` boxes as one ``(sum N_i, 5)`` RoI tensor."""
    return torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])


def crop_mask_targets(
    pos_boxes: list[Tensor],
    pos_gt: list[Tensor],
    targets: list[InstanceTargets],
    sizes: list[int] | tuple[int, ...],
) -> list[Tensor]:
    """Mask targets of the positive RoIs, one ``(sum N_i, S, S)`` bool tensor per size S.

    Each RoI's assigned GT mask is cropped by the RoI, clipped to the image, with RoIAlign
    (aligned, adaptive sampling) at S x S and binarised at 0.5 (mmdet's bitmap
    ``crop_and_resize``).
    """
    per_size: list[list[Tensor]] = [[] for _ in sizes]
    for boxes, gt_index, target in zip(pos_boxes, pos_gt, targets, strict=True):
        if boxes.shape[0] == 0:
            continue
        if target.masks is None:
            raise ValueError("mask training needs targets with masks (with_masks=True data)")
        used, local = torch.unique(gt_index, return_inverse=True)
        masks = target.masks[used][:, None].to(boxes.dtype)
        clipped = clip_boxes_to_image(boxes, tuple(target.masks.shape[-2:]))
        crop_rois = torch.cat([local[:, None].to(boxes.dtype), clipped], 1)
        for crops, size in zip(per_size, sizes, strict=True):
            crops.append(roi_align(masks, crop_rois, size, 1.0, 0, True)[:, 0] >= 0.5)
    device = pos_boxes[0].device if pos_boxes else torch.device("cpu")
    return [
        torch.cat(crops) if crops else torch.zeros((0, s, s), dtype=torch.bool, device=device)
        for crops, s in zip(per_size, sizes, strict=True)
    ]


def _check_width(extractor: nn.Module, head_channels: int, key: str) -> None:
    if extractor.out_channels != head_channels:
        raise ValueError(
            f"roi_head.{key}.in_channels is {head_channels} but its RoI extractor gives "
            f"{extractor.out_channels} channels; set them equal"
        )


class StandardRoIHead(nn.Module):
    """Box (and mask) branch over FPN maps of ``in_channels`` channels; each branch has its
    own RoI extractor (single-level or GRoIE, with its own weights)."""

    def __init__(self, cfg: RoIHeadConfig, in_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.bbox_roi_extractor = build_roi_extractor(cfg.box_extractor, in_channels)
        _check_width(self.bbox_roi_extractor, cfg.box_head.in_channels, "box_head")
        self.bbox_head = Shared2FCBoxHead(cfg.box_head, cfg.num_classes)
        if cfg.with_mask:
            self.mask_roi_extractor = build_roi_extractor(cfg.mask_extractor, in_channels)
            self.mask_head = self._build_mask_head(in_channels)

    def _build_mask_head(self, in_channels: int) -> nn.Module:
        _check_width(self.mask_roi_extractor, self.cfg.mask_head.in_channels, "mask_head")
        return FCNMaskHead(self.cfg.mask_head, self.cfg.num_classes)

    # ----------------------------------------------------------------------------- training

    def loss(
        self, feats: list[Tensor], proposals: list[Tensor], targets: list[InstanceTargets]
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        sampled, labels, reg_targets, pos_boxes, pos_gt = [], [], [], [], []
        for props, target in zip(proposals, targets, strict=True):
            if cfg.sampler.add_gt_as_proposals and len(target) > 0:
                props = torch.cat([target.boxes, props])
            assigned = assign(props, target.boxes, cfg.assigner, target.ignore_boxes)
            pos, neg = sample(assigned, cfg.sampler.num, cfg.sampler.pos_fraction)
            gt_index = assigned[pos] - 1
            sampled.append(torch.cat([props[pos], props[neg]]))
            background = torch.full_like(neg, cfg.num_classes)
            labels.append(torch.cat([target.labels[gt_index], background]))
            reg_targets.append(
                encode_deltas(props[pos], target.boxes[gt_index], stds=cfg.target_stds)
            )
            pos_boxes.append(props[pos])
            pos_gt.append(gt_index)

        rois = boxes_to_rois(sampled)
        cls_score, bbox_pred = self.bbox_head(self.bbox_roi_extractor(feats, rois))
        labels_all = torch.cat(labels)
        is_pos = labels_all < cfg.num_classes
        pos_pred = select_class(bbox_pred.view(-1, cfg.num_classes, 4)[is_pos], labels_all[is_pos])
        losses = {
            "loss_cls": cfg.loss_cls_weight * F.cross_entropy(cls_score, labels_all),
            "loss_bbox": cfg.loss_bbox_weight
            * (pos_pred - torch.cat(reg_targets)).abs().sum()
            / max(rois.shape[0], 1),
        }
        if cfg.with_mask:
            losses.update(self._mask_losses(feats, pos_boxes, pos_gt, labels_all[is_pos], targets))
        return losses

    def _mask_losses(
        self,
        feats: list[Tensor],
        pos_boxes: list[Tensor],
        pos_gt: list[Tensor],
        pos_labels: Tensor,
        targets: list[InstanceTargets],
    ) -> dict[str, Tensor]:
        rois = boxes_to_rois(pos_boxes)
        logits = self.mask_head(self.mask_roi_extractor(feats, rois))
        if rois.shape[0] == 0:
            return {"loss_mask": logits.sum() * 0.0}
        (mask_targets,) = crop_mask_targets(pos_boxes, pos_gt, targets, [logits.shape[-1]])
        loss = F.binary_cross_entropy_with_logits(
            select_class(logits, pos_labels), mask_targets.to(logits.dtype)
        )
        return {"loss_mask": self.cfg.loss_mask_weight * loss}

    # ---------------------------------------------------------------------------- inference

    @torch.no_grad()
    def predict(
        self,
        feats: list[Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        infos: list[ImageInfo] | None = None,
    ) -> list[Instances]:
        """Detections per image, in original image coordinates when ``infos`` is given (else
        in the network input frame)."""
        cfg = self.cfg
        rois = boxes_to_rois(proposals)
        cls_score, bbox_pred = self.bbox_head(self.bbox_roi_extractor(feats, rois))
        scores_all = F.softmax(cls_score, dim=1)[:, : cfg.num_classes]
        counts = [p.shape[0] for p in proposals]
        results = []
        for i, (props, scores, deltas) in enumerate(
            zip(proposals, scores_all.split(counts), bbox_pred.split(counts), strict=True)
        ):
            boxes = decode_deltas(
                props[:, None, :].expand(-1, cfg.num_classes, 4),
                deltas.view(-1, cfg.num_classes, 4),
                stds=cfg.target_stds,
                max_shape=image_sizes[i],
            )
            candidate = scores > cfg.score_thr
            box_index, label = torch.nonzero(candidate, as_tuple=True)
            det_boxes = boxes[box_index, label]
            det_scores = scores[box_index, label]
            keep = batched_nms(det_boxes, det_scores, label, cfg.nms_iou)[: cfg.max_per_image]
            results.append(Instances(det_boxes[keep], det_scores[keep], label[keep]))

        # Mask RoIs live in the network input frame: take the boxes before rescaling them.
        input_boxes = [r.boxes for r in results]
        if infos is not None:
            for result, info in zip(results, infos, strict=True):
                sy, sx = info.scale
                result.boxes = result.boxes / result.boxes.new_tensor([sx, sy, sx, sy])
        if cfg.with_mask:
            self._predict_masks(feats, results, input_boxes, image_sizes, infos)
        return results

    def _predict_masks(
        self,
        feats: list[Tensor],
        results: list[Instances],
        input_boxes: list[Tensor],
        image_sizes: list[tuple[int, int]],
        infos: list[ImageInfo] | None,
    ) -> None:
        rois = boxes_to_rois(input_boxes)
        labels = torch.cat([r.labels for r in results])
        probs = self._mask_probs(feats, rois, labels) if rois.shape[0] else None
        start = 0
        for i, result in enumerate(results):
            n = len(result)
            out_size = infos[i].original_size if infos is not None else image_sizes[i]
            if n == 0 or probs is None:
                result.masks = torch.zeros((0, *out_size), dtype=torch.bool, device=rois.device)
                continue
            result.masks = paste_masks_in_image(
                probs[start : start + n], result.boxes, out_size, self.cfg.mask_thr
            )
            start += n

    def _mask_probs(self, feats: list[Tensor], rois: Tensor, labels: Tensor) -> Tensor:
        """``(N, M, M)`` mask probabilities of the RoIs' labels."""
        logits = self.mask_head(self.mask_roi_extractor(feats, rois))
        return select_class(logits, labels).sigmoid()
