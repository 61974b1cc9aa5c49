"""ONNX export of whole detectors: preprocessing, network and post-processing in one graph.

``export_onnx(model, cfg, categories, out)`` writes a graph that takes one RGB image
``image: float32 (3, H, W)`` (0-255, the network's input frame: resize it to the config's
test scale beforehand if the model was trained at one, :func:`network_input`) and returns

- ``boxes``  ``(N, 4)`` float32 x1 y1 x2 y2 in input pixels,
- ``scores`` ``(N,)`` float32,
- ``labels`` ``(N,)`` int64 dataset category ids (``categories[k].id`` for class ``k``),
- ``masks`` (mask models) float32 probabilities: ``(N, M, M)`` at RoI resolution (paste
  them into ``boxes``), or with ``pasted_masks`` ``(N, H, W)`` in the image; CondInst
  always gives ``(N, H, W)``.

Inside the graph: normalisation and zero padding to the size divisor, backbone, neck, RPN
(or FCOS) with NMS (ONNX ``NonMaxSuppression``), RoI heads (ONNX ``RoiAlign``), per-class
NMS, masks. The graph is built by the torch.export-based exporter (``dynamo=True``); the
two ops without an ONNX decomposition, NMS and RoIAlign, are custom ops
(``instseg_export::nms``, ``instseg_export::roi_align``) translated to the ONNX ops of the
same semantics. The post-processing is re-written here without data-dependent Python
(one wrapper module per detector family reusing the model's own submodules), and the
export is validated against the model's own ``predict`` with onnxruntime.

Exported: Faster/Mask R-CNN (single-level or GRoIE extractors, the mmdet and torchvision
recipes), RefineMask (both variants), Cascade (Mask) R-CNN, FCOS and CondInst. Not
exported (:class:`ExportError` names the part): IFR mask heads, Grid R-CNN, Precise RoI
Pooling, and pasted masks with ``mask_paste="torchvision"``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs.schema import ExperimentConfig
from .modeling.condinst import aligned_bilinear
from .modeling.roi.extractor import map_roi_levels
from .ops import nms as _nms
from .ops import roi_align as _roi_align
from .ops.masks import _interpolation_matrix
from .structures import ImageBatch, ImageInfo

OPSET = 18
_MAX_OUTPUT_BOXES = 1 << 30


class ExportError(ValueError):
    """A part of the model (named in the message) that the ONNX export does not support."""


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("instseg_export::nms", mutates_args=())
def nms_op(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float) -> Tensor:
    """ONNX ``NonMaxSuppression``: ``boxes (B, N, 4)`` xyxy, ``scores (B, C, N)`` -> the
    selected ``(K, 3)`` int64 ``(batch, class, box)`` triples, grouped by batch then class,
    each group by decreasing score. Only boxes scoring above ``score_threshold`` compete; a
    box is suppressed by a kept one of IoU above ``iou_threshold``."""
    selected = []
    for b in range(boxes.shape[0]):
        for c in range(scores.shape[1]):
            candidates = torch.nonzero(scores[b, c] > score_threshold).squeeze(1)
            keep = candidates[_nms(boxes[b, candidates], scores[b, c, candidates], iou_threshold)]
            triple = torch.stack([torch.full_like(keep, b), torch.full_like(keep, c), keep], 1)
            selected.append(triple)
    return torch.cat(selected) if selected else boxes.new_zeros((0, 3), dtype=torch.long)


@nms_op.register_fake
def _(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float) -> Tensor:
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count, 3), dtype=torch.long)


@torch.library.custom_op("instseg_export::roi_align", mutates_args=())
def roi_align_op(
    features: Tensor,
    boxes: Tensor,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """RoIAlign (torchvision semantics) of ``(K, 4)`` xyxy ``boxes`` on image 0 of
    ``features``: ONNX ``RoiAlign`` (``avg``; ``half_pixel`` when ``aligned``)."""
    return _roi_align(
        features, [boxes], output_size, spatial_scale, sampling_ratio, aligned
    ).contiguous()


@roi_align_op.register_fake
def _(features, boxes, output_size, spatial_scale, sampling_ratio, aligned):
    return features.new_empty((boxes.shape[0], features.shape[1], output_size, output_size))


def _onnx_translations() -> dict:
    """The ONNX functions of the custom ops (onnxscript, imported only when exporting)."""
    from onnxscript import opset18 as op

    def nms_onnx(boxes, scores, iou_threshold: float, score_threshold: float):
        return op.NonMaxSuppression(
            boxes,
            scores,
            op.Constant(value_ints=[_MAX_OUTPUT_BOXES]),
            op.Constant(value_floats=[iou_threshold]),
            op.Constant(value_floats=[score_threshold]),
        )

    def roi_align_onnx(
        features,
        boxes,
        output_size: int,
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool,
    ):
        batch_index = op.Expand(op.Constant(value_ints=[0]), op.Shape(boxes, start=0, end=1))
        return op.RoiAlign(
            features,
            boxes,
            batch_index,
            coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
            mode="avg",
            output_height=output_size,
            output_width=output_size,
            sampling_ratio=sampling_ratio,
            spatial_scale=spatial_scale,
        )

    return {
        torch.ops.instseg_export.nms.default: nms_onnx,
        torch.ops.instseg_export.roi_align.default: roi_align_onnx,
    }


# ------------------------------------------------------------------ shared building blocks


def _best(scores: Tensor, index: Tensor, k: int) -> Tensor:
    """The best ``k`` of the NMS survivors ``index`` (positions into ``scores``) by
    decreasing score: NMS returns them grouped by class, ``batched_nms`` sorted."""
    top = torch.topk(scores[index], min(k, index.shape[0])).indices
    return index[top]


def _top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The best ``min(k, n)`` of ``(n,)`` non-negative ``scores`` (values, indices) as
    exactly ``k`` entries: the missing ones score -1 (index 0). A fixed ``k`` keeps the
    shapes static, which makes the export several times faster than ``min(k, n)``."""
    padded = F.pad(scores, (0, k), value=-1.0)
    values, index = torch.topk(padded, k)
    return values, torch.where(values >= 0, index, 0)


def _level_anchors(base: Tensor, strides, height, width) -> Tensor:
    """``(H*W*A, 4)`` anchors of one level whose centres step by ``strides = (sy, sx)``,
    ordered (row, column, anchor) as ``AnchorGenerator`` (by broadcasting: a meshgrid
    traces slowly with dynamic sizes)."""
    a = base.shape[0]
    xs = torch.arange(width, device=base.device, dtype=base.dtype) * strides[1]
    ys = torch.arange(height, device=base.device, dtype=base.dtype) * strides[0]
    x = xs[None, :, None].expand(height, width, a)
    y = ys[:, None, None].expand(height, width, a)
    return (torch.stack([x, y, x, y], -1) + base).flatten(0, 2)


def _size_tensor(image: Tensor) -> Tensor:
    """``(w, h, w, h)`` of a ``(3, H, W)`` image as a float tensor (dynamic in the graph)."""
    h = image.new_ones(()) * image.shape[-2]
    w = image.new_ones(()) * image.shape[-1]
    return torch.stack([w, h, w, h])


def _clip(boxes: Tensor, limits: Tensor) -> Tensor:
    return torch.minimum(boxes.clamp(min=0), limits)


def _decode(
    anchors: Tensor,
    deltas: Tensor,
    means: Sequence[float],
    stds: Sequence[float],
    limits: Tensor,
    clip: str = "symmetric",
) -> Tensor:
    """:func:`instseg.ops.decode_deltas` (``dw, dh`` clamped at ``log(1000/16)`` both ways,
    or from above only with ``clip="upper"``), clipped to ``limits``, with its operations."""
    d = deltas * deltas.new_tensor(stds) + deltas.new_tensor(means)
    bound = abs(math.log(1000.0 / 16))
    low = -bound if clip == "symmetric" else None
    pw = anchors[..., 2] - anchors[..., 0]
    ph = anchors[..., 3] - anchors[..., 1]
    cx = (anchors[..., 0] + anchors[..., 2]) / 2 + d[..., 0] * pw
    cy = (anchors[..., 1] + anchors[..., 3]) / 2 + d[..., 1] * ph
    w = pw * d[..., 2].clamp(low, bound).exp()
    h = ph * d[..., 3].clamp(low, bound).exp()
    boxes = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)
    return _clip(boxes, limits)


class _Preprocess(nn.Module):
    """RGB 0-255 ``(3, H, W)`` -> normalised ``(1, 3, H', W')`` zero-padded to the divisor."""

    def __init__(self, mean, std, bgr: bool, size_divisor: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1))
        self.bgr = bgr
        self.size_divisor = size_divisor

    def forward(self, image: Tensor) -> Tensor:
        x = image.flip(0) if self.bgr else image
        x = (x - self.mean) / self.std
        d = self.size_divisor
        height, width = image.shape[-2:]
        # Non-negative operands only: ONNX integer division truncates, Python's floors.
        pad_h = (height + d - 1) // d * d - height
        pad_w = (width + d - 1) // d * d - width
        return F.pad(x[None], (0, pad_w, 0, pad_h))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ExportError(message)


def _roi_extractor(extractor: nn.Module, what: str) -> nn.Module:
    """The export form of a RoI extractor: single-level or GRoIE, RoIAlign only."""
    cfg = extractor.cfg
    _check(cfg.op == "roi_align", f"{what}: the RoI op {cfg.op!r} cannot be exported")
    kind = cfg.kind
    if kind == "generic":
        return _GRoIE(extractor)
    _check(kind == "single", f"{what}: the {kind!r} RoI extractor cannot be exported")
    return _LevelRoIAlign(extractor)


class _PoolLevels(nn.Module):
    """Every RoI pooled from every level the extractor reads (one ONNX RoiAlign each)."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        cfg, pooler = extractor.cfg, extractor.pooler
        self.levels = list(pooler.levels)
        self.strides = list(pooler.strides)
        self.output_size = extractor.output_size
        self.sampling_ratio = int(cfg.sampling_ratio)
        self.aligned = bool(cfg.aligned)

    def pool(self, feats: dict[str, Tensor], boxes: Tensor) -> list[Tensor]:
        return [
            torch.ops.instseg_export.roi_align(
                feats[name],
                boxes,
                self.output_size,
                1.0 / stride,
                self.sampling_ratio,
                self.aligned,
            )
            for name, stride in zip(self.levels, self.strides, strict=True)
        ]


class _GRoIE(_PoolLevels):
    """GRoIE (``GenericRoIExtractor``): all levels pooled, the extractor's own pre-module,
    sum or concat, and its post-module (attention)."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__(extractor)
        self.extractor = extractor

    def forward(self, feats: dict[str, Tensor], boxes: Tensor) -> Tensor:
        pooled = self.pool(feats, boxes)
        if len(pooled) == 1:  # mmdet: one level is only pooled
            return pooled[0]
        stacked = torch.stack(pooled)  # (L, K, C, S, S)
        levels, k = stacked.shape[:2]
        ex = self.extractor
        if ex.pre_module is not None:
            stacked = ex.pre_module(stacked.flatten(0, 1)).unflatten(0, (levels, k))
        if ex.cfg.aggregation == "sum":
            out = stacked.sum(dim=0)
        else:
            out = stacked.transpose(0, 1).flatten(1, 2)
        return out if ex.post_module is None else ex.post_module(out)


class _LevelRoIAlign(_PoolLevels):
    """The single-level RoI extractor (mmdet ``SingleRoIExtractor``): every RoI is pooled
    from every level and keeps the level its size selects; with four levels this costs
    less than sorting RoIs into levels, and keeps the graph free of data-dependent splits."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__(extractor)
        self.finest_scale = float(extractor.cfg.finest_scale)
        self.mapping = extractor.cfg.level_mapping

    def forward(self, feats: dict[str, Tensor], boxes: Tensor) -> Tensor:
        pooled = self.pool(feats, boxes)
        if len(pooled) == 1:
            return pooled[0]
        rois = F.pad(boxes, (1, 0))  # the extractor's (K, 5) form; the batch index is unused
        level = map_roi_levels(rois, len(pooled), self.finest_scale, self.mapping)
        out = pooled[0]
        for i in range(1, len(pooled)):
            out = torch.where((level == i)[:, None, None, None], pooled[i], out)
        return out


class _RPN(nn.Module):
    """RPN proposals (``RPNHead.proposals``): per level the top ``nms_pre`` anchors, decoded
    and clipped, small boxes dropped, NMS per level (levels as NMS classes), the best
    ``max_per_image``."""

    def __init__(self, rpn_head: nn.Module) -> None:
        super().__init__()
        cfg = rpn_head.cfg
        self.by_input = cfg.anchor_strides == "input"
        self.delta_clip = cfg.delta_clip
        self.head = rpn_head
        self.nms_pre = cfg.test_nms_pre
        self.max_per_image = cfg.test_max_per_image
        self.nms_iou = cfg.nms_iou
        self.min_box_size = cfg.min_box_size

    def forward(self, feats: dict[str, Tensor], limits: Tensor, input_size) -> Tensor:
        """``input_size``: the padded input's (height, width)."""
        logits, deltas = self.head(feats)
        generator = self.head.anchors
        boxes, scores, levels = [], [], []
        for level, (level_logits, level_deltas) in enumerate(zip(logits, deltas, strict=True)):
            score, top = _top_k(level_logits[0].sigmoid(), self.nms_pre)
            height, width = feats[self.head.levels[level]].shape[-2:]
            base = generator.base_anchors[level].to(limits.device)
            strides = (generator.strides[level],) * 2
            if self.by_input:  # torchvision: centres step by input size // level size
                strides = (input_size[0] // height, input_size[1] // width)
            anchors = _level_anchors(base, strides, height, width)[top]
            zeros, ones = (0.0,) * 4, (1.0,) * 4
            boxes.append(
                _decode(anchors, level_deltas[0, top], zeros, ones, limits, self.delta_clip)
            )
            scores.append(score)
            levels.append(torch.full_like(top, level))
        boxes_, scores_, levels_ = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
        w = boxes_[:, 2] - boxes_[:, 0]
        h = boxes_[:, 3] - boxes_[:, 1]
        valid = (w > self.min_box_size) & (h > self.min_box_size)
        num_levels = len(logits)
        per_level = levels_[None, :] == torch.arange(num_levels, device=levels_.device)[:, None]
        nms_scores = torch.where(per_level & valid, scores_, -1.0)
        selected = torch.ops.instseg_export.nms(boxes_[None], nms_scores[None], self.nms_iou, -0.5)
        keep = _best(scores_, selected[:, 2], self.max_per_image)
        return boxes_[keep]


def _multiclass_nms(boxes: Tensor, scores: Tensor, settings) -> tuple[Tensor, Tensor, Tensor]:
    """``(P, C, 4)`` boxes and ``(P, C)`` scores -> boxes, scores, class indices of the best
    ``max_per_image`` (box, class) pairs above ``score_thr`` after NMS within each class
    (classes as the NMS batch, so each class has its own boxes)."""
    c = scores.shape[1]
    nms_scores = scores
    min_size = settings.min_box_size
    if min_size > 0:
        big = (boxes[..., 2] - boxes[..., 0] >= min_size) & (
            boxes[..., 3] - boxes[..., 1] >= min_size
        )
        nms_scores = torch.where(big, scores, -1.0)
    selected = torch.ops.instseg_export.nms(
        boxes.transpose(0, 1), nms_scores.t()[:, None, :], settings.nms_iou, settings.score_thr
    )
    flat = selected[:, 2] * c + selected[:, 0]
    keep = _best(scores.reshape(-1), flat, settings.max_per_image)
    return boxes.reshape(-1, 4)[keep], scores.reshape(-1)[keep], keep % c


def _select_class(per_class: Tensor, labels: Tensor) -> Tensor:
    """``per_class[i, labels[i]]`` of a ``(N, C, M, M)`` tensor."""
    if per_class.shape[1] == 1:
        return per_class[:, 0]
    index = labels[:, None, None, None].expand(-1, 1, *per_class.shape[2:])
    return per_class.gather(1, index)[:, 0]


def paste_probabilities(probs: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """``(N, M, M)`` RoI probabilities pasted into their ``(N, 4)`` boxes of an image:
    ``(N, height, width)`` probabilities (mmdet ``_do_paste_mask``, bilinear,
    ``align_corners=False``, zero outside), as two thin matrix products per mask."""
    m = probs.shape[-1]
    rows = torch.arange(height, device=boxes.device, dtype=boxes.dtype)[None] + 0.5
    cols = torch.arange(width, device=boxes.device, dtype=boxes.dtype)[None] + 0.5
    wy = _interpolation_matrix(rows, boxes[:, 1], boxes[:, 3], m)
    wx = _interpolation_matrix(cols, boxes[:, 0], boxes[:, 2], m)
    return torch.bmm(torch.bmm(wy, probs), wx.transpose(1, 2))


# --------------------------------------------------------------------- detector wrappers


class _TwoStageGraph(nn.Module):
    """Faster/Mask R-CNN, RefineMask and Cascade (Mask) R-CNN: backbone, FPN, RPN, RoI
    head(s) and per-class NMS, then the mask head on the detections."""

    def __init__(
        self, model: nn.Module, preprocess: _Preprocess, label_ids: Tensor, pasted: bool
    ) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.register_buffer("label_ids", label_ids)
        self.pasted = pasted
        self.rpn = _RPN(model.rpn_head)
        roi_head = model.roi_head
        self.settings = roi_head.cfg
        kind = roi_head.cfg.kind
        _check(kind in ("standard", "cascade"), f"the {kind!r} RoI head cannot be exported")
        _check(
            not pasted or roi_head.cfg.mask_paste == "grid_sample",
            "roi_head.mask_paste='torchvision' cannot be exported pasted (export the RoI masks)",
        )
        self.cascade = kind == "cascade"
        if self.cascade:
            self.box_extractors = nn.ModuleList(
                _roi_extractor(e, f"roi_head.box_extractor (stage {t})")
                for t, e in enumerate(roi_head.bbox_roi_extractor)
            )
        else:
            self.box_extractors = nn.ModuleList(
                [_roi_extractor(roi_head.bbox_roi_extractor, "roi_head.box_extractor")]
            )
        self.with_mask = roi_head.with_mask
        if self.with_mask:
            heads = roi_head.mask_head
            extractors = roi_head.mask_roi_extractor
            if not isinstance(heads, nn.ModuleList):
                heads, extractors = [heads], [extractors]
            for head in heads:
                mask_kind = head.cfg.kind
                _check(
                    mask_kind in ("fcn", "refinemask"),
                    f"the {mask_kind!r} mask head cannot be exported"
                    + (
                        " (its Broyden fixed-point solver stops on a data-dependent residual test)"
                        if mask_kind == "ifr"
                        else ""
                    ),
                )
            self.mask_heads = list(heads)
            self.mask_extractors = nn.ModuleList(
                _roi_extractor(e, "roi_head.mask_extractor") for e in extractors
            )

    def forward(self, image: Tensor):
        limits = _size_tensor(image)
        x = self.preprocess(image)
        feats = self.model.features(ImageBatch(x, [(0, 0)]))
        proposals = self.rpn(feats, limits, x.shape[-2:])
        boxes, scores = self._boxes_and_scores(feats, proposals, limits)
        det_boxes, det_scores, labels = _multiclass_nms(boxes, scores, self.settings)
        outputs = (det_boxes, det_scores, self.label_ids[labels])
        if not self.with_mask:
            return outputs
        probs = torch.stack(
            [
                self._mask_probs(head, extractor, feats, det_boxes, labels)
                for head, extractor in zip(self.mask_heads, self.mask_extractors, strict=True)
            ]
        ).mean(0)
        if self.pasted:
            probs = paste_probabilities(probs, det_boxes, image.shape[-2], image.shape[-1])
        return (*outputs, probs)

    def _boxes_and_scores(self, feats, proposals: Tensor, limits: Tensor):
        """``(P, C, 4)`` decoded boxes and ``(P, C)`` class probabilities."""
        heads = self.model.roi_head.bbox_head
        if not self.cascade:
            cls_score, bbox_pred = heads(self.box_extractors[0](feats, proposals))
            boxes = self._decode(heads, proposals, bbox_pred, limits)
            return boxes, F.softmax(cls_score, 1)[:, : heads.num_classes]
        cfg = self.settings
        boxes, stage_scores = proposals, []
        for t, (head, extractor) in enumerate(zip(heads, self.box_extractors, strict=True)):
            cls_score, bbox_pred = head(extractor(feats, boxes))
            merged = cfg.score_merge == "mean_logits"
            stage_scores.append(cls_score if merged else F.softmax(cls_score, 1))
            decoded = self._decode(head, boxes, bbox_pred, limits)
            if t + 1 < len(heads):
                if head.cfg.class_agnostic:
                    boxes = decoded[:, 0]
                else:
                    labels = cls_score[:, : head.num_classes].argmax(1)
                    boxes = decoded.gather(1, labels[:, None, None].expand(-1, 1, 4))[:, 0]
        scores = torch.stack(stage_scores).mean(0)
        if cfg.score_merge == "mean_logits":
            scores = F.softmax(scores, 1)
        return decoded, scores[:, : heads[-1].num_classes]

    @staticmethod
    def _decode(head, boxes: Tensor, bbox_pred: Tensor, limits: Tensor) -> Tensor:
        cfg = head.cfg
        _check(cfg.with_reg, "a box head without regression (Grid R-CNN) cannot be exported")
        deltas = bbox_pred.reshape(bbox_pred.shape[0], -1, 4)
        decoded = _decode(
            boxes[:, None, :].expand(-1, deltas.shape[1], 4),
            deltas,
            cfg.target_means,
            cfg.target_stds,
            limits,
            cfg.delta_clip,
        )
        return decoded.expand(-1, head.num_classes, 4)

    @staticmethod
    def _mask_probs(head, extractor, feats, boxes: Tensor, labels: Tensor) -> Tensor:
        roi_feats = extractor(feats, boxes)
        if head.cfg.kind == "refinemask":
            return _refinemask_probs(head, feats, roi_feats, boxes, labels)
        return _select_class(head(roi_feats), labels).sigmoid()


@contextlib.contextmanager
def _exportable_refinemask():
    """RefineMask's stages sample the semantic map with :func:`instseg.ops.roi_align` (and
    the faster-better variant with ``bin_centre_sample``, one ``grid_sample`` per image):
    while exporting they call the custom RoIAlign op and a one-image ``grid_sample``
    instead (same numbers; ONNX RoiAlign and GridSample)."""
    from .modeling.roi import refinemask

    def roi_align(features, rois, size, spatial_scale, sampling_ratio, aligned):
        return torch.ops.instseg_export.roi_align(
            features, rois[:, 1:], size, spatial_scale, sampling_ratio, aligned
        )

    def bin_centre_sample(feat, rois, size, spatial_scale):
        steps = (torch.arange(size, device=feat.device, dtype=feat.dtype) + 0.5) / size
        x1, y1, x2, y2 = (rois[:, i : i + 1].to(feat.dtype) for i in range(1, 5))
        xs = (x1 + steps * (x2 - x1)) * spatial_scale / feat.shape[-1] * 2 - 1
        ys = (y1 + steps * (y2 - y1)) * spatial_scale / feat.shape[-2] * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)
        sampled = F.grid_sample(
            feat[:1],
            grid.flatten(0, 1)[None],
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
        return sampled[0].unflatten(1, (rois.shape[0], size)).transpose(0, 1)

    originals = refinemask.roi_align, refinemask.bin_centre_sample
    refinemask.roi_align, refinemask.bin_centre_sample = roi_align, bin_centre_sample
    try:
        yield
    finally:
        refinemask.roi_align, refinemask.bin_centre_sample = originals


def _refinemask_probs(head, feats, roi_feats: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
    """RefineMask's merged 112 x 112 probabilities (``predict_probs`` without chunking)."""
    from .modeling.roi.refinemask import merge_stages

    rois = torch.cat([boxes.new_zeros((boxes.shape[0], 1)), boxes], 1)
    semantic = head.semantic(feats[head.semantic_level])
    return merge_stages(head.instances(roi_feats, semantic, rois, labels)).sigmoid()


class _CondInstGraph(nn.Module):
    """FCOS (+ CondInst): per level the top ``nms_pre`` (location, class) pairs above
    ``score_thr``, per-class NMS, then the dynamic mask head on the detections; masks are
    full-image probabilities (upsampled to the padded input and cropped to the image)."""

    def __init__(self, model: nn.Module, preprocess: _Preprocess, label_ids: Tensor) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.register_buffer("label_ids", label_ids)
        self.cfg = model.bbox_head.cfg

    def forward(self, image: Tensor):
        limits = _size_tensor(image)
        x = self.preprocess(image)
        feats = self.model.features(ImageBatch(x, [(0, 0)]))
        head = self.model.bbox_head
        out = head(feats)
        cfg = self.cfg
        c = head.num_classes
        boxes, scores, labels, points, strides, params = [], [], [], [], [], []
        for level, stride in enumerate(head.strides):
            cls = out.cls[level][0]
            score = cls.permute(1, 2, 0).reshape(-1).sigmoid()  # (HW * C), location-major
            dist = out.bbox[level][0].permute(1, 2, 0).reshape(-1, 4)
            if cfg.norm_on_bbox:
                dist = dist * stride
            ctr = out.centerness[level][0].reshape(-1).sigmoid()
            pts = _level_points(cls, stride)
            kept, top = _top_k(torch.where(score > cfg.score_thr, score, -1.0), cfg.nms_pre)
            point, label = top // c, top % c
            p = pts[point]
            d = dist[point]
            box = torch.stack(
                [p[:, 0] - d[:, 0], p[:, 1] - d[:, 1], p[:, 0] + d[:, 2], p[:, 1] + d[:, 3]], 1
            )
            boxes.append(_clip(box, limits))
            # Pairs at or below the threshold keep a negative score: NMS ignores them.
            scores.append(torch.where(kept > 0, kept * ctr[point], -1.0))
            labels.append(label)
            points.append(p)
            strides.append(torch.full_like(kept, float(stride)))
            if out.params is not None:
                prm = out.params[level][0]
                params.append(prm.permute(1, 2, 0).reshape(-1, prm.shape[0])[point])
        boxes_, scores_, labels_ = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        w = boxes_[:, 2] - boxes_[:, 0]
        h = boxes_[:, 3] - boxes_[:, 1]
        valid = (w > 0) & (h > 0) & (scores_ > 0)
        per_class = labels_[None, :] == torch.arange(c, device=labels_.device)[:, None]
        nms_scores = torch.where(per_class & valid, scores_, -1.0)
        selected = torch.ops.instseg_export.nms(boxes_[None], nms_scores[None], cfg.nms_iou, -0.5)
        keep = _best(scores_, selected[:, 2], cfg.max_per_image)
        outputs = (boxes_[keep], scores_[keep], self.label_ids[labels_[keep]])
        mask_head = self.model.mask_head
        if mask_head is None:
            return outputs
        logits = _dynamic_logits(
            mask_head,
            mask_head.mask_feature_head(feats),
            torch.cat(params)[keep],
            torch.cat(points)[keep],
            torch.cat(strides)[keep],
        )
        probs = aligned_bilinear(logits.sigmoid()[None], mask_head.cfg.mask_out_stride)[0]
        return (*outputs, probs[:, : image.shape[-2], : image.shape[-1]])


def _dynamic_logits(
    head: nn.Module, mask_feats: Tensor, params: Tensor, points: Tensor, strides: Tensor
) -> Tensor:
    """CondInst's dynamic mask network (``CondInstMaskHead.dynamic_logits``) on image 0's
    mask features for N instances, with no branch on N: ``(N, H', W')`` logits at the
    mask-feature stride upsampled to ``mask_out_stride``."""
    _, c, h, w = mask_feats.shape
    n = params.shape[0]
    coords = head.relative_coords((h, w), points, strides).to(mask_feats.dtype)
    x = torch.cat([coords, mask_feats.reshape(1, c, h * w).expand(n, c, h * w)], 1)
    cfg = head.cfg
    parts = torch.split(params, cfg.weight_nums + cfg.bias_nums, dim=1)
    for i in range(cfg.num_layers):  # weights first, then biases (``split_params``)
        out = 1 if i == cfg.num_layers - 1 else cfg.dyn_channels
        weight = parts[i].unflatten(1, (out, cfg.weight_nums[i] // out))
        x = torch.baddbmm(parts[cfg.num_layers + i][:, :, None], weight, x)
        if i < cfg.num_layers - 1:
            x = F.relu(x)
    logits = x.reshape(n, 1, h, w)
    return aligned_bilinear(logits, head.feat_stride // head.cfg.mask_out_stride)[:, 0]


def _level_points(cls: Tensor, stride: int) -> Tensor:
    """``(H*W, 2)`` FCOS location centres ``((j + 0.5) s, (i + 0.5) s)``, row-major."""
    h, w = cls.shape[-2:]
    xs = (torch.arange(w, device=cls.device, dtype=torch.float32) + 0.5) * stride
    ys = (torch.arange(h, device=cls.device, dtype=torch.float32) + 0.5) * stride
    return torch.stack(
        [xs[None, :].expand(h, w).reshape(-1), ys[:, None].expand(h, w).reshape(-1)], 1
    )


# ---------------------------------------------------------------------------- public API


@dataclass
class ImageCheck:
    """onnxruntime against PyTorch on one validation image."""

    size: tuple[int, int]
    detections: int
    onnx_detections: int
    same_labels: bool
    box_diff: float
    score_diff: float
    mask_diff: float | None = None  # max |p_onnx - p_torch| of the mask probabilities
    mask_pixel_mismatch: int | None = None  # binary-mask pixels differing beyond the tie band

    @property
    def ok(self) -> bool:
        return (
            self.detections == self.onnx_detections
            and self.same_labels
            and self.box_diff <= 1e-3
            and self.score_diff <= 1e-3
            and (self.mask_diff is None or self.mask_diff <= 1e-3)
            and not self.mask_pixel_mismatch
        )


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how it validated."""

    path: Path
    kind: str
    input_names: list[str]
    output_names: list[str]
    dynamic: bool
    image_size: tuple[int, int] | None
    pasted_masks: bool
    checks: list[ImageCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def summary(self) -> str:
        lines = [f"{self.path}: {self.kind}, outputs {', '.join(self.output_names)}"]
        for c in self.checks:
            mask = "" if c.mask_diff is None else f", mask {c.mask_diff:.2e}"
            lines.append(
                f"  {c.size[0]}x{c.size[1]}: {c.detections} detections (onnx "
                f"{c.onnx_detections}), box {c.box_diff:.2e}, score {c.score_diff:.2e}{mask}"
                f" {'ok' if c.ok else 'MISMATCH'}"
            )
        return "\n".join(lines)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's warnings and its registry's "torchvision is not installed" notes are
    not the user's concern: instseg's ops are its own custom ops."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        registry.setLevel(level)


def export_graph(
    model: nn.Module, cfg: ExperimentConfig, category_ids: Sequence[int], pasted_masks: bool = False
) -> nn.Module:
    """The export wrapper of ``model`` (eval mode): one ``(3, H, W)`` image in, the graph's
    outputs out. Raises :class:`ExportError` naming a part that cannot be exported."""
    data = cfg.data
    preprocess = _Preprocess(data.pixel_mean, data.pixel_std, data.bgr, cfg.train.size_divisor)
    label_ids = torch.tensor([int(i) for i in category_ids], dtype=torch.long)
    if len(label_ids) != model.num_classes:
        raise ValueError(
            f"{len(label_ids)} category ids for a model of {model.num_classes} classes"
        )
    kind = type(model).__name__
    if hasattr(model, "rpn_head"):
        return _TwoStageGraph(model, preprocess, label_ids, pasted_masks).eval()
    if hasattr(model, "bbox_head") and hasattr(model.bbox_head, "strides"):
        return _CondInstGraph(model, preprocess, label_ids).eval()
    raise ExportError(f"{kind} cannot be exported")


def export_onnx(
    model: nn.Module,
    cfg: ExperimentConfig,
    categories: Sequence,
    out: str | Path,
    image_size: tuple[int, int] | None = None,
    dynamic: bool = False,
    pasted_masks: bool = False,
    validate_images: Sequence[np.ndarray] | None = None,
    num_validation_images: int = 3,
    verbose: bool = False,
) -> ExportReport:
    """Export ``model`` (built from experiment config ``cfg``; ``categories`` are its
    classes in order: ``Category`` objects or dataset ids) to ONNX at ``out`` and validate
    it with onnxruntime against ``model.predict``.

    ``image_size = (H, W)`` fixes the input size (default: the config's test scale,
    landscape); ``dynamic`` makes H and W dynamic instead. ``pasted_masks`` outputs masks
    pasted into the image instead of RoI-resolution ones. ``validate_images`` are RGB
    ``(H, W, 3)`` arrays in the network's input frame (default: ``num_validation_images``
    random images, of different sizes when ``dynamic``). ``verbose`` shows the exporter's
    steps. Raises :class:`ExportError` naming a part that cannot be exported; the report's
    ``ok`` says whether validation passed.
    """
    import onnx

    out = Path(out)
    model.eval()
    ids = [getattr(c, "id", c) for c in categories]
    graph = export_graph(model, cfg, ids, pasted_masks)
    if image_size is None:
        image_size = (min(cfg.data.test_scale), max(cfg.data.test_scale))
    h, w = (int(v) for v in image_size)
    if validate_images is not None and not dynamic:
        sizes = {tuple(a.shape[:2]) for a in validate_images}
        if sizes - {(h, w)}:
            raise ValueError(f"validation images of sizes {sorted(sizes)} for a {h}x{w} graph")
    example = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255
    dynamic_shapes = None
    if dynamic:
        # Dim.DYNAMIC, not a named Dim with a range: the exporter cannot prove every guard
        # of the FPN (level sizes) over a whole range and would give up on named dims.
        dynamic_shapes = ({1: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC},)
        if h == w:  # equal example sizes would tie the two dimensions together
            example = example[:, :, : w - 1]
    output_names = ["boxes", "scores", "labels"] + (["masks"] if model.with_masks else [])
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exportable_refinemask(), _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=["image"],
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=_onnx_translations(),
            verbose=verbose,
        )
    program.save(str(out))
    onnx.checker.check_model(str(out), full_check=True)
    report = ExportReport(
        out,
        cfg.name or type(model).__name__,
        ["image"],
        output_names,
        dynamic,
        None if dynamic else (h, w),
        pasted_masks,
    )
    if validate_images is None:
        rng = np.random.default_rng(0)
        sizes = [(h, w)] * num_validation_images
        if dynamic:
            sizes = [(h + 37 * k, w - 29 * k) for k in range(num_validation_images)]
        validate_images = [rng.uniform(0, 255, (a, b, 3)).astype(np.float32) for a, b in sizes]
    report.checks = validate(model, cfg, out, validate_images, ids, pasted_masks)
    return report


def network_input(image: np.ndarray, cfg) -> tuple[np.ndarray, tuple[float, float]]:
    """An RGB ``(H, W, 3)`` image resized to the config's test scale (as ``instseg predict``
    does) as the graph's ``(3, h, w)`` float32 input, and the ``(sy, sx)`` factors that map
    original coordinates to it (divide the graph's boxes by them to go back)."""
    from .data.transforms import rescaled_size, resize_image

    height, width = image.shape[:2]
    rounding = cfg.data.size_rounding
    new_h, new_w = rescaled_size(height, width, cfg.data.test_scale, rounding)
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return resize_image(tensor, (new_h, new_w)).numpy(), (new_h / height, new_w / width)


@torch.no_grad()
def _reference(model: nn.Module, cfg, image: Tensor, pasted: bool):
    """The model's own ``predict`` on one network-input image (RGB 0-255 ``(3, H, W)``):
    detections, and the mask probabilities its mask head gives them (RoI resolution or
    pasted into the image as the graph outputs them)."""
    from .data.loader import pad_images

    data = cfg.data
    x = image.flip(0) if data.bgr else image
    x = (x - torch.tensor(data.pixel_mean).view(3, 1, 1)) / torch.tensor(data.pixel_std).view(
        3, 1, 1
    )
    batch = pad_images([x], cfg.train.size_divisor)
    size = tuple(image.shape[-2:])
    info = ImageInfo(0, "", size, size, (1.0, 1.0))
    result = model.predict(batch, [info])[0]
    probs = None
    if model.with_masks and len(result):
        feats = model.features(batch)
        if hasattr(model, "roi_head"):
            roi_head = model.roi_head
            rois = torch.cat([result.boxes.new_zeros((len(result), 1)), result.boxes], 1)
            heads, extractors = roi_head.mask_head, roi_head.mask_roi_extractor
            if not isinstance(heads, nn.ModuleList):
                heads, extractors = [heads], [extractors]
            probs = torch.stack(
                [
                    h.predict_probs(feats, e, rois, result.labels)
                    for h, e in zip(heads, extractors, strict=True)
                ]
            ).mean(0)
            if pasted:
                probs = paste_probabilities(probs, result.boxes, *size)
        else:
            head = model.bbox_head
            dets = head.predict(head(feats), batch.image_sizes)[0]
            logits = model.mask_head.dynamic_logits(
                model.mask_head.mask_feature_head(feats),
                torch.zeros(len(dets.boxes), dtype=torch.long),
                dets.params,
                dets.points,
                dets.strides,
            )
            stride = model.mask_head.cfg.mask_out_stride
            probs = aligned_bilinear(logits.sigmoid()[None], stride)[0, :, : size[0], : size[1]]
    return result, probs


def validate(
    model: nn.Module,
    cfg,
    onnx_path: str | Path,
    images: Sequence[np.ndarray],
    category_ids: Sequence[int],
    pasted_masks: bool,
) -> list[ImageCheck]:
    """Run the exported graph with onnxruntime (CPU) on RGB ``(H, W, 3)`` ``images`` and
    :func:`compare` each result with the model's own ``predict``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    checks = []
    for array in images:
        image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)
        outputs = session.run(None, {"image": image.contiguous().numpy()})
        outputs = [torch.from_numpy(o) for o in outputs]
        checks.append(compare(model, cfg, image, outputs, category_ids, pasted_masks))
    return checks


def compare(
    model: nn.Module,
    cfg,
    image: Tensor,
    outputs: Sequence[Tensor],
    category_ids: Sequence[int],
    pasted_masks: bool,
) -> ImageCheck:
    """The graph's ``outputs`` (boxes, scores, labels[, masks]) for one RGB ``(3, H, W)``
    image against the model's own ``predict``: detection count and labels, max abs
    difference of boxes, scores and mask probabilities, and (mask models) binary-mask
    pixels that differ where the probability is not within 1e-3 of the threshold."""
    boxes, scores, labels = outputs[:3]
    ids = torch.tensor([int(i) for i in category_ids])
    result, ref_probs = _reference(model, cfg, image, pasted_masks)
    n = min(len(result), len(boxes))
    same_labels = len(result) == len(boxes) and bool((ids[result.labels] == labels).all())
    check = ImageCheck(
        tuple(image.shape[-2:]),
        len(result),
        len(boxes),
        same_labels,
        _max_diff(boxes[:n], result.boxes[:n]),
        _max_diff(scores[:n], result.scores[:n]),
    )
    if not model.with_masks:
        return check
    probs = outputs[3]
    check.mask_diff = _max_diff(probs[:n], ref_probs[:n]) if ref_probs is not None else 0.0
    check.mask_pixel_mismatch = 0
    torchvision_paste = getattr(getattr(model, "roi_head", None), "cfg", None)
    torchvision_paste = getattr(torchvision_paste, "mask_paste", "") == "torchvision"
    if n and result.masks is not None and not torchvision_paste:
        full = probs[:n]
        if full.shape[-2:] != image.shape[-2:]:
            full = paste_probabilities(full, boxes[:n], *image.shape[-2:])
        thr = _mask_threshold(model)
        # Mask R-CNN's paste keeps p >= thr, CondInst p > thr.
        binary = full >= thr if hasattr(model, "roi_head") else full > thr
        near = (full - thr).abs() <= 1e-3
        check.mask_pixel_mismatch = int(((binary != result.masks[:n]) & ~near).sum())
    return check


def _mask_threshold(model: nn.Module) -> float:
    if hasattr(model, "roi_head"):
        return model.roi_head.cfg.mask_thr
    return model.mask_head.cfg.mask_thr


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


__all__ = [
    "ExportError",
    "ExportReport",
    "ImageCheck",
    "compare",
    "export_graph",
    "export_onnx",
    "network_input",
    "paste_probabilities",
    "validate",
]
