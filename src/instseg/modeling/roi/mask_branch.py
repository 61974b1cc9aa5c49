"""What a RoI head needs from a mask head, so that any head (FCN, RefineMask, IFR)
plugs into any RoI head (single-stage, cascade), and the targets they share."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from ...ops import clip_boxes_to_image
from ...ops.roi_align import roi_taps
from ...structures import InstanceTargets, TrainingContext
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
        context: TrainingContext | None = None,
    ) -> dict[str, Tensor]:
        """Losses on the positive RoIs of ``sampled``; ``context`` says where training
        stands (IFR switches phase on it)."""
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
    ``crop_and_resize``), computed by :func:`crop_and_resize`.
    """
    per_size: list[list[Tensor]] = [[] for _ in sizes]
    for boxes, gt_index, target in zip(pos_boxes, pos_gt, targets, strict=True):
        if boxes.shape[0] == 0:
            continue
        if target.masks is None:
            raise ValueError("mask training needs targets with masks (with_masks=True data)")
        clipped = clip_boxes_to_image(boxes, tuple(target.masks.shape[-2:]))
        for crops, size in zip(per_size, sizes, strict=True):
            crops.append(crop_and_resize(target.masks, gt_index, clipped, size) >= 0.5)
    device = pos_boxes[0].device if pos_boxes else torch.device("cpu")
    return [
        torch.cat(crops) if crops else torch.zeros((0, s, s), dtype=torch.bool, device=device)
        for crops, s in zip(per_size, sizes, strict=True)
    ]


# Largest padded window batch (elements) that crop_and_resize gathers at once.
_CROP_WINDOW_BUDGET = 1 << 22


def crop_and_resize(masks: Tensor, index: Tensor, boxes: Tensor, size: int) -> Tensor:
    """``roi_align(masks[index[k]], boxes[k], size, 1.0, 0, aligned=True)`` for every k, in
    ``boxes``' dtype: the RoIAlign mmdet crops bitmap masks with, for single-channel maps.

    RoIAlign's bin average is separable, ``Wy @ F @ Wx^T`` with ``(size, H)`` and ``(size, W)``
    weight matrices that are zero outside the RoI's rows and columns. So each RoI's window of
    the mask is gathered once and reduced by two batched matrix products, instead of reading
    every (bin, row tap, column tap) triple as the general operator does: adaptive sampling
    makes those about ``size^2 * (roi_side / size + 1)^2`` per RoI. Same weights, same taps;
    only the float summation order differs from :func:`roi_align`. RoIs are taken in chunks
    of similar window size so that the padded windows stay under a fixed memory budget.
    """
    k = boxes.shape[0]
    height, width = masks.shape[-2:]
    dtype = boxes.dtype
    if k == 0:
        return boxes.new_zeros((0, size, size))
    row_taps, col_taps = roi_taps(boxes, (size, size), (height, width), 1.0, 0, True)
    row_weights, row_start, rows = _axis_matrix(row_taps, height)
    col_weights, col_start, cols = _axis_matrix(col_taps, width)
    out = boxes.new_zeros((k, size, size))
    order = torch.sort(rows * cols, descending=True, stable=True).indices
    start = 0
    while start < k:
        chunk_len = max(1, _CROP_WINDOW_BUDGET // int(rows[order[start]] * cols[order[start]]))
        chunk = order[start : start + chunk_len]
        n_rows, n_cols = int(rows[chunk].max()), int(cols[chunk].max())
        row_index = (row_start[chunk, None] + torch.arange(n_rows, device=boxes.device)).clamp(
            max=height - 1
        )
        col_index = (col_start[chunk, None] + torch.arange(n_cols, device=boxes.device)).clamp(
            max=width - 1
        )
        # Whole rows first (contiguous copies), then the columns of each window.
        rows_of = masks[index[chunk, None], row_index]
        windows = rows_of.gather(2, col_index[:, None, :].expand(-1, n_rows, -1))
        wy = row_weights[chunk, :, :n_rows]
        wx = col_weights[chunk, :, :n_cols]
        out[chunk] = torch.bmm(torch.bmm(wy, windows.to(dtype)), wx.transpose(1, 2))
        start += chunk_len
    return out


def _axis_matrix(taps: tuple[Tensor, Tensor, Tensor], size: int) -> tuple[Tensor, Tensor, Tensor]:
    """RoIAlign's ``(pixels, weights, counts)`` taps along one axis of ``size`` pixels as a
    dense ``(K, bins, extent)`` matrix over each RoI's window of pixels ``first .. first +
    extent - 1``; returns (weights, first, extent), the window length at least 1."""
    pixels, weights, counts = taps
    k, _, taps = pixels.shape
    used = torch.arange(taps, device=pixels.device) < counts[..., None]
    first = torch.where(used, pixels, size).amin((1, 2)).clamp(max=size - 1)
    last = torch.where(used, pixels, -1).amax((1, 2))
    extent = (last - first + 1).clamp(min=1)
    offset = torch.where(used, pixels - first[:, None, None], 0)
    matrix = weights.new_zeros((k, pixels.shape[1], int(extent.max())))
    matrix.scatter_add_(-1, offset, torch.where(used, weights, 0.0))
    return matrix, first, extent
