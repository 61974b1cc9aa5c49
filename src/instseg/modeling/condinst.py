"""CondInst's mask branch and dynamic mask head (Tian, Shen, Chen, ECCV 2020; spec §4.4-§4.5),
as mmdetection 3.3's ``CondInstMaskHead``.

The box head (FCOS with a controller, :mod:`.dense_heads.fcos`) predicts at each location
169 parameters of a tiny per-instance network. The mask branch fuses P3-P5 into one
8-channel map at stride 8. For each instance (a positive location in training, a detection
at test) the head concatenates the relative coordinates ``(centre - location) /
(stride * size_of_interest)`` (x, y) with the mask features and runs three 1x1 convs whose
weights and biases are that instance's parameters (``[W0 (8x10), W1 (8x8), W2 (1x8), b0, b1,
b2]``, row-major), ReLU between them; the logits are upsampled 2x by ``aligned_bilinear`` to
stride 4. Training: dice loss against the GT mask of the assigned GT, sampled at stride 4
(``gt[2::4, 2::4]`` of the padded GT), at most ``max_masks_to_train`` random positives per
image. Test: sigmoid, ``aligned_bilinear`` x4 to the padded input, cropped to the image,
bilinear to the original size, ``> mask_thr``: full-image masks, no pasting.

All instances of a batch run at once as batched matrix products (no loop per instance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import ConvModule
from ..structures import InstanceTargets
from .dense_heads.fcos import Detections, Positives, level_points
from .features import Features, FeatureSpec, common_width, select_specs
from .global_batch import empty_loss, normaliser, permutation, syncing
from .losses import dice_loss


def aligned_bilinear(x: Tensor, factor: int) -> Tensor:
    """Upsample ``(N, C, H, W)`` by an integer ``factor`` so that input pixel ``i`` lands on
    output pixel ``factor * i + factor // 2`` (spec §4.4): replicate-pad right/bottom by 1,
    bilinear with aligned corners to ``factor * size + 1``, replicate-pad left/top by
    ``factor // 2``, crop to ``factor * size``."""
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"aligned_bilinear factor must be a positive integer, got {factor}")
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : factor * h, : factor * w]


@dataclass
class CondInstMaskHeadConfig:
    """The mask branch (``mask_feature_head``) and the dynamic head of mmdet's CondInst.

    ``branch_levels`` are the neck levels fused (P3-P5; the first sets the mask-feature
    stride); ``num_layers``/``dyn_channels`` shape the dynamic network (its parameter count,
    :attr:`num_params`, sets the box head's controller width)."""

    kind: Literal["condinst"] = "condinst"
    branch_levels: tuple[str, ...] = ("p3", "p4", "p5")
    branch_channels: int = 128
    branch_convs: int = 4
    branch_norm: str | None = "BN"
    out_channels: int = 8
    num_layers: int = 3
    dyn_channels: int = 8
    size_of_interest: int = 8
    mask_out_stride: int = 4
    max_masks_to_train: int = 300
    mask_thr: float = 0.5
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "branch_channels",
            "out_channels",
            "num_layers",
            "dyn_channels",
            "mask_out_stride",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(
                    f"mask_head.{name} must be a positive int, got {getattr(self, name)!r}"
                )
        if self.num_layers < 2:
            raise ValueError(f"mask_head.num_layers must be at least 2, got {self.num_layers}")
        if self.max_masks_to_train == 0 or self.max_masks_to_train < -1:
            raise ValueError(
                "mask_head.max_masks_to_train must be positive or -1 (all), got "
                f"{self.max_masks_to_train}"
            )

    @property
    def weight_nums(self) -> list[int]:
        c = self.dyn_channels
        first = (self.out_channels + 2) * c
        return [first] + [c * c] * (self.num_layers - 2) + [c]

    @property
    def bias_nums(self) -> list[int]:
        return [self.dyn_channels] * (self.num_layers - 1) + [1]

    @property
    def num_params(self) -> int:
        """169 for the default: (10*8 + 8*8 + 8*1) weights + (8 + 8 + 1) biases."""
        return sum(self.weight_nums) + sum(self.bias_nums)


class MaskFeatModule(nn.Module):
    """The mask branch: a 3x3 conv per level, coarser levels ``aligned_bilinear``-upsampled to
    the first and summed, ``branch_convs`` 3x3 convs, a 1x1 conv to ``out_channels``. Names are
    mmdet's (``convs_all_levels.{l}.conv{l}``, ``conv_branch.{i}``, ``conv_pred``)."""

    def __init__(self, cfg: CondInstMaskHeadConfig, in_specs: list[FeatureSpec]) -> None:
        super().__init__()
        specs = select_specs(in_specs, cfg.branch_levels, "mask_head.branch_levels")
        in_channels = common_width(specs, "the CondInst mask branch")
        self.levels = [s.name for s in specs]
        self.strides = [s.stride for s in specs]
        self.stride = specs[0].stride

        def conv(cin: int) -> ConvModule:
            return ConvModule(
                cin,
                cfg.branch_channels,
                3,
                padding=1,
                bias=False,
                norm=cfg.branch_norm,
                inplace=False,
            )

        self.convs_all_levels = nn.ModuleList()
        for i in range(len(specs)):
            level = nn.Sequential()
            level.add_module(f"conv{i}", conv(in_channels))
            self.convs_all_levels.append(level)
        self.conv_branch = nn.Sequential(
            *(conv(cfg.branch_channels) for _ in range(cfg.branch_convs))
        )
        self.conv_pred = nn.Conv2d(cfg.branch_channels, cfg.out_channels, 1)
        # mmdet: Normal(0, 0.01) on every conv; conv_pred Kaiming-uniform (fan_out, relu).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.kaiming_uniform_(self.conv_pred.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, feats: Features) -> Tensor:
        x = self.convs_all_levels[0](feats[self.levels[0]])
        for i in range(1, len(self.levels)):
            y = self.convs_all_levels[i](feats[self.levels[i]])
            factor = x.shape[-2] // y.shape[-2]
            if factor * y.shape[-2] != x.shape[-2] or factor * y.shape[-1] != x.shape[-1]:
                raise ValueError(
                    f"mask branch level {self.levels[i]} {tuple(y.shape[-2:])} is not an integer "
                    f"downscale of {self.levels[0]} {tuple(x.shape[-2:])}: pad images to a "
                    f"multiple of {self.strides[-1]}"
                )
            x = x + aligned_bilinear(y, factor)
        return self.conv_pred(self.conv_branch(x))


class CondInstMaskHead(nn.Module):
    """``mask_feature_head`` (:class:`MaskFeatModule`) and the dynamic per-instance network."""

    def __init__(self, cfg: CondInstMaskHeadConfig, in_specs: list[FeatureSpec]) -> None:
        super().__init__()
        self.cfg = cfg
        self.mask_feature_head = MaskFeatModule(cfg, in_specs)
        self.feat_stride = self.mask_feature_head.stride
        if self.feat_stride % cfg.mask_out_stride != 0:
            raise ValueError(
                f"mask_head.mask_out_stride ({cfg.mask_out_stride}) must divide the mask-feature "
                f"stride ({self.feat_stride})"
            )

    def split_params(self, params: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``(N, num_params)`` -> per layer ``(N, out, in)`` weights and ``(N, out, 1)`` biases;
        the vector is all weights first, then all biases (spec §4.5)."""
        cfg = self.cfg
        n = params.shape[0]
        parts = torch.split(params, cfg.weight_nums + cfg.bias_nums, dim=1)
        weights, biases = [], []
        for i in range(cfg.num_layers):
            out = 1 if i == cfg.num_layers - 1 else cfg.dyn_channels
            weights.append(parts[i].reshape(n, out, -1))
            biases.append(parts[cfg.num_layers + i].reshape(n, out, 1))
        return weights, biases

    def relative_coords(self, size: tuple[int, int], points: Tensor, strides: Tensor) -> Tensor:
        """``(N, 2, H*W)`` ``(centre - location) / (stride * size_of_interest)`` over the
        mask-feature locations (x first)."""
        locations = level_points(size, self.feat_stride, points.device, points.dtype)  # (HW, 2)
        rel = points[:, :, None] - locations.t()[None]
        return rel / (strides * self.cfg.size_of_interest)[:, None, None]

    def dynamic_logits(
        self,
        mask_feats: Tensor,
        image_index: Tensor,
        params: Tensor,
        points: Tensor,
        strides: Tensor,
    ) -> Tensor:
        """Stride-``mask_out_stride`` logits ``(N, H', W')`` of N instances of the batch, each
        run on the mask features of its image."""
        b, c, h, w = mask_feats.shape
        n = params.shape[0]
        if n == 0:
            factor = self.feat_stride // self.cfg.mask_out_stride
            return mask_feats.new_zeros((0, h * factor, w * factor))
        feats = mask_feats.reshape(b, c, h * w).index_select(0, image_index)
        x = torch.cat([self.relative_coords((h, w), points, strides).to(feats.dtype), feats], 1)
        weights, biases = self.split_params(params)
        for i, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
            x = torch.baddbmm(bias, weight, x)
            if i < len(weights) - 1:
                x = F.relu(x)
        logits = x.reshape(n, 1, h, w)
        return aligned_bilinear(logits, self.feat_stride // self.cfg.mask_out_stride)[:, 0]

    def loss(
        self,
        feats: Features,
        positives: list[Positives],
        targets: list[InstanceTargets],
    ) -> dict[str, Tensor]:
        """Dice loss of (at most ``max_masks_to_train`` random) positives per image, summed and
        divided by the number of instances kept in the batch. The targets' masks are at the
        batch shape (the detector pads them), sampled at ``gt[start::s, start::s]``."""
        cfg = self.cfg
        mask_feats = self.mask_feature_head(feats)
        chosen, image_index, gt_masks = [], [], []
        start = cfg.mask_out_stride // 2
        for i, (pos, target) in enumerate(zip(positives, targets, strict=True)):
            keep = torch.arange(len(pos.index), device=mask_feats.device)
            if target.masks is None:
                raise ValueError("CondInst trains on instance masks; this batch has none")
            if len(target) == 0 or len(keep) == 0:
                continue
            if cfg.max_masks_to_train != -1 and len(keep) > cfg.max_masks_to_train:
                draw = permutation(len(keep), target.generator("condinst.masks"), keep.device)
                keep = draw[: cfg.max_masks_to_train]
            chosen.append((pos, keep))
            image_index.append(torch.full_like(keep, i))
            sampled = target.masks[:, start :: cfg.mask_out_stride, start :: cfg.mask_out_stride]
            gt_masks.append(sampled[pos.gt_index[keep]])
        if not chosen:
            zero = mask_feats.sum()
            if syncing():  # DDP reduces the controller's gradient on every rank
                zero = zero + sum(p.params.sum() for p in positives if p.params is not None)
            return {"loss_mask": empty_loss(zero)}
        params = torch.cat([pos.params[keep] for pos, keep in chosen])
        points = torch.cat([pos.points[keep] for pos, keep in chosen])
        strides = torch.cat([pos.strides[keep] for pos, keep in chosen])
        logits = self.dynamic_logits(mask_feats, torch.cat(image_index), params, points, strides)
        gt = torch.cat(gt_masks)
        gt = gt[:, : logits.shape[1], : logits.shape[2]]
        losses = dice_loss(logits, gt)
        return {"loss_mask": cfg.loss_weight * losses.sum() / normaliser(len(losses), minimum=1)}

    @torch.no_grad()
    def predict(
        self,
        feats: Features,
        detections: list[Detections],
        image_sizes: list[tuple[int, int]],
        out_sizes: list[tuple[int, int]],
    ) -> list[Tensor]:
        """Full-image ``(N, h, w)`` bool masks of each image's detections: probabilities
        upsampled to the padded input, cropped to the image (``image_sizes``), resized
        bilinearly to ``out_sizes`` and thresholded (``> mask_thr``)."""
        mask_feats = self.mask_feature_head(feats)
        counts = [len(d.boxes) for d in detections]
        image_index = torch.repeat_interleave(
            torch.arange(len(detections), device=mask_feats.device),
            torch.tensor(counts, device=mask_feats.device),
        )
        logits = self.dynamic_logits(
            mask_feats,
            image_index,
            torch.cat([d.params for d in detections]),
            torch.cat([d.points for d in detections]),
            torch.cat([d.strides for d in detections]),
        )
        masks = []
        for probs, (h, w), out_size in zip(
            logits.sigmoid().split(counts), image_sizes, out_sizes, strict=True
        ):
            if probs.shape[0] == 0:
                masks.append(torch.zeros((0, *out_size), dtype=torch.bool, device=probs.device))
                continue
            full = aligned_bilinear(probs[None], self.cfg.mask_out_stride)[:, :, :h, :w]
            if (h, w) != tuple(out_size):
                full = F.interpolate(full, size=out_size, mode="bilinear", align_corners=False)
            masks.append(full[0] > self.cfg.mask_thr)
        return masks
