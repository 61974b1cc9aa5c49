"""RoI sampling for training (mmdet ``MaxIoUAssigner`` + ``RandomSampler`` over proposals
plus the GT boxes), as one function that a single-stage and a cascade RoI head both call,
and the labelling without sampling of detectron2's later cascade stages."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...structures import InstanceTargets
from ..anchors import AssignerConfig, SamplerConfig, assign, sample


def boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """Per-image ``(N_i, 4)`` boxes as one ``(sum N_i, 5)`` RoI tensor."""
    return torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])


@dataclass
class SampledRoIs:
    """The sampled RoIs of a batch: per image the positives first, then the negatives.

    ``labels`` covers every sampled RoI of every image (``num_classes`` = background);
    ``is_gt`` marks, per image, the sampled RoIs that are GT boxes joined to the proposals
    (a cascade drops them before refining); ``pos_*`` are per image: the positive boxes, the
    index of their GT in that image's targets, and that GT's box.
    """

    boxes: list[Tensor]
    labels: Tensor
    num_classes: int
    pos_boxes: list[Tensor]
    pos_gt_index: list[Tensor]
    pos_gt_boxes: list[Tensor]
    is_gt: list[Tensor] | None = None

    @property
    def rois(self) -> Tensor:
        return boxes_to_rois(self.boxes)

    @property
    def is_pos(self) -> Tensor:
        return self.labels < self.num_classes

    @property
    def pos_labels(self) -> Tensor:
        """Labels of the positives, all images, in ``pos_boxes`` order."""
        return self.labels[self.is_pos]


def sample_rois(
    proposals: list[Tensor],
    targets: list[InstanceTargets],
    assigner: AssignerConfig,
    sampler: SamplerConfig,
    num_classes: int,
    purpose: str = "rcnn",
) -> SampledRoIs:
    """Per image: the GT boxes join the proposals (``add_gt_as_proposals``), MaxIoU
    assignment (crowd regions ignored), then random positives and negatives, drawn from the
    image's stream named ``purpose`` (the global RNG for targets without a seed)."""
    boxes, labels, pos_boxes, pos_gt_index, pos_gt_boxes, is_gt = [], [], [], [], [], []
    for props, target in zip(proposals, targets, strict=True):
        num_gt = 0
        if sampler.add_gt_as_proposals and len(target) > 0:
            props = torch.cat([target.boxes, props])
            num_gt = len(target)
        assigned = assign(props, target.boxes, assigner, target.ignore_boxes)
        pos, neg = sample(assigned, sampler.num, sampler.pos_fraction, target.generator(purpose))
        gt_index = assigned[pos] - 1
        boxes.append(torch.cat([props[pos], props[neg]]))
        background = torch.full_like(neg, num_classes)
        labels.append(torch.cat([target.labels[gt_index], background]))
        pos_boxes.append(props[pos])
        pos_gt_index.append(gt_index)
        pos_gt_boxes.append(target.boxes[gt_index])
        is_gt.append(torch.cat([pos, neg]) < num_gt)
    return SampledRoIs(
        boxes, torch.cat(labels), num_classes, pos_boxes, pos_gt_index, pos_gt_boxes, is_gt
    )


def label_rois(
    boxes: list[Tensor], targets: list[InstanceTargets], assigner: AssignerConfig, num_classes: int
) -> SampledRoIs:
    """Every box labelled by MaxIoU assignment, none sampled and no GT added (detectron2's
    later cascade stages): per image the positives first, then the rest as background
    (candidates the assigner ignores count as background)."""
    out, labels, pos_boxes, pos_gt_index, pos_gt_boxes = [], [], [], [], []
    for image_boxes, target in zip(boxes, targets, strict=True):
        assigned = assign(image_boxes, target.boxes, assigner, target.ignore_boxes)
        positive = assigned > 0
        gt_index = assigned[positive] - 1
        out.append(torch.cat([image_boxes[positive], image_boxes[~positive]]))
        background = torch.full_like(assigned[~positive], num_classes)
        labels.append(torch.cat([target.labels[gt_index], background]))
        pos_boxes.append(image_boxes[positive])
        pos_gt_index.append(gt_index)
        pos_gt_boxes.append(target.boxes[gt_index])
    return SampledRoIs(out, torch.cat(labels), num_classes, pos_boxes, pos_gt_index, pos_gt_boxes)
