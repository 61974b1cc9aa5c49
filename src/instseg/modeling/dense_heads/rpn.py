"""Region Proposal Network (mmdet ``RPNHead``, the Mask R-CNN R50-FPN 1x recipe, spec §1.5).

A shared 3x3 conv + ReLU over every level the neck gives (its widths and strides come from
the neck's feature specs; anchors of stride s per level), then a 1x1 objectness logit and a 1x1 box
delta per anchor. Training: MaxIoU assignment (0.7 / 0.3, low-quality matches), 256 random
samples per image at half positive, sigmoid BCE and L1 (or smooth L1) on the deltas, both
averaged over the sampled anchors of the batch. Proposals: per level the top ``nms_pre``
scores, decode, drop boxes smaller than ``min_box_size``, NMS per level (0.7), keep the best
``max_per_image``.

torchvision's recipe (spec §13.5) differs in three switches: ``anchor_rounding`` (integer
base anchors), ``anchor_strides="input"`` (centres step by input size // level size) and
``delta_clip="upper"`` (only large ``dw, dh`` clamped); its ``min_box_size`` is 1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import batched_nms, clip_boxes_to_image, decode_deltas, encode_deltas
from ...ops.boxes import DELTA_CLIPS
from ...structures import InstanceTargets
from ..anchors import AnchorGenerator, AssignerConfig, assign, sample
from ..features import Features, FeatureSpec, common_width
from ..global_batch import normaliser
from ..losses import smooth_l1


@dataclass
class RPNConfig:
    """``feat_channels`` is the width of the shared conv (None: the width of the levels)."""

    feat_channels: int | None = None
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_scales: tuple[float, ...] = (8.0,)
    assigner: AssignerConfig = field(
        default_factory=lambda: AssignerConfig(0.7, 0.3, 0.3, match_low_quality=True)
    )
    num_samples: int = 256
    pos_fraction: float = 0.5
    train_nms_pre: int = 2000
    train_max_per_image: int = 1000
    test_nms_pre: int = 1000
    test_max_per_image: int = 1000
    nms_iou: float = 0.7
    min_box_size: float = 0.0
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 1.0
    loss_bbox_beta: float = 0.0  # smooth-L1 beta; 0 = L1 (Mask R-CNN 3.x), 1/9: Cascade R-CNN
    # Both losses are sums divided by: "sampled", the anchors sampled in the batch (mmdet);
    # "per_image", num_samples x images (detectron2, whatever the sampler found).
    loss_normalizer: str = "sampled"
    # torchvision's anchors and decoding (spec §13.5): integer base anchors, centres stepping
    # by input size // level size ("input") rather than the level's stride ("neck"), and
    # dw, dh clamped from above only ("upper") rather than both ways ("symmetric").
    anchor_rounding: bool = False
    anchor_strides: str = "neck"
    delta_clip: str = "symmetric"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("anchor_strides", ("neck", "input")),
            ("delta_clip", DELTA_CLIPS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"rpn.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.loss_normalizer not in ("sampled", "per_image"):
            raise ValueError(
                "rpn.loss_normalizer must be one of ('sampled', 'per_image'), got "
                f"{self.loss_normalizer!r}"
            )
        if self.loss_bbox_beta < 0:
            raise ValueError(f"rpn.loss_bbox_beta must be >= 0, got {self.loss_bbox_beta}")
        if self.feat_channels is not None and self.feat_channels <= 0:
            raise ValueError(f"rpn.feat_channels must be positive, got {self.feat_channels}")
        for name in (
            "num_samples",
            "train_nms_pre",
            "train_max_per_image",
            "test_nms_pre",
            "test_max_per_image",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"rpn.{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.pos_fraction <= 1:
            raise ValueError(f"rpn.pos_fraction must be in (0, 1], got {self.pos_fraction}")


class RPNHead(nn.Module):
    """Objectness and box deltas on every level of ``in_specs`` (one shared conv)."""

    def __init__(self, cfg: RPNConfig, in_specs: list[FeatureSpec]) -> None:
        super().__init__()
        self.cfg = cfg
        self.levels = [s.name for s in in_specs]
        in_channels = common_width(in_specs, "the RPN")
        feat_channels = cfg.feat_channels or in_channels
        self.anchors = AnchorGenerator(
            tuple(s.stride for s in in_specs),
            cfg.anchor_ratios,
            cfg.anchor_scales,
            round_base=cfg.anchor_rounding,
        )
        a = self.anchors.num_anchors
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, a, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, a * 4, 1)
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats: Features) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness ``(B, H*W*A)`` and deltas ``(B, H*W*A, 4)``, anchor order."""
        logits, deltas = [], []
        for x in (feats[name] for name in self.levels):
            x = F.relu(self.rpn_conv(x))
            b = x.shape[0]
            logits.append(self.rpn_cls(x).permute(0, 2, 3, 1).reshape(b, -1))
            deltas.append(self.rpn_reg(x).permute(0, 2, 3, 1).reshape(b, -1, 4))
        return logits, deltas

    def loss_and_proposals(
        self,
        feats: Features,
        image_sizes: list[tuple[int, int]],
        targets: list[InstanceTargets],
        input_size: tuple[int, int] | None = None,
    ) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Training: the RPN losses and the proposals the RoI head samples from;
        ``input_size`` is the padded batch's (height, width)."""
        logits, deltas = self(feats)
        sizes = self.level_sizes(feats)
        anchors = self._anchors(sizes, logits[0].device, input_size)
        losses = self.loss(logits, deltas, sizes, image_sizes, targets, anchors)
        return losses, self.proposals(logits, deltas, anchors, image_sizes)

    def predict(
        self,
        feats: Features,
        image_sizes: list[tuple[int, int]],
        input_size: tuple[int, int] | None = None,
    ) -> list[Tensor]:
        """Inference: ``(P, 4)`` proposals per image."""
        logits, deltas = self(feats)
        anchors = self._anchors(self.level_sizes(feats), logits[0].device, input_size)
        return self.proposals(logits, deltas, anchors, image_sizes)

    def _anchors(
        self, sizes: list[tuple[int, int]], device: torch.device, input_size: tuple[int, int] | None
    ) -> list[Tensor]:
        if self.cfg.anchor_strides == "input" and input_size is None:
            raise ValueError("rpn.anchor_strides='input' needs the padded input size")
        by_input = input_size if self.cfg.anchor_strides == "input" else None
        return self.anchors.grid_anchors(sizes, device, by_input)

    def level_sizes(self, feats: Features) -> list[tuple[int, int]]:
        return [tuple(feats[name].shape[-2:]) for name in self.levels]  # type: ignore[misc]

    def loss(
        self,
        logits: list[Tensor],
        deltas: list[Tensor],
        sizes: list[tuple[int, int]],
        image_sizes: list[tuple[int, int]],
        targets: list[InstanceTargets],
        level_anchors: list[Tensor],
    ) -> dict[str, Tensor]:
        device = logits[0].device
        anchors = torch.cat(level_anchors)
        all_logits = torch.cat(logits, 1)
        all_deltas = torch.cat(deltas, 1)
        cls_losses, reg_losses, num_samples = [], [], 0
        for i, target in enumerate(targets):
            valid = self.anchors.valid_flags(sizes, image_sizes[i], device)
            assigned = torch.full((anchors.shape[0],), -1, dtype=torch.long, device=device)
            assigned[valid] = assign(
                anchors[valid], target.boxes, self.cfg.assigner, target.ignore_boxes
            )
            pos, neg = sample(
                assigned, self.cfg.num_samples, self.cfg.pos_fraction, target.generator("rpn")
            )
            chosen = torch.cat([pos, neg])
            labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).float()
            cls_losses.append(
                F.binary_cross_entropy_with_logits(all_logits[i, chosen], labels, reduction="sum")
            )
            gt = target.boxes[assigned[pos] - 1]
            reg_targets = encode_deltas(anchors[pos], gt)
            reg_losses.append(
                smooth_l1(all_deltas[i, pos] - reg_targets, self.cfg.loss_bbox_beta).sum()
            )
            num_samples += chosen.numel()
        if self.cfg.loss_normalizer == "per_image":
            num_samples = self.cfg.num_samples * len(targets)
        avg = normaliser(num_samples, minimum=1)
        return {
            "loss_rpn_cls": self.cfg.loss_cls_weight * torch.stack(cls_losses).sum() / avg,
            "loss_rpn_bbox": self.cfg.loss_bbox_weight * torch.stack(reg_losses).sum() / avg,
        }

    @torch.no_grad()
    def proposals(
        self,
        logits: list[Tensor],
        deltas: list[Tensor],
        anchors: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[Tensor]:
        """``(P, 4)`` proposals per image from the per-level ``anchors``, sorted by
        decreasing objectness."""
        nms_pre = self.cfg.train_nms_pre if self.training else self.cfg.test_nms_pre
        max_per_image = (
            self.cfg.train_max_per_image if self.training else self.cfg.test_max_per_image
        )
        results = []
        for i, image_size in enumerate(image_sizes):
            boxes, scores, levels = [], [], []
            for level, (level_logits, level_deltas) in enumerate(zip(logits, deltas, strict=True)):
                score = level_logits[i].sigmoid()
                top = score.topk(min(nms_pre, score.numel())).indices
                boxes.append(
                    decode_deltas(
                        anchors[level][top],
                        level_deltas[i, top],
                        max_shape=image_size,
                        clip=self.cfg.delta_clip,
                    )
                )
                scores.append(score[top])
                levels.append(torch.full_like(top, level))
            boxes_i, scores_i, levels_i = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
            w = boxes_i[:, 2] - boxes_i[:, 0]
            h = boxes_i[:, 3] - boxes_i[:, 1]
            keep = (w > self.cfg.min_box_size) & (h > self.cfg.min_box_size)
            boxes_i, scores_i, levels_i = boxes_i[keep], scores_i[keep], levels_i[keep]
            keep = batched_nms(boxes_i, scores_i, levels_i, self.cfg.nms_iou)[:max_per_image]
            results.append(clip_boxes_to_image(boxes_i[keep], image_size))
        return results
