"""The R-CNN box head (mmdet ``Shared2FCBBoxHead``) and mask head (``FCNMaskHead``), each
with its own loss and decoding, so a single-stage and a cascade RoI head drive them alike.

Parameter names follow mmdet's so that its checkpoints map key for key.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...layers import WEIGHT_INITS, init_weight
from ...ops import decode_deltas, encode_deltas
from ...ops.boxes import DELTA_CLIPS
from ...structures import InstanceTargets, TrainingContext
from ..features import Features, FeatureSpec
from ..global_batch import binary_cross_entropy, cross_entropy, empty_loss, normaliser
from ..losses import smooth_l1
from .mask_branch import crop_mask_targets
from .sampling import SampledRoIs, boxes_to_rois


@dataclass
class BoxHeadConfig:
    """The box head, its box coder (mmdet ``DeltaXYWHBBoxCoder``: ``target_means``,
    ``target_stds``) and its losses. ``roi_size`` is what its extractor pools;
    ``class_agnostic`` regresses one box per RoI instead of one per class (Cascade R-CNN),
    ``with_reg=False`` not at all (Grid R-CNN: no ``fc_reg``, no box loss);
    ``loss_bbox_beta`` is the smooth-L1 beta of the box loss (0: L1, the Mask R-CNN 3.x and
    detectron2 recipes; 1.0: mmdet's Cascade R-CNN); ``fc_init`` initialises the shared FCs
    ("xavier_uniform": mmdet, "c2_xavier": detectron2); ``delta_clip`` "upper" clamps only
    large ``dw, dh`` when decoding (torchvision's ``BoxCoder``; mmdet: "symmetric")."""

    roi_size: int = 7
    fc_channels: int = 1024
    num_fcs: int = 2
    class_agnostic: bool = False
    with_reg: bool = True
    target_means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    target_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 1.0
    loss_bbox_beta: float = 0.0
    fc_init: str = "xavier_uniform"
    delta_clip: str = "symmetric"

    def __post_init__(self) -> None:
        if self.delta_clip not in DELTA_CLIPS:
            raise ValueError(
                f"box_head.delta_clip must be one of {DELTA_CLIPS}, got {self.delta_clip!r}"
            )
        if self.fc_init not in WEIGHT_INITS:
            raise ValueError(
                f"box_head.fc_init must be one of {WEIGHT_INITS}, got {self.fc_init!r}"
            )
        if self.loss_bbox_beta < 0:
            raise ValueError(f"box_head.loss_bbox_beta must be >= 0, got {self.loss_bbox_beta}")
        for name in ("roi_size", "fc_channels", "num_fcs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"box_head.{name} must be positive, got {getattr(self, name)}")
        if min(self.target_stds) <= 0:
            raise ValueError(f"box_head.target_stds must be positive, got {self.target_stds}")


class Shared2FCBoxHead(nn.Module):
    """Flatten, ``num_fcs`` x (fc + ReLU), then a ``num_classes + 1``-way classifier
    (background last) and deltas: ``4 * num_classes`` (class-specific) or 4."""

    def __init__(self, cfg: BoxHeadConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        dims = [in_channels * cfg.roi_size * cfg.roi_size] + [cfg.fc_channels] * cfg.num_fcs
        self.shared_fcs = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        self.fc_cls = nn.Linear(dims[-1], num_classes + 1)
        if cfg.with_reg:
            self.fc_reg = nn.Linear(dims[-1], 4 if cfg.class_agnostic else 4 * num_classes)
        for fc in self.shared_fcs:
            init_weight(fc.weight, cfg.fc_init)
            nn.init.zeros_(fc.bias)
        # Same order of random draws as before the regression became optional, so seeded
        # models keep their initial weights.
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        if cfg.with_reg:
            nn.init.normal_(self.fc_reg.weight, std=0.001)
            nn.init.zeros_(self.fc_reg.bias)
        nn.init.zeros_(self.fc_cls.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits and box deltas (``with_reg=False``: an empty ``(N, 0)`` tensor)."""
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        deltas = self.fc_reg(x) if self.cfg.with_reg else x.new_zeros((x.shape[0], 0))
        return self.fc_cls(x), deltas

    def loss(self, cls_score: Tensor, bbox_pred: Tensor, sampled: SampledRoIs) -> dict[str, Tensor]:
        """Softmax cross-entropy over the sampled RoIs; smooth L1 (``loss_bbox_beta``) on the
        positives' normalised deltas (of their GT class unless class-agnostic), summed and
        divided by the number of sampled RoIs (mmdet's ``avg_factor``)."""
        cfg = self.cfg
        loss_cls = cfg.loss_cls_weight * cross_entropy(cls_score, sampled.labels)
        if not cfg.with_reg:
            return {"loss_cls": loss_cls}
        reg_targets = [
            encode_deltas(boxes, gt, cfg.target_means, cfg.target_stds)
            for boxes, gt in zip(sampled.pos_boxes, sampled.pos_gt_boxes, strict=True)
        ]
        pos_pred = select_class(self._deltas(bbox_pred)[sampled.is_pos], sampled.pos_labels)
        return {
            "loss_cls": loss_cls,
            "loss_bbox": cfg.loss_bbox_weight
            * smooth_l1(pos_pred - torch.cat(reg_targets), cfg.loss_bbox_beta).sum()
            / normaliser(cls_score.shape[0], minimum=1),
        }

    def decode(self, boxes: Tensor, bbox_pred: Tensor, image_size: tuple[int, int]) -> Tensor:
        """``(N, num_classes, 4)`` boxes of one image, clipped to ``image_size``."""
        cfg = self.cfg
        deltas = self._deltas(bbox_pred)
        decoded = decode_deltas(
            boxes[:, None, :].expand(-1, deltas.shape[1], 4),
            deltas,
            cfg.target_means,
            cfg.target_stds,
            max_shape=image_size,
            clip=cfg.delta_clip,
        )
        return decoded.expand(-1, self.num_classes, 4)

    def _deltas(self, bbox_pred: Tensor) -> Tensor:
        """``(N, C, 4)`` deltas: ``C = num_classes``, or 1 when class-agnostic."""
        return bbox_pred.view(bbox_pred.shape[0], -1, 4)


def mask_bce_loss(logits: Tensor, sampled: SampledRoIs, targets: list[InstanceTargets]) -> Tensor:
    """Mask R-CNN's mask loss: per-pixel BCE of each positive's GT-class logits against its
    GT mask cropped by the RoI (RoIAlign at the logits' size, >= 0.5), averaged over pixels;
    ``logits`` are ``(P, C, M, M)`` for the positives of ``sampled`` in order."""
    if logits.shape[0] == 0:
        return empty_loss(logits.sum())
    (mask_targets,) = crop_mask_targets(
        sampled.pos_boxes, sampled.pos_gt_index, targets, [logits.shape[-1]]
    )
    return binary_cross_entropy(
        select_class(logits, sampled.pos_labels), mask_targets.to(logits.dtype)
    )


def select_class(per_class: Tensor, labels: Tensor) -> Tensor:
    """``per_class[i, labels[i]]`` for a ``(N, C, ...)`` tensor (``C = 1``: the one entry)."""
    if per_class.shape[1] == 1:
        return per_class[:, 0]
    return per_class[torch.arange(per_class.shape[0], device=per_class.device), labels]


class _ConvReLU(nn.Module):
    """conv3x3 + ReLU, named ``conv`` as in mmcv's ConvModule (no norm, so with bias)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x))


@dataclass
class FCNMaskHeadConfig:
    """Mask R-CNN's mask head (``kind="fcn"``): ``num_convs`` 3x3 convs of
    ``conv_channels`` (None: the width of its RoI features) on ``roi_size`` RoI features,
    a 2x deconv, per-class logits; ``loss_weight`` scales its BCE. ``logits_init_std``:
    None initialises the logits conv as the others (kaiming normal, fan_out: mmdet), a
    number draws it from N(0, std^2) (detectron2: 0.001)."""

    kind: Literal["fcn"] = "fcn"
    roi_size: int = 14
    conv_channels: int | None = None
    num_convs: int = 4
    loss_weight: float = 1.0
    logits_init_std: float | None = None

    def __post_init__(self) -> None:
        if self.roi_size <= 0 or self.num_convs < 0:
            raise ValueError(
                f"mask_head: roi_size must be positive and num_convs >= 0, got "
                f"{self.roi_size}, {self.num_convs}"
            )
        if self.conv_channels is not None and self.conv_channels <= 0:
            raise ValueError(f"mask_head.conv_channels must be positive, got {self.conv_channels}")

    def build(self, in_channels: int, in_specs: list[FeatureSpec], num_classes: int) -> FCNMaskHead:
        return FCNMaskHead(self, in_channels, num_classes)


class FCNMaskHead(nn.Module):
    """``num_convs`` x (conv3x3 + ReLU), a 2x deconv + ReLU, and a 1x1 conv to one mask logit
    map per class: 14x14 RoI features give 28x28 masks."""

    def __init__(self, cfg: FCNMaskHeadConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.conv_channels or in_channels
        channels = [in_channels] + [width] * cfg.num_convs
        self.convs = nn.ModuleList(_ConvReLU(a, b) for a, b in pairwise(channels))
        self.upsample = nn.ConvTranspose2d(channels[-1], width, 2, stride=2)
        self.conv_logits = nn.Conv2d(width, num_classes, 1)
        for layer in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        if cfg.logits_init_std is not None:
            nn.init.normal_(self.conv_logits.weight, std=cfg.logits_init_std)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))

    def loss(
        self,
        feats: Features,
        extractor: nn.Module,
        sampled: SampledRoIs,
        targets: list[InstanceTargets],
        context: TrainingContext | None = None,
    ) -> dict[str, Tensor]:
        rois = boxes_to_rois(sampled.pos_boxes)
        logits = self(extractor(feats, rois))
        return {"loss_mask": self.cfg.loss_weight * mask_bce_loss(logits, sampled, targets)}

    def predict_probs(
        self, feats: Features, extractor: nn.Module, rois: Tensor, labels: Tensor
    ) -> Tensor:
        logits = self(extractor(feats, rois))
        return select_class(logits, labels).sigmoid()
