"""Post-processing shared by the detectors: per-class NMS of scored boxes, boxes back to the
original image frame, and mask probabilities pasted into the image (spec §1.4)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import batched_nms, paste_masks_in_image
from ..structures import ImageInfo, Instances


def multiclass_nms(
    boxes: Tensor,
    scores: Tensor,
    score_thr: float,
    iou_threshold: float,
    max_per_image: int,
    min_size: float = 0.0,
) -> Instances:
    """``(N, C, 4)`` boxes and ``(N, C)`` scores of one image -> the best ``max_per_image``
    (box, class) pairs scoring above ``score_thr`` after NMS within each class; with
    ``min_size > 0`` only boxes at least that wide and high take part (torchvision's
    ``remove_small_boxes``)."""
    box_index, label = torch.nonzero(scores > score_thr, as_tuple=True)
    det_boxes = boxes[box_index, label]
    det_scores = scores[box_index, label]
    if min_size > 0:
        wide = det_boxes[:, 2] - det_boxes[:, 0] >= min_size
        big = wide & (det_boxes[:, 3] - det_boxes[:, 1] >= min_size)
        det_boxes, det_scores, label = det_boxes[big], det_scores[big], label[big]
    keep = batched_nms(det_boxes, det_scores, label, iou_threshold)[:max_per_image]
    return Instances(det_boxes[keep], det_scores[keep], label[keep])


def rescale_to_original(results: list[Instances], infos: list[ImageInfo]) -> None:
    """Boxes from the resized input frame back to each original image, in place."""
    for result, info in zip(results, infos, strict=True):
        sy, sx = info.scale
        result.boxes = result.boxes / result.boxes.new_tensor([sx, sy, sx, sy])


def paste_masks(
    results: list[Instances],
    probs: Tensor | None,
    out_sizes: list[tuple[int, int]],
    threshold: float,
    device: torch.device,
    mode: str = "grid_sample",
) -> None:
    """Set ``masks`` of each image's detections: ``probs`` holds the ``(M, M)`` probabilities
    of every image's detections in order; each is pasted into its (final-frame) box the
    ``mode`` way (:func:`instseg.ops.paste_masks_in_image`)."""
    start = 0
    for result, out_size in zip(results, out_sizes, strict=True):
        n = len(result)
        if n == 0 or probs is None:
            result.masks = torch.zeros((0, *out_size), dtype=torch.bool, device=device)
            continue
        result.masks = paste_masks_in_image(
            probs[start : start + n], result.boxes, out_size, threshold, mode=mode
        )
        start += n
