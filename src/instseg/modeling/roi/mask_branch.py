"""What a RoI head needs from a mask head, so that any head (FCN, RefineMask, later IFR)
plugs into any RoI head (single-stage, cascade), and the targets they share."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from ...ops import clip_boxes_to_image, roi_align
from ...structures import InstanceTargets
from ..features import Features, FeatureSpec
from .sampling import SampledRoIs


class MaskHead(Protocol):
    """A mask head reads its RoI features through the extractor the RoI head owns (so the
    extractor's parameters keep the name ``roi_head.mask_roi_extractor``)."""

    def loss(
        self,
        feats: Features,
        extractor: nn.Module,
        sampled: SampledRoIs,
        targets: list[InstanceTargets],
    ) -> dict[str, Tensor]:
        """Losses on the positive RoIs of ``sampled``."""
        ...

    def predict_probs(
        self, feats: Features, extractor: nn.Module, rois: Tensor, labels: Tensor
    ) -> Tensor:
        """``(N, M, M)`` foreground probabilities of ``(N, 5)`` RoIs for their labels."""
        ...


class MaskHeadConfig(Protocol):
    """A mask head config: ``roi_size`` is the size its extractor pools; ``build`` makes
    the head from the extractor's output width and the neck's levels."""

    kind: str

    @property
    def roi_size(self) -> int: ...

    def build(
        self, in_channels: int, in_specs: list[FeatureSpec], num_classes: int
    ) -> nn.Module: ...


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
