"""Grid R-CNN (Lu et al., CVPR 2019, with Grid R-CNN Plus's sub-regions): mmdetection 3.3's
``GridRoIHead`` + ``GridHead`` (spec §11).

The box head only classifies (no regression); the box of each detection is re-located by a
3x3 grid of keypoints predicted as heatmaps from its 14x14 RoI features:

- ``GridHead``: 8 GN convs (the first with stride 2) to 9 blocks of ``point_feat_channels``,
  one per grid point; first- and second-order fusion between 4-neighbouring points
  (each directed edge a depthwise 5x5 + 1x1 conv); two grouped deconvs to 9 heatmaps of
  28x28, each covering a 28x28 sub-window of a 56x56 map of the RoI expanded 2x;
- training: the box classification loss on the sampled RoIs, then the positives are jittered
  (amplitude 0.15, global RNG, clipped to the image), at most ``max_num_grid`` of them
  (random permutation) get heatmap targets (a plus of radius 1 at each GT grid point) and
  ``loss_grid = w * BCE(fused) + w * BCE(unfused)``;
- test: classification scores on the proposals, per-class NMS of the proposal boxes, then each
  detection's box edges are the probability-weighted means of its edge points' argmax
  positions.

Quirk kept: mmdet's clamp of the refined boxes to the image is a no-op (an in-place clamp of an
advanced-indexing copy), so they are not clamped; ``clamp_refined_boxes=True`` clamps them
as intended. Parameter names follow mmdet (``roi_head.grid_head.convs.0.conv``,
``...convs.0.gn``, ``forder_trans.i.j``, ``sorder_trans.i.j``, ``deconv1``, ``norm1``,
``deconv2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import clip_boxes_to_image
from ...structures import ImageInfo, Instances, InstanceTargets, TrainingContext
from ..anchors import AssignerConfig, SamplerConfig
from ..features import Features, FeatureSpec
from ..global_batch import binary_cross_entropy, random_subset, syncing
from .extractor import RoIExtractorChoice, RoIExtractorConfig, build_roi_extractor
from .heads import BoxHeadConfig, Shared2FCBoxHead
from .sampling import boxes_to_rois, sample_rois
from .standard import check_detection_settings, detect

GRID_SIZE = 3
GRID_POINTS = GRID_SIZE * GRID_SIZE


def grid_neighbours() -> list[tuple[int, ...]]:
    """Point ``i = 3 * x_idx + y_idx``'s 4-neighbours in the order left, up, down, right."""
    out = []
    for i in range(GRID_POINTS):
        x, y = divmod(i, GRID_SIZE)
        n = []
        if x > 0:
            n.append(i - GRID_SIZE)
        if y > 0:
            n.append(i - 1)
        if y < GRID_SIZE - 1:
            n.append(i + 1)
        if x < GRID_SIZE - 1:
            n.append(i + GRID_SIZE)
        out.append(tuple(n))
    return out


def sub_regions(whole: int) -> list[tuple[int, int]]:
    """Top-left ``(x, y)`` of each point's ``whole // 4 * 2`` sub-window of the whole map."""
    half = whole // 4 * 2

    def offset(idx: int) -> int:
        if idx == 0:
            return 0
        if idx == GRID_SIZE - 1:
            return half
        return max(int((idx / (GRID_SIZE - 1) - 0.25) * whole), 0)

    return [(offset(i // GRID_SIZE), offset(i % GRID_SIZE)) for i in range(GRID_POINTS)]


@dataclass
class GridHeadConfig:
    """``GridHead`` (mmdet defaults): ``roi_size`` is what its extractor pools (14);
    ``num_groups`` the GroupNorm groups of the convs; ``loss_weight`` multiplies each BCE;
    ``pos_radius``, ``max_num_grid`` and ``jitter`` are the training settings."""

    roi_size: int = 14
    num_convs: int = 8
    point_feat_channels: int = 64
    num_groups: int = 36
    loss_weight: float = 15.0
    pos_radius: int = 1
    max_num_grid: int = 192
    jitter: float = 0.15
    clamp_refined_boxes: bool = False

    def __post_init__(self) -> None:
        key = "roi_head.grid_head"
        for name in ("roi_size", "num_convs", "point_feat_channels", "num_groups", "max_num_grid"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{key}.{name} must be positive, got {getattr(self, name)}")
        if (self.point_feat_channels * GRID_POINTS) % self.num_groups:
            raise ValueError(
                f"{key}.num_groups ({self.num_groups}) must divide 9 x point_feat_channels "
                f"({self.point_feat_channels * GRID_POINTS})"
            )
        if self.pos_radius < 0 or not 0 <= self.jitter < 1:
            raise ValueError(f"{key}: pos_radius must be >= 0 and jitter in [0, 1)")


class _ConvGN(nn.Module):
    """mmcv ConvModule(conv with bias, GN, ReLU): names ``conv`` and ``gn``."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.gn = nn.GroupNorm(groups, cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.gn(self.conv(x)))


def _transition(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 5, padding=2, groups=channels),
        nn.Conv2d(channels, channels, 1),
    )


class GridHead(nn.Module):
    """RoI features ``(N, C, 14, 14)`` -> heatmap logits ``(N, 9, 28, 28)``: fused (and, in
    training, unfused)."""

    def __init__(self, cfg: GridHeadConfig, in_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.point_feat_channels
        width = c * GRID_POINTS
        self.whole_map_size = cfg.roi_size * 4
        self.sub_regions = sub_regions(self.whole_map_size)
        self.neighbours = grid_neighbours()
        self.convs = nn.Sequential(
            *(
                _ConvGN(in_channels if i == 0 else width, width, 2 if i == 0 else 1, cfg.num_groups)
                for i in range(cfg.num_convs)
            )
        )
        self.forder_trans = nn.ModuleList(
            nn.ModuleList(_transition(c) for _ in n) for n in self.neighbours
        )
        self.sorder_trans = nn.ModuleList(
            nn.ModuleList(_transition(c) for _ in n) for n in self.neighbours
        )
        self.deconv1 = nn.ConvTranspose2d(width, width, 4, stride=2, padding=1, groups=GRID_POINTS)
        self.norm1 = nn.GroupNorm(GRID_POINTS, width)
        self.deconv2 = nn.ConvTranspose2d(
            width, GRID_POINTS, 4, stride=2, padding=1, groups=GRID_POINTS
        )
        # The edges as (target point, source point), in the modules' order.
        self.edges = [(i, j) for i, n in enumerate(self.neighbours) for j in n]
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, std=0.001)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.deconv2.bias, -math.log(0.99 / 0.01))

    def _fuse(self, x: Tensor, sources: Tensor, transitions: nn.ModuleList) -> Tensor:
        """``x_i + sum over i's neighbours j of T_ij(sources_j)``, every edge at once: the
        edges' depthwise and 1x1 convs run as one grouped conv each."""
        c = self.cfg.point_feat_channels
        n, _, h, w = x.shape
        targets = torch.tensor([i for i, _ in self.edges], device=x.device)
        source_index = torch.tensor([j for _, j in self.edges], device=x.device)
        blocks = sources.view(n, GRID_POINTS, c, h, w)[:, source_index]  # (N, E, c, h, w)
        mods = [t for per_point in transitions for t in per_point]
        dw_w = torch.cat([m[0].weight for m in mods])
        dw_b = torch.cat([m[0].bias for m in mods])
        pw_w = torch.cat([m[1].weight for m in mods])
        pw_b = torch.cat([m[1].bias for m in mods])
        edges = len(mods)
        y = F.conv2d(blocks.reshape(n, edges * c, h, w), dw_w, dw_b, padding=2, groups=edges * c)
        y = F.conv2d(y, pw_w, pw_b, groups=edges).view(n, edges, c, h, w)
        out = x.view(n, GRID_POINTS, c, h, w).clone()
        out.index_add_(1, targets, y)
        return out.view(n, GRID_POINTS * c, h, w)

    def _heatmaps(self, x: Tensor) -> Tensor:
        return self.deconv2(F.relu(self.norm1(self.deconv1(x))))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.convs(x)
        first = self._fuse(x, x, self.forder_trans)
        second = self._fuse(x, first, self.sorder_trans)
        fused = self._heatmaps(second)
        return fused, (self._heatmaps(x) if self.training else None)

    def targets(self, rois: Tensor, gt_boxes: Tensor) -> Tensor:
        """``(N, 9, 28, 28)`` targets of (jittered) boxes ``rois`` for their GT boxes: on the
        56x56 map of each RoI expanded 2x, the pixels within ``pos_radius`` of
        ``trunc((gt_point - E_x1) / w_E * 56)`` (likewise y), cropped to each point's
        sub-window; all zero for an expanded RoI of side <= 3."""
        size = self.whole_map_size
        half = size // 4 * 2
        w = rois[:, 2] - rois[:, 0]
        h = rois[:, 3] - rois[:, 1]
        ex1, ey1 = rois[:, 0] - w / 2, rois[:, 1] - h / 2
        ew = (rois[:, 2] + w / 2) - ex1
        eh = (rois[:, 3] + h / 2) - ey1
        fx = torch.tensor([1 - (i // GRID_SIZE) / (GRID_SIZE - 1) for i in range(GRID_POINTS)])
        fy = torch.tensor([1 - (i % GRID_SIZE) / (GRID_SIZE - 1) for i in range(GRID_POINTS)])
        fx, fy = fx.to(rois), fy.to(rois)
        px = fx * gt_boxes[:, 0:1] + (1 - fx) * gt_boxes[:, 2:3]  # (N, 9)
        py = fy * gt_boxes[:, 1:2] + (1 - fy) * gt_boxes[:, 3:4]
        cx = ((px - ex1[:, None]) / ew[:, None] * size).trunc().long()
        cy = ((py - ey1[:, None]) / eh[:, None] * size).trunc().long()
        offsets = torch.tensor(self.sub_regions, device=rois.device)  # (9, 2) x, y
        cols = offsets[:, 0, None] + torch.arange(half, device=rois.device)  # (9, 28)
        rows = offsets[:, 1, None] + torch.arange(half, device=rois.device)
        dx = cols[None] - cx[..., None]  # (N, 9, 28)
        dy = rows[None] - cy[..., None]
        inside = (dy[..., :, None] ** 2 + dx[..., None, :] ** 2) <= self.cfg.pos_radius**2
        valid = (ew > GRID_SIZE) & (eh > GRID_SIZE)
        return (inside & valid[:, None, None, None]).to(rois.dtype)

    def decode(self, heatmaps: Tensor, boxes: Tensor) -> Tensor:
        """Boxes from fused heatmap logits ``(R, 9, 28, 28)`` of detections ``boxes``: each
        point at its argmax (+ its sub-window offset, pixel centre) in the 56x56 map of the
        box expanded 2x, weighted by its max probability along each edge."""
        r, c, h, w = heatmaps.shape
        probs = heatmaps.sigmoid().view(r, c, h * w)
        scores, position = probs.max(dim=2)
        offsets = torch.tensor(self.sub_regions, device=boxes.device)
        xs = position % w + offsets[:, 0]
        ys = position // w + offsets[:, 1]
        widths = (boxes[:, 2] - boxes[:, 0])[:, None]
        heights = (boxes[:, 3] - boxes[:, 1])[:, None]
        abs_x = (xs.to(boxes.dtype) + 0.5) / w * widths + (boxes[:, 0, None] - widths / 2)
        abs_y = (ys.to(boxes.dtype) + 0.5) / h * heights + (boxes[:, 1, None] - heights / 2)
        edges = (
            (abs_x, [0, 1, 2]),
            (abs_y, [0, 3, 6]),
            (abs_x, [6, 7, 8]),
            (abs_y, [2, 5, 8]),
        )
        return torch.stack(
            [(v[:, i] * scores[:, i]).sum(1) / scores[:, i].sum(1) for v, i in edges], 1
        )


@dataclass
class GridRoIHeadConfig:
    """Grid R-CNN's RoI head (``kind="grid"``): a classification-only box branch
    (``box_head.with_reg=False``) and the grid branch with its own extractor; the
    defaults are mmdet's ``grid-rcnn_r50_fpn_gn-head`` configs (test score 0.03, NMS 0.3)."""

    kind: Literal["grid"] = "grid"
    box_extractor: RoIExtractorChoice = field(default_factory=RoIExtractorConfig)
    box_head: BoxHeadConfig = field(default_factory=lambda: BoxHeadConfig(with_reg=False))
    grid_extractor: RoIExtractorChoice = field(default_factory=RoIExtractorConfig)
    grid_head: GridHeadConfig = field(default_factory=GridHeadConfig)
    assigner: AssignerConfig = field(
        default_factory=lambda: AssignerConfig(0.5, 0.5, 0.5, match_low_quality=True)
    )
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    score_thr: float = 0.03
    nms_iou: float = 0.3
    max_per_image: int = 100
    mask_thr: float = 0.5  # unused: Grid R-CNN predicts no masks
    min_box_size: float = 0.0
    mask_paste: str = "grid_sample"  # unused

    mask_head = None  # box-only: the detector has no masks

    def __post_init__(self) -> None:
        if self.box_head.with_reg:
            raise ValueError("roi_head.box_head.with_reg must be false for Grid R-CNN")
        check_detection_settings(self)

    def build(self, in_specs: list[FeatureSpec], num_classes: int) -> GridRoIHead:
        return GridRoIHead(self, in_specs, num_classes)


class GridRoIHead(nn.Module):
    with_mask = False

    def __init__(self, cfg: GridRoIHeadConfig, in_specs: list[FeatureSpec], num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.bbox_roi_extractor = build_roi_extractor(
            cfg.box_extractor, in_specs, cfg.box_head.roi_size
        )
        self.bbox_head = Shared2FCBoxHead(
            cfg.box_head, self.bbox_roi_extractor.out_channels, num_classes
        )
        self.grid_roi_extractor = build_roi_extractor(
            cfg.grid_extractor, in_specs, cfg.grid_head.roi_size
        )
        self.grid_head = GridHead(cfg.grid_head, self.grid_roi_extractor.out_channels)

    def loss(
        self,
        feats: Features,
        proposals: list[Tensor],
        targets: list[InstanceTargets],
        image_sizes: list[tuple[int, int]],
        context: TrainingContext | None = None,
    ) -> dict[str, Tensor]:
        """``loss_cls`` on the sampled RoIs; ``loss_grid`` on at most ``max_num_grid``
        jittered positives (none when the batch has no positive)."""
        cfg = self.cfg
        sampled = sample_rois(proposals, targets, cfg.assigner, cfg.sampler, self.num_classes)
        cls_score, bbox_pred = self.bbox_head(self.bbox_roi_extractor(feats, sampled.rois))
        losses = self.bbox_head.loss(cls_score, bbox_pred, sampled)
        jittered = [
            jitter_boxes(b, cfg.grid_head.jitter, size, generator=t.generator("grid.jitter"))
            for b, size, t in zip(sampled.pos_boxes, image_sizes, targets, strict=True)
        ]
        rois = boxes_to_rois(jittered)
        if rois.shape[0] == 0 and not syncing():
            return losses  # no positive in the batch
        # Across ranks the positives of the global batch are subsampled together, and a
        # rank left with none still runs the head (DDP reduces every parameter's gradient).
        keep = random_subset(
            rois.shape[0],
            cfg.grid_head.max_num_grid,
            None if context is None else context.generator("grid.subset"),
            rois.device,
        )
        fused, unfused = self.grid_head(self.grid_roi_extractor(feats, rois[keep]))
        assert unfused is not None
        gt = torch.cat(sampled.pos_gt_boxes)[keep]
        target = self.grid_head.targets(rois[keep, 1:], gt)
        weight = cfg.grid_head.loss_weight
        losses["loss_grid"] = weight * binary_cross_entropy(
            fused, target
        ) + weight * binary_cross_entropy(unfused, target)
        return losses

    @torch.no_grad()
    def predict(
        self,
        feats: Features,
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        infos: list[ImageInfo] | None = None,
    ) -> list[Instances]:
        """Classify the proposals, NMS their boxes per class, then re-locate each kept box
        from its grid heatmaps (before rescaling to the original frame)."""
        rois = boxes_to_rois(proposals)
        cls_score, _ = self.bbox_head(self.bbox_roi_extractor(feats, rois))
        scores = F.softmax(cls_score, dim=1)[:, : self.num_classes]
        counts = [p.shape[0] for p in proposals]
        boxes = [p[:, None, :].expand(-1, self.num_classes, 4) for p in proposals]

        def refine(results: list[Instances]) -> None:
            det_rois = boxes_to_rois([r.boxes for r in results])
            if det_rois.shape[0] == 0:
                return
            fused, _ = self.grid_head(self.grid_roi_extractor(feats, det_rois))
            refined = self.grid_head.decode(fused, det_rois[:, 1:])
            start = 0
            for r, size in zip(results, image_sizes, strict=True):
                n = len(r)
                r.boxes = refined[start : start + n]
                if self.cfg.grid_head.clamp_refined_boxes:
                    r.boxes = clip_boxes_to_image(r.boxes, size)
                start += n

        return detect(boxes, list(scores.split(counts)), self.cfg, image_sizes, infos, None, refine)


def jitter_boxes(
    boxes: Tensor,
    amplitude: float,
    image_size: tuple[int, int],
    offsets: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """mmdet's ``_random_jitter``: centre moved by ``w * r0`` (and ``h * r1``), size scaled by
    ``1 + r2`` (``1 + r3``), clipped to ``[0, W - 1] x [0, H - 1]``. The ``(N, 4)`` offsets r
    are drawn from U(-a, a) unless given: from the CPU ``generator`` (the image's stream),
    or the global RNG without one."""
    if offsets is None and generator is not None:
        offsets = torch.empty(boxes.shape[0], 4, dtype=boxes.dtype).uniform_(
            -amplitude, amplitude, generator=generator
        )
        offsets = offsets.to(boxes.device)
    elif offsets is None:
        offsets = boxes.new_empty(boxes.shape[0], 4).uniform_(-amplitude, amplitude)
    cxcy = (boxes[:, 2:4] + boxes[:, :2]) / 2
    wh = (boxes[:, 2:4] - boxes[:, :2]).abs()
    new_cxcy = cxcy + wh * offsets[:, :2]
    new_wh = wh * (1 + offsets[:, 2:])
    out = torch.cat([new_cxcy - new_wh / 2, new_cxcy + new_wh / 2], dim=1)
    height, width = image_size
    return clip_boxes_to_image(out, (height - 1, width - 1))
