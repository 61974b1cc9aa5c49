"""FCOS (Tian et al., ICCV 2019) as mmdet's ``FCOSHead`` with the "tricks" of its
center-normbbox-centeronreg-giou config and of CondInst's box head (spec §4.3).

At every location of every level (one shared head): two towers of 3x3 convs (GroupNorm,
ReLU), a class logit per class from the cls tower, four distances (left, top, right, bottom)
times a learnable per-level scale from the reg tower, a centerness logit (from the reg tower
with ``centerness_on_reg``) and, for CondInst, the dynamic mask head's parameters from the
reg tower (the "controller", as wide as the mask head asks).

Targets (:func:`fcos_targets`): a location is positive for a GT when it lies inside the GT
box, or, with centre sampling, strictly inside ``centre +- radius * stride`` clipped to the
box (the centre is the GT mask's centroid with ``center_from_mask``, as CondInst, when the
data has masks; the box centre otherwise), and when its largest
distance to the box sides lies in its level's regress range; among several GTs the smallest
box area wins, the first on ties. Losses: sigmoid focal loss over all locations / #positives,
GIoU on positives weighted by the centerness target / sum of those targets, centerness BCE /
#positives. Test: per level the top ``nms_pre`` (location, class) pairs above ``score_thr``,
boxes decoded and clipped to the image, score x sigmoid(centerness), class-wise NMS, the best
``max_per_image``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...layers import ConvModule
from ...ops import batched_nms, clip_boxes_to_image
from ...structures import InstanceTargets
from ..features import Features, FeatureSpec, common_width, select_specs
from ..global_batch import normaliser
from ..losses import average, giou_loss, sigmoid_focal_loss

INF = 1e8


@dataclass
class FCOSHeadConfig:
    """The FCOS head. ``levels`` are the neck levels it reads (None: all); one
    ``regress_ranges`` entry per level."""

    levels: tuple[str, ...] | None = None
    stacked_convs: int = 4
    feat_channels: int = 256
    norm: str | None = "GN"
    num_groups: int = 32
    conv_bias: bool = True
    regress_ranges: tuple[tuple[float, float], ...] = field(
        default_factory=lambda: (
            (-1.0, 64.0),
            (64.0, 128.0),
            (128.0, 256.0),
            (256.0, 512.0),
            (512.0, INF),
        )
    )
    center_sampling: bool = True
    center_sample_radius: float = 1.5
    # CondInst samples around the GT mask's centroid; plain FCOS around the box centre.
    center_from_mask: bool = False
    norm_on_bbox: bool = True
    centerness_on_reg: bool = True
    prior_prob: float = 0.01
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 1.0
    loss_centerness_weight: float = 1.0
    score_thr: float = 0.05
    nms_pre: int = 1000
    nms_iou: float = 0.6
    max_per_image: int = 100

    def __post_init__(self) -> None:
        for name in ("stacked_convs",):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(
                    f"bbox_head.{name} must be a non-negative int, got {getattr(self, name)!r}"
                )
        for name in ("feat_channels", "nms_pre", "max_per_image"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(
                    f"bbox_head.{name} must be a positive int, got {getattr(self, name)!r}"
                )
        if not 0 < self.prior_prob < 1:
            raise ValueError(f"bbox_head.prior_prob must be in (0, 1), got {self.prior_prob}")
        if any(len(r) != 2 or r[0] > r[1] for r in self.regress_ranges):
            raise ValueError(
                f"bbox_head.regress_ranges must be (low, high) pairs, got {self.regress_ranges!r}"
            )


class Scale(nn.Module):
    """A learnable scalar factor (mmcv ``Scale``: parameter ``scale``)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value, dtype=torch.float))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


@dataclass
class HeadOutputs:
    """Per level ``(B, C, H, W)`` class logits, ``(B, 4, H, W)`` distances (stride units with
    ``norm_on_bbox``, clamped at 0), ``(B, 1, H, W)`` centerness logits and, for CondInst,
    ``(B, P, H, W)`` controller outputs."""

    cls: list[Tensor]
    bbox: list[Tensor]
    centerness: list[Tensor]
    params: list[Tensor] | None


@dataclass
class Positives:
    """The positive locations of one image, in location order: ``index`` into the image's
    locations (level-major, row-major), the GT each is assigned to, its point ``(x, y)``,
    level stride, and (CondInst) its ``(P,)`` controller outputs."""

    index: Tensor
    gt_index: Tensor
    points: Tensor
    strides: Tensor
    params: Tensor | None


@dataclass
class Detections:
    """One image's detections in the network-input frame, with what a mask head needs."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    points: Tensor
    strides: Tensor
    params: Tensor | None


def level_points(
    size: tuple[int, int], stride: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``(H*W, 2)`` location centres ``((j + 0.5) s, (i + 0.5) s)``, row-major."""
    h, w = size
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * stride
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)


def distance_to_box(
    points: Tensor, distances: Tensor, max_shape: tuple[int, int] | None = None
) -> Tensor:
    """xyxy boxes from ``(N, 2)`` points and ``(N, 4)`` (left, top, right, bottom) distances,
    clipped to ``max_shape = (h, w)`` when given."""
    boxes = torch.stack(
        [
            points[:, 0] - distances[:, 0],
            points[:, 1] - distances[:, 1],
            points[:, 0] + distances[:, 2],
            points[:, 1] + distances[:, 3],
        ],
        1,
    )
    return boxes if max_shape is None else clip_boxes_to_image(boxes, max_shape)


def mask_centroids(masks: Tensor, dtype: torch.dtype) -> Tensor:
    """``(G, 2)`` centroids ``(sum m x / sum m, sum m y / sum m)`` of ``(G, H, W)`` bitmaps, on
    integer pixel indices (mmdet/AdelaiDet; the mass clamped below at 1e-6)."""
    h, w = masks.shape[-2:]
    m = masks.to(dtype)
    xs = torch.arange(w, dtype=dtype, device=masks.device)
    ys = torch.arange(h, dtype=dtype, device=masks.device)
    mass = masks.sum(dim=-1).sum(dim=-1).clamp(min=1e-6).to(dtype)
    cx = (m * xs).sum(dim=-1).sum(dim=-1) / mass
    cy = (m * ys[:, None]).sum(dim=-1).sum(dim=-1) / mass
    return torch.stack([cx, cy], 1)


def fcos_targets(
    points: Tensor,
    strides: Tensor,
    ranges: Tensor,
    gt_boxes: Tensor,
    centres: Tensor | None,
    center_sampling: bool,
    radius: float,
) -> tuple[Tensor, Tensor]:
    """FCOS assignment of one image's ``(N, 2)`` points (with their level ``strides (N,)``
    and regress ``ranges (N, 2)``) to ``(G, 4)`` GT boxes.

    ``centres (G, 2)`` are the sampling centres (mask centroids); None uses the box centres.
    Returns the assigned GT per point (``-1``: background) and the ``(N, 4)`` pixel distances
    (left, top, right, bottom) to the assigned box (to GT 0 for background points).
    """
    n, g = points.shape[0], gt_boxes.shape[0]
    if g == 0:
        return points.new_full((n,), -1, dtype=torch.long), points.new_zeros((n, 4))
    areas = ((gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1]))[None].expand(
        n, g
    )
    xs, ys = points[:, 0, None], points[:, 1, None]
    box = gt_boxes[None].expand(n, g, 4)
    distances = torch.stack(
        [xs - box[..., 0], ys - box[..., 1], box[..., 2] - xs, box[..., 3] - ys], -1
    )  # (N, G, 4)
    if center_sampling:
        if centres is None:
            cx = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2
            cy = (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2
        else:
            cx, cy = centres[:, 0], centres[:, 1]
        reach = (strides * radius)[:, None]
        x_min, y_min = cx[None] - reach, cy[None] - reach
        x_max, y_max = cx[None] + reach, cy[None] + reach
        cb_x1 = torch.where(x_min > box[..., 0], x_min, box[..., 0])
        cb_y1 = torch.where(y_min > box[..., 1], y_min, box[..., 1])
        cb_x2 = torch.where(x_max > box[..., 2], box[..., 2], x_max)
        cb_y2 = torch.where(y_max > box[..., 3], box[..., 3], y_max)
        inside = torch.stack([xs - cb_x1, ys - cb_y1, cb_x2 - xs, cb_y2 - ys], -1).amin(-1) > 0
    else:
        inside = distances.amin(-1) > 0
    largest = distances.amax(-1)
    in_range = (largest >= ranges[:, 0, None]) & (largest <= ranges[:, 1, None])
    areas = torch.where(inside & in_range, areas, areas.new_tensor(INF))
    min_area, best = areas.min(dim=1)
    assigned = torch.where(min_area == INF, torch.full_like(best, -1), best)
    return assigned, distances[torch.arange(n, device=points.device), best]


def centerness_target(distances: Tensor) -> Tensor:
    """``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` of ``(N, 4)`` distances."""
    lr = distances[:, [0, 2]]
    tb = distances[:, [1, 3]]
    if lr.shape[0] == 0:
        return lr[:, 0]
    ratio = (lr.amin(-1) / lr.amax(-1)) * (tb.amin(-1) / tb.amax(-1))
    return ratio.sqrt()


class FCOSHead(nn.Module):
    """The FCOS head over ``in_specs`` (one set of weights for every level). Parameter names
    are mmdet's (``cls_convs.{i}.conv``/``.gn``, ``conv_cls``, ``conv_reg``,
    ``conv_centerness``, ``scales.{l}.scale``, ``controller``)."""

    def __init__(
        self,
        cfg: FCOSHeadConfig,
        in_specs: list[FeatureSpec],
        num_classes: int,
        num_params: int = 0,
    ) -> None:
        """``num_params > 0`` adds the controller (CondInst: the mask head's parameter count)."""
        super().__init__()
        if cfg.levels is not None:
            in_specs = select_specs(in_specs, cfg.levels, "bbox_head.levels")
        if len(cfg.regress_ranges) != len(in_specs):
            raise ValueError(
                f"bbox_head.regress_ranges has {len(cfg.regress_ranges)} entries for "
                f"{len(in_specs)} levels {[s.name for s in in_specs]}"
            )
        self.cfg = cfg
        self.num_classes = num_classes
        self.levels = [s.name for s in in_specs]
        self.strides = [s.stride for s in in_specs]
        in_channels = common_width(in_specs, "the FCOS head")

        def tower() -> nn.ModuleList:
            return nn.ModuleList(
                ConvModule(
                    in_channels if i == 0 else cfg.feat_channels,
                    cfg.feat_channels,
                    3,
                    padding=1,
                    bias=cfg.conv_bias,
                    norm=cfg.norm,
                    num_groups=cfg.num_groups,
                )
                for i in range(cfg.stacked_convs)
            )

        self.cls_convs = tower()
        self.reg_convs = tower()
        width = cfg.feat_channels if cfg.stacked_convs > 0 else in_channels
        self.conv_cls = nn.Conv2d(width, num_classes, 3, padding=1)
        self.conv_reg = nn.Conv2d(width, 4, 3, padding=1)
        self.conv_centerness = nn.Conv2d(width, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in in_specs)
        self.controller = nn.Conv2d(width, num_params, 3, padding=1) if num_params > 0 else None
        # mmdet: Normal(0, 0.01) on every conv of the head, bias 0; the class bias at the prior.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.conv_cls.bias, -math.log((1 - cfg.prior_prob) / cfg.prior_prob))

    def forward(self, feats: Features) -> HeadOutputs:
        cls, bbox, centerness, params = [], [], [], []
        for name, scale in zip(self.levels, self.scales, strict=True):
            cls_feat = reg_feat = feats[name]
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            cls.append(self.conv_cls(cls_feat))
            distances = scale(self.conv_reg(reg_feat)).float()
            bbox.append(distances.clamp(min=0) if self.cfg.norm_on_bbox else distances.exp())
            centerness.append(
                self.conv_centerness(reg_feat if self.cfg.centerness_on_reg else cls_feat)
            )
            if self.controller is not None:
                params.append(self.controller(reg_feat))
        return HeadOutputs(cls, bbox, centerness, params if self.controller is not None else None)

    def points(self, outputs: HeadOutputs) -> tuple[Tensor, Tensor, Tensor]:
        """All levels' ``(N, 2)`` points, their ``(N,)`` strides and ``(N, 2)`` regress ranges."""
        ref = outputs.cls[0]
        pts, strides, ranges = [], [], []
        for x, stride, rng in zip(outputs.cls, self.strides, self.cfg.regress_ranges, strict=True):
            p = level_points(tuple(x.shape[-2:]), stride, ref.device, ref.dtype)
            pts.append(p)
            strides.append(p.new_full((p.shape[0],), float(stride)))
            ranges.append(p.new_tensor(rng).expand(p.shape[0], 2))
        return torch.cat(pts), torch.cat(strides), torch.cat(ranges)

    @staticmethod
    def _flatten(maps: list[Tensor]) -> Tensor:
        """Per-level ``(B, K, H, W)`` -> ``(B, N, K)`` in location order."""
        return torch.cat(
            [m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], 1
        )

    def loss(
        self, outputs: HeadOutputs, targets: list[InstanceTargets]
    ) -> tuple[dict[str, Tensor], list[Positives]]:
        """The FCOS losses of a batch, and each image's positives (for a mask head).

        With ``center_from_mask`` the sampling centres are the centroids of the targets'
        masks (the detector pads them to the batch shape, as mmdet's CondInst does)."""
        cfg = self.cfg
        points, strides, ranges = self.points(outputs)
        cls = self._flatten(outputs.cls)
        bbox = self._flatten(outputs.bbox)
        ctr = self._flatten(outputs.centerness)[..., 0]
        params = None if outputs.params is None else self._flatten(outputs.params)
        labels, positives = [], []
        pos_bbox, pos_targets, pos_ctr, pos_points = [], [], [], []
        for i, target in enumerate(targets):
            centres = None
            if cfg.center_from_mask and target.masks is not None and len(target) > 0:
                centres = mask_centroids(target.masks, points.dtype)
            assigned, distances = fcos_targets(
                points,
                strides,
                ranges,
                target.boxes.to(points.dtype),
                centres,
                cfg.center_sampling,
                cfg.center_sample_radius,
            )
            image_labels = torch.full_like(assigned, self.num_classes)
            pos = torch.nonzero(assigned >= 0).squeeze(1)
            image_labels[pos] = target.labels[assigned[pos]]
            labels.append(image_labels)
            dist = distances[pos]
            if cfg.norm_on_bbox:
                dist = dist / strides[pos, None]
            pos_bbox.append(bbox[i, pos])
            pos_targets.append(dist)
            pos_ctr.append(ctr[i, pos])
            pos_points.append(points[pos])
            positives.append(
                Positives(
                    pos,
                    assigned[pos],
                    points[pos],
                    strides[pos],
                    None if params is None else params[i, pos],
                )
            )
        labels_t = torch.cat(labels)
        num_pos = normaliser(float(sum(len(p.index) for p in positives)), minimum=1.0)
        loss_cls = average(
            sigmoid_focal_loss(
                cls.reshape(-1, self.num_classes), labels_t, cfg.focal_alpha, cfg.focal_gamma
            ),
            num_pos,
        )
        pred, tgt = torch.cat(pos_bbox), torch.cat(pos_targets)
        pos_ctr_t, pts = torch.cat(pos_ctr), torch.cat(pos_points)
        ctr_targets = centerness_target(tgt)
        # Computed on every rank, whatever its positives: the reduction is collective.
        ctr_denom = normaliser(float(ctr_targets.sum().detach()), minimum=1e-6)
        if pred.shape[0] > 0:
            giou = giou_loss(distance_to_box(pts, pred), distance_to_box(pts, tgt))
            if bool((ctr_targets > 0).any()):
                loss_bbox = average(giou * ctr_targets, ctr_denom)
            else:
                loss_bbox = (pred * ctr_targets[:, None]).sum()
            loss_ctr = average(
                F.binary_cross_entropy_with_logits(pos_ctr_t, ctr_targets, reduction="none"),
                num_pos,
            )
        else:
            loss_bbox, loss_ctr = pred.sum(), pos_ctr_t.sum()
        losses = {
            "loss_cls": cfg.loss_cls_weight * loss_cls,
            "loss_bbox": cfg.loss_bbox_weight * loss_bbox,
            "loss_centerness": cfg.loss_centerness_weight * loss_ctr,
        }
        return losses, positives

    @torch.no_grad()
    def predict(self, outputs: HeadOutputs, image_sizes: list[tuple[int, int]]) -> list[Detections]:
        """Detections per image in the network-input frame (boxes clipped to each image)."""
        cfg = self.cfg
        results = []
        for i, image_size in enumerate(image_sizes):
            boxes, scores, labels, pts, strides, params = [], [], [], [], [], []
            for level, stride in enumerate(self.strides):
                cls = outputs.cls[level][i]
                score = cls.permute(1, 2, 0).reshape(-1, self.num_classes).sigmoid()
                dist = outputs.bbox[level][i].permute(1, 2, 0).reshape(-1, 4)
                if cfg.norm_on_bbox:
                    dist = dist * stride
                ctr = outputs.centerness[level][i].reshape(-1).sigmoid()
                points = level_points(tuple(cls.shape[-2:]), stride, cls.device, dist.dtype)
                valid = score > cfg.score_thr
                candidates = torch.nonzero(valid)
                kept, order = score[valid].sort(descending=True, stable=True)
                kept, top = kept[: cfg.nms_pre], order[: cfg.nms_pre]
                point_index, label = candidates[top].unbind(1)
                boxes.append(distance_to_box(points[point_index], dist[point_index], image_size))
                scores.append(kept * ctr[point_index])
                labels.append(label)
                pts.append(points[point_index])
                strides.append(torch.full_like(kept, float(stride)))
                if outputs.params is not None:
                    p = outputs.params[level][i]
                    params.append(p.permute(1, 2, 0).reshape(-1, p.shape[0])[point_index])
            det = Detections(
                torch.cat(boxes),
                torch.cat(scores),
                torch.cat(labels),
                torch.cat(pts),
                torch.cat(strides),
                torch.cat(params) if params else None,
            )
            w = det.boxes[:, 2] - det.boxes[:, 0]
            h = det.boxes[:, 3] - det.boxes[:, 1]
            keep = torch.nonzero((w > 0) & (h > 0)).squeeze(1)
            keep = keep[
                batched_nms(det.boxes[keep], det.scores[keep], det.labels[keep], cfg.nms_iou)
            ]
            results.append(_select(det, keep[: cfg.max_per_image]))
        return results


def _select(det: Detections, index: Tensor) -> Detections:
    return Detections(
        det.boxes[index],
        det.scores[index],
        det.labels[index],
        det.points[index],
        det.strides[index],
        None if det.params is None else det.params[index],
    )
