"""RefineMask (Zhang et al., CVPR 2021; spec §3): the multi-stage, boundary-aware mask head.

RefineMask predicts a mask at 14, 28, 56 and 112 px per RoI. Each stage fuses the RoI's
instance features with semantic features RoI-pooled from a semantic branch on FPN P2
(plus the stage's mask and the semantic foreground mask) through a multi-branch dilated
fusion, then upsamples (§3.3). Stages after ``start_stage`` are trained only on a boundary
band of the previous stage's mask (BAR loss, §3.6), and at test time each finer prediction
replaces the upsampled coarser one only in the width-1 band of the coarser binary mask
(§3.8).

Read top to bottom: the band (``block_target``, §3.5), the merge, the instance loss; then
the config, the stages and the head (both the paper's head and the faster-better variant of
§3.9) with its training targets and test-time chunking (the mask-head protocol any RoI
head drives); then the test-time cascade and the semantic target (§3.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...layers import ConvModule
from ...ops import roi_align
from ...structures import InstanceTargets, TrainingContext
from ..features import Features, FeatureSpec, select_specs
from ..global_batch import binary_cross_entropy, empty_loss, normaliser
from .mask_branch import crop_mask_targets
from .sampling import SampledRoIs, boxes_to_rois

BOUNDARY, INTERIOR = 1, 2


def block_target(masks: Tensor, boundary_width: int) -> Tensor:
    """The official ``generate_block_target`` (§3.5): ``(N, S, S)`` binary masks -> a long map
    with 1 on the boundary band, 2 on the foreground interior, 0 elsewhere.

    With ``k = 2 * boundary_width + 1``, a foreground pixel is boundary when more than
    ``0.1 * k^2`` pixels of its k x k window are background, and a background pixel when more
    than ``0.1 * k^2`` are foreground. Outside the RoI counts as background (never as
    foreground), so foreground touching the RoI border is boundary.
    """
    if boundary_width < 1:
        raise ValueError(f"boundary_width must be >= 1, got {boundary_width}")
    if masks.dim() != 3:
        raise ValueError(f"block_target expects (N, S, S) masks, got {tuple(masks.shape)}")
    k = 2 * boundary_width + 1
    fg = (masks > 0.5).to(torch.float32)[:, None]
    # Foreground count of every k x k window, outside the RoI counted as background.
    ones = torch.ones((1, 1, k, k), dtype=fg.dtype, device=fg.device)
    fg_count = F.conv2d(fg, ones, padding=boundary_width)[:, 0].round().long()
    fg = fg[:, 0].bool()
    # "more than 0.1 k^2" on integer counts: 10 * count > k^2 (never equal for odd k).
    pos = fg & (10 * (k * k - fg_count) > k * k)
    neg = ~fg & (10 * fg_count > k * k)
    out = torch.zeros(masks.shape, dtype=torch.long, device=masks.device)
    out[pos | neg] = BOUNDARY
    out[fg & ~pos] = INTERIOR
    return out


def _upsample(maps: Tensor, size: int) -> Tensor:
    """``(N, s, s)`` maps at ``size`` x ``size``, bilinear with align_corners=True (as the
    official code resizes between stages)."""
    resized = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=True)
    return resized[:, 0]


def _upsample_region(region: Tensor, size: int) -> Tensor:
    """A boolean region resized as 0/1 values, then ``>= 0.5``, as the official code does."""
    return _upsample(region.float(), size) >= 0.5


def merge_stage_logits(coarse: Tensor, fine: Tensor, coarse_binary: Tensor | None = None) -> Tensor:
    """Test-time merge of §3.8: ``fine`` logits ``(N, 2s, 2s)`` kept only in the width-1 band
    of the binary coarse mask ``(N, s, s)``; elsewhere the upsampled ``coarse`` logits.

    The binary mask is ``sigmoid(coarse) >= 0.5`` unless ``coarse_binary`` is given (the
    training loss passes the merged mask of the earlier stages, as the official code does).
    """
    size = fine.shape[-1]
    if coarse_binary is None:
        coarse_binary = coarse.sigmoid() >= 0.5
    band = block_target(coarse_binary, 1) == BOUNDARY
    keep_fine = _upsample_region(band, size)
    return torch.where(keep_fine, fine, _upsample(coarse, size))


def refine_mask_loss(
    stage_logits: list[Tensor],
    stage_targets: list[Tensor],
    stage_weights: list[float] | tuple[float, ...],
    boundary_width: int = 2,
    start_stage: int = 1,
) -> Tensor:
    """The instance loss of §3.6 (``RefineCrossEntropyLoss`` without the semantic term).

    ``stage_logits[i]`` and ``stage_targets[i]`` are ``(N, S_i, S_i)`` with S doubling per
    stage. Stages up to ``start_stage`` use plain BCE averaged over all pixels. Later stages
    average BCE over the boundary region: the width-``boundary_width`` band of the previous
    stage's (merged) binary prediction united with that of the previous target, upsampled;
    the count is over the whole batch. Returns ``sum_i weight_i * L_i``.
    """
    if not len(stage_logits) == len(stage_targets) == len(stage_weights):
        raise ValueError(
            "refine_mask_loss needs one target and one weight per stage, got "
            f"{len(stage_logits)} logits, {len(stage_targets)} targets, "
            f"{len(stage_weights)} weights"
        )
    total = stage_logits[0].new_zeros(())
    previous_binary = None
    for i, (logits, target, weight) in enumerate(
        zip(stage_logits, stage_targets, stage_weights, strict=True)
    ):
        target = target.to(logits.dtype)
        if i <= start_stage:
            loss = binary_cross_entropy(logits, target)
            previous_binary = logits.sigmoid() >= 0.5
        else:
            assert previous_binary is not None
            size = logits.shape[-1]
            region = (block_target(previous_binary, boundary_width) == BOUNDARY) | (
                block_target(stage_targets[i - 1], boundary_width) == BOUNDARY
            )
            region = _upsample_region(region, size)
            pixel_loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            loss = (pixel_loss * region).sum() / normaliser(region.sum(), minimum=1)
            # The next region starts from this stage merged into the previous one: the band
            # of the merged binary mask, the raw logits of the previous stage elsewhere.
            merged = merge_stage_logits(stage_logits[i - 1], logits, previous_binary)
            previous_binary = merged.sigmoid() >= 0.5
        total = total + weight * loss
    return total


# ------------------------------------------------------------------------------- the head

REFINEMASK_VARIANTS = ("refinemask", "faster_better")


@dataclass
class RefineMaskHeadConfig:
    """The RefineMask mask head (``kind="refinemask"``); the defaults are the official r50
    COCO config (§3.3, §3.7). Its RoI features come from the mask extractor (at
    ``stage_sizes[0]``), its semantic branch reads the neck level ``semantic_level`` (P2);
    widths and the stride come from there. ``loss_weight`` scales ``loss_mask``.

    ``variant="faster_better"`` is the ``SimpleRefineMaskHead`` of §3.9: no semantic logits
    or loss, one bilinear sample per bin for the semantic features, global-average fusion,
    and the last stage's logits computed at 56 and upsampled (unless
    ``pre_upsample_last_stage``). Its official config also uses a class-agnostic last stage
    and loss weights (0.5, 0.75, 0.75, 1.0); the zoo config sets those.
    """

    kind: Literal["refinemask"] = "refinemask"
    variant: str = "refinemask"
    semantic_level: str = "p2"
    conv_channels: int = 256
    num_convs_instance: int = 2
    num_convs_semantic: int = 4
    dilations: tuple[int, ...] = (1, 3, 5)
    stage_sizes: tuple[int, ...] = (14, 28, 56, 112)
    class_agnostic_last_stage: bool = False  # LVIS: stage_num_classes[-1] = 1
    mask_use_sigmoid: bool = True  # refinemask variant: fuse mask probabilities, not logits
    pre_upsample_last_stage: bool = False  # faster_better variant only
    stage_loss_weights: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    semantic_loss_weight: float = 1.0
    boundary_width: int = 2
    start_stage: int = 1
    test_chunk_size: int = 100  # RoIs per mask forward at test time, as the official code
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        key = "roi_head.mask_head"
        if self.variant not in REFINEMASK_VARIANTS:
            raise ValueError(
                f"{key}.variant must be one of {REFINEMASK_VARIANTS}, got {self.variant!r}"
            )
        sizes = tuple(self.stage_sizes)
        if len(sizes) < 2 or any(b != 2 * a for a, b in pairwise(sizes)) or sizes[0] <= 0:
            raise ValueError(
                f"{key}.stage_sizes must be at least two positive sizes, each twice the one "
                f"before (e.g. (14, 28, 56, 112)), got {sizes}"
            )
        if len(self.stage_loss_weights) != len(sizes):
            raise ValueError(
                f"{key}.stage_loss_weights needs one weight per stage size ({len(sizes)}), "
                f"got {len(self.stage_loss_weights)}"
            )
        last_channels = self.conv_channels >> (len(sizes) - 1)
        if last_channels << (len(sizes) - 1) != self.conv_channels or last_channels < 4:
            raise ValueError(
                f"{key}.conv_channels ({self.conv_channels}) must halve exactly "
                f"{len(sizes) - 1} times to at least 4 channels"
            )
        if not self.dilations or min(self.dilations) <= 0:
            raise ValueError(f"{key}.dilations must be positive, got {self.dilations}")
        if self.boundary_width < 1:
            raise ValueError(f"{key}.boundary_width must be >= 1, got {self.boundary_width}")
        if not 0 <= self.start_stage < len(sizes):
            raise ValueError(
                f"{key}.start_stage must be in [0, {len(sizes) - 1}], got {self.start_stage}"
            )
        if self.test_chunk_size < 1:
            raise ValueError(f"{key}.test_chunk_size must be >= 1, got {self.test_chunk_size}")

    @property
    def with_semantic_loss(self) -> bool:
        return self.variant == "refinemask"

    @property
    def roi_size(self) -> int:
        """The size of the RoI features the first stage refines."""
        return self.stage_sizes[0]

    def build(
        self, in_channels: int, in_specs: list[FeatureSpec], num_classes: int
    ) -> RefineMaskHead:
        (semantic,) = select_specs(in_specs, [self.semantic_level], "mask_head.semantic_level")
        return RefineMaskHead(self, num_classes, in_channels, semantic)


def _init_1x1(*convs: nn.Conv2d) -> None:
    """The official init of the head's plain convs: kaiming normal (fan_out, ReLU), bias 0."""
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)


def _class_logits(conv: nn.Conv2d, x: Tensor, labels: Tensor) -> Tensor:
    """``conv(x)[arange(N), labels]`` for a 1x1 ``conv``, as ``(N, S, S)``, without computing
    the other classes' maps (80 maps of 56 x 56 per RoI would dominate the head's memory)."""
    weight = conv.weight[labels, :, 0, 0]
    return torch.einsum("nchw,nc->nhw", x, weight) + conv.bias[labels][:, None, None]


def _channels_last(x: Tensor) -> Tensor:
    """The head's many-RoI, few-channel maps (e.g. 256 RoIs x 16 ch x 56 x 56) convolve 2-3x
    faster on CPU in channels-last layout (and it is the fast layout on GPU too)."""
    return x.contiguous(memory_format=torch.channels_last)


def _upsample2x(x: Tensor) -> Tensor:
    """mmcv's ``bilinear`` upsample layer: scale 2, align_corners=False."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def bin_centre_sample(feat: Tensor, rois: Tensor, size: int, spatial_scale: float) -> Tensor:
    """mmcv ``SimpleRoIAlign`` (§3.9): one bilinear sample at the centre of each of the
    ``size x size`` bins, zero outside the map. ``(K, 5)`` RoIs -> ``(K, C, size, size)``.

    A bin centre at image ``x`` reads the map at ``x * spatial_scale - 0.5`` (grid_sample with
    align_corners=False), as RoIAlign(aligned, sampling_ratio=1) does inside the map.
    """
    out = feat.new_zeros((rois.shape[0], feat.shape[1], size, size))
    if rois.shape[0] == 0:
        return out
    steps = (torch.arange(size, device=feat.device, dtype=feat.dtype) + 0.5) / size
    x1, y1, x2, y2 = (rois[:, i : i + 1].to(feat.dtype) for i in range(1, 5))
    # Image coordinates of the bin centres, then grid_sample's [-1, 1] (align_corners=False).
    xs = (x1 + steps * (x2 - x1)) * spatial_scale / feat.shape[-1] * 2 - 1
    ys = (y1 + steps * (y2 - y1)) * spatial_scale / feat.shape[-2] * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)
    batch_index = rois[:, 0].long()
    for b in batch_index.unique().tolist():
        pick = torch.nonzero(batch_index == b).squeeze(1)
        # All RoIs of image b as one (1, K_b * size, size) grid: one grid_sample per image.
        sampled = F.grid_sample(
            feat[b : b + 1],
            grid[pick].reshape(1, -1, size, 2),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
        out[pick] = sampled.view(feat.shape[1], -1, size, size).transpose(0, 1)
    return out


class MultiBranchFusion(nn.Module):
    """Parallel 3x3 ConvModules with the given dilations, summed (plus the global average of
    the input for the faster-better variant's ``MultiBranchFusionAvg``), then a 1x1
    ConvModule without activation."""

    def __init__(self, channels: int, dilations: tuple[int, ...], global_average: bool) -> None:
        super().__init__()
        self.num_branches = len(dilations)
        self.global_average = global_average
        for i, dilation in enumerate(dilations, start=1):
            branch = ConvModule(channels, channels, 3, padding=dilation, dilation=dilation)
            self.add_module(f"dilation_conv_{i}", branch)
        self.merge_conv = ConvModule(channels, channels, 1, activation=None)

    def forward(self, x: Tensor) -> Tensor:
        out = sum(getattr(self, f"dilation_conv_{i}")(x) for i in range(1, self.num_branches + 1))
        if self.global_average:
            out = out + x.mean(dim=(2, 3), keepdim=True)
        return self.merge_conv(out)


class SFMStage(nn.Module):
    """One semantic fusion stage (§3.3 steps 1-11): ``channels`` at ``S`` in, ``channels / 2``
    at ``2S`` out, of which the last two are the stage's mask and the RoI's semantic mask."""

    def __init__(
        self,
        cfg: RefineMaskHeadConfig,
        channels: int,
        num_classes: int,
        global_average: bool,
        semantic_stride: int,
    ) -> None:
        super().__init__()
        self.spatial_scale = 1.0 / semantic_stride
        self.mask_use_sigmoid = cfg.mask_use_sigmoid
        self.semantic_transform_in = nn.Conv2d(cfg.conv_channels, channels, 1)
        self.semantic_transform_out = nn.Conv2d(channels, channels, 1)
        self.instance_logits = nn.Conv2d(channels, num_classes, 1)
        self.fuse_conv = nn.ModuleList(
            [
                nn.Conv2d(2 * channels + 2, channels, 1),
                MultiBranchFusion(channels, cfg.dilations, global_average),
            ]
        )
        self.fuse_transform_out = nn.Conv2d(channels, channels // 2 - 2, 1)
        _init_1x1(
            self.semantic_transform_in,
            self.semantic_transform_out,
            self.instance_logits,
            self.fuse_conv[0],
            self.fuse_transform_out,
        )

    def semantic(self, semantic_feat: Tensor) -> Tensor:
        """Step 1, on the whole P2-resolution map (once per batch, shared by every RoI)."""
        return F.relu(self.semantic_transform_in(semantic_feat))

    def forward(
        self,
        instance_feats: Tensor,
        stage_semantic: Tensor,
        semantic_masks: Tensor,
        rois: Tensor,
        labels: Tensor,
    ) -> tuple[Tensor, Tensor]:
        size = instance_feats.shape[-1]
        pooled = roi_align(stage_semantic, rois, size, self.spatial_scale, 0, True)
        ins_semantic = F.relu(self.semantic_transform_out(pooled))
        logits = _class_logits(self.instance_logits, instance_feats, labels)[:, None]
        ins_mask = logits.sigmoid() if self.mask_use_sigmoid else logits
        sem_mask = roi_align(semantic_masks, rois, size, self.spatial_scale, 0, True)
        x = _channels_last(torch.cat([instance_feats, ins_semantic, ins_mask, sem_mask], dim=1))
        for conv in self.fuse_conv:
            x = F.relu(conv(x))
        x = F.relu(_upsample2x(F.relu(self.fuse_transform_out(x))))
        masks = F.interpolate(
            torch.cat([ins_mask, sem_mask], dim=1),
            size=2 * size,
            mode="bilinear",
            align_corners=True,
        )
        return logits[:, 0], _channels_last(torch.cat([x, masks], dim=1))


class SimpleSFMStage(nn.Module):
    """A faster-better stage (§3.9): semantic features sampled once per bin with no output
    transform, the stage's mask probability fused and re-attached before the upsampling."""

    def __init__(self, cfg: RefineMaskHeadConfig, channels: int, semantic_stride: int) -> None:
        super().__init__()
        self.spatial_scale = 1.0 / semantic_stride
        self.semantic_transform_in = nn.Conv2d(cfg.conv_channels, channels, 1)
        self.fuse_conv = nn.ModuleList(
            [
                nn.Conv2d(2 * channels + 1, channels, 1),
                MultiBranchFusion(channels, cfg.dilations, global_average=True),
            ]
        )
        self.fuse_transform_out = nn.Conv2d(channels, channels // 2 - 1, 1)
        _init_1x1(self.semantic_transform_in, self.fuse_conv[0], self.fuse_transform_out)

    def semantic(self, semantic_feat: Tensor) -> Tensor:
        return F.relu(self.semantic_transform_in(semantic_feat))

    def forward(
        self,
        instance_feats: Tensor,
        logits: Tensor,
        stage_semantic: Tensor,
        rois: Tensor,
        upsample: bool,
    ) -> Tensor:
        size = instance_feats.shape[-1]
        ins_semantic = bin_centre_sample(stage_semantic, rois, size, self.spatial_scale)
        mask = logits.sigmoid()[:, None]
        x = _channels_last(torch.cat([instance_feats, ins_semantic, mask], dim=1))
        for conv in self.fuse_conv:
            x = F.relu(conv(x))
        x = _channels_last(torch.cat([F.relu(self.fuse_transform_out(x)), mask], dim=1))
        return _channels_last(_upsample2x(x)) if upsample else x


@dataclass
class SemanticOutputs:
    """What the semantic branch gives every RoI chunk of a batch: each stage's transformed
    P2 features, and (refinemask variant) the binary foreground logits and probabilities."""

    stage_feats: list[Tensor]
    logits: Tensor | None
    masks: Tensor | None  # what the stages pool: sigmoid(logits), or logits


class RefineMaskHead(nn.Module):
    """The RefineMask head (§3.3) or its faster-better variant (§3.9).

    ``semantic(p2)`` runs the semantic branch once per batch; ``instances(...)`` maps a
    chunk of RoIs to the per-stage logits ``[(N, 14, 14), (N, 28, 28), (N, 56, 56),
    (N, 112, 112)]`` (one map per RoI: its label's). ``in_channels`` is the width of the RoI
    features, ``semantic_spec`` the neck level the semantic branch reads. Parameter names
    follow the official ``RefineMaskHead`` / ``SimpleRefineMaskHead``.
    """

    def __init__(
        self,
        cfg: RefineMaskHeadConfig,
        num_classes: int,
        in_channels: int,
        semantic_spec: FeatureSpec,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.semantic_level = semantic_spec.name
        self.semantic_stride = semantic_spec.stride
        width = cfg.conv_channels
        if cfg.num_convs_instance == 0 and in_channels != width:
            raise ValueError(
                f"roi_head.mask_head: with no instance convs, the RoI features' width "
                f"({in_channels}) must equal conv_channels ({width})"
            )
        if cfg.num_convs_semantic == 0 and semantic_spec.channels != width:
            raise ValueError(
                "roi_head.mask_head: with no semantic convs, the width of "
                f"{semantic_spec.name} ({semantic_spec.channels}) must equal conv_channels "
                f"({width})"
            )
        self.instance_convs = nn.ModuleList(
            ConvModule(in_channels if i == 0 else width, width, 3, padding=1)
            for i in range(cfg.num_convs_instance)
        )
        self.semantic_convs = nn.ModuleList(
            ConvModule(semantic_spec.channels if i == 0 else width, width, 3, padding=1)
            for i in range(cfg.num_convs_semantic)
        )
        channels = [width >> k for k in range(len(cfg.stage_sizes))]
        last_classes = 1 if cfg.class_agnostic_last_stage else num_classes
        stride = semantic_spec.stride
        self.stages = nn.ModuleList()
        if cfg.variant == "refinemask":
            for c in channels[:-1]:
                self.stages.append(
                    SFMStage(cfg, c, num_classes, global_average=False, semantic_stride=stride)
                )
            self.final_instance_logits = nn.Conv2d(channels[-1], last_classes, 1)
            self.semantic_logits = nn.Conv2d(width, 1, 1)
            _init_1x1(self.final_instance_logits, self.semantic_logits)
        else:
            for c in channels[:-1]:
                self.stages.append(SimpleSFMStage(cfg, c, stride))
            classes = [num_classes] * (len(channels) - 1) + [last_classes]
            self.stage_instance_logits = nn.ModuleList(
                nn.Conv2d(c, k, 1) for c, k in zip(channels, classes, strict=True)
            )
            _init_1x1(*self.stage_instance_logits)

    def semantic(self, p2: Tensor) -> SemanticOutputs:
        x = _channels_last(p2)
        for conv in self.semantic_convs:
            x = conv(x)
        stage_feats = [stage.semantic(x) for stage in self.stages]
        if self.cfg.variant != "refinemask":
            return SemanticOutputs(stage_feats, None, None)
        logits = self.semantic_logits(x)
        masks = logits.sigmoid() if self.cfg.mask_use_sigmoid else logits
        return SemanticOutputs(stage_feats, logits, masks)

    def instances(
        self, roi_feats: Tensor, semantic: SemanticOutputs, rois: Tensor, labels: Tensor
    ) -> list[Tensor]:
        """Per-stage logits of each RoI's ``labels`` channel, coarse to fine."""
        x = _channels_last(roi_feats)
        for conv in self.instance_convs:
            x = conv(x)
        last_labels = labels.clamp(max=0) if self.cfg.class_agnostic_last_stage else labels
        stage_logits = []
        if self.cfg.variant == "refinemask":
            assert semantic.masks is not None
            for stage, feats in zip(self.stages, semantic.stage_feats, strict=True):
                logits, x = stage(x, feats, semantic.masks, rois, labels)
                stage_logits.append(logits)
            stage_logits.append(_class_logits(self.final_instance_logits, x, last_labels))
            return stage_logits
        last = len(self.stages) - 1
        for k, (stage, feats) in enumerate(zip(self.stages, semantic.stage_feats, strict=True)):
            logits = _class_logits(self.stage_instance_logits[k], x, labels)
            upsample = k < last or self.cfg.pre_upsample_last_stage
            x = stage(x, logits, feats, rois, upsample)
            stage_logits.append(logits)
        final = _class_logits(self.stage_instance_logits[-1], x, last_labels)
        if not self.cfg.pre_upsample_last_stage:
            final = _upsample(final, 2 * final.shape[-1])
        stage_logits.append(final)
        return stage_logits

    def forward(
        self, roi_feats: Tensor, p2: Tensor, rois: Tensor, labels: Tensor
    ) -> tuple[list[Tensor], Tensor | None]:
        """Training forward: per-stage logits and the semantic logits (None for the
        faster-better variant)."""
        semantic = self.semantic(p2)
        return self.instances(roi_feats, semantic, rois, labels), semantic.logits

    def stage_losses(
        self,
        stage_logits: list[Tensor],
        stage_targets: list[Tensor],
        semantic_logits: Tensor | None,
        semantic_target: Tensor | None,
    ) -> dict[str, Tensor]:
        """``loss_mask`` (§3.6 instance loss) and, for the refinemask variant,
        ``loss_semantic``: BCE of the binary foreground map, averaged over its pixels."""
        cfg = self.cfg
        if stage_logits[0].shape[0] == 0:
            loss_mask = empty_loss(sum(s.sum() for s in stage_logits), len(stage_logits))
        else:
            loss_mask = refine_mask_loss(
                stage_logits,
                stage_targets,
                cfg.stage_loss_weights,
                cfg.boundary_width,
                cfg.start_stage,
            )
        losses = {"loss_mask": loss_mask}
        if cfg.with_semantic_loss:
            assert semantic_logits is not None and semantic_target is not None
            losses["loss_semantic"] = cfg.semantic_loss_weight * binary_cross_entropy(
                semantic_logits[:, 0], semantic_target.to(semantic_logits.dtype)
            )
        return losses

    # ------------------------------------------------------- the mask-head protocol

    def loss(
        self,
        feats: Features,
        extractor: nn.Module,
        sampled: SampledRoIs,
        targets: list[InstanceTargets],
        context: TrainingContext | None = None,
    ) -> dict[str, Tensor]:
        """Training: the positives' targets at every stage size (14, 28, 56, 112) and the
        semantic target (union of each image's GT masks) for the semantic branch."""
        cfg = self.cfg
        rois = boxes_to_rois(sampled.pos_boxes)
        semantic_feat = feats[self.semantic_level]
        stage_logits, semantic_logits = self(
            extractor(feats, rois), semantic_feat, rois, sampled.pos_labels
        )
        stage_targets = crop_mask_targets(
            sampled.pos_boxes, sampled.pos_gt_index, targets, cfg.stage_sizes
        )
        target_map = None
        if cfg.with_semantic_loss:
            masks = [t.masks for t in targets]
            if any(m is None for m in masks):
                raise ValueError("RefineMask training needs targets with masks (with_masks=True)")
            height, width = semantic_feat.shape[-2:]
            padded = (height * self.semantic_stride, width * self.semantic_stride)
            target_map = semantic_target(masks, padded, (height, width))  # type: ignore[arg-type]
        losses = self.stage_losses(stage_logits, stage_targets, semantic_logits, target_map)
        losses["loss_mask"] = cfg.loss_weight * losses["loss_mask"]
        return losses

    def predict_probs(
        self, feats: Features, extractor: nn.Module, rois: Tensor, labels: Tensor
    ) -> Tensor:
        """Merged 112 x 112 probabilities (§3.8), ``test_chunk_size`` RoIs at a time; the
        semantic branch runs once for the batch (the official code reruns it per chunk)."""
        semantic = self.semantic(feats[self.semantic_level])
        chunk = self.cfg.test_chunk_size
        probs = []
        for start in range(0, rois.shape[0], chunk):
            chunk_rois, chunk_labels = rois[start : start + chunk], labels[start : start + chunk]
            stage_logits = self.instances(
                extractor(feats, chunk_rois), semantic, chunk_rois, chunk_labels
            )
            probs.append(merge_stages(stage_logits).sigmoid())
        return torch.cat(probs)


def merge_stages(stage_logits: list[Tensor]) -> Tensor:
    """Test-time cascade of §3.8: stage 0 is dropped, then each finer stage is merged into
    the (already merged) coarser one. Returns the finest merged logits."""
    merged = stage_logits[1]
    for fine in stage_logits[2:]:
        merged = merge_stage_logits(merged, fine)
    return merged


def semantic_target(
    masks: list[Tensor], padded_size: tuple[int, int], out_size: tuple[int, int]
) -> Tensor:
    """The semantic target of §3.4: per image the union of all its GT masks, zero-padded to
    the batch's padded size, resized bilinearly (align_corners=False) to the semantic map's
    size and ``>= 0.5``. ``masks[i]`` is ``(N_i, h_i, w_i)`` at image i's size; returns
    ``(B, *out_size)`` bool."""
    height, width = padded_size
    device = masks[0].device if masks else torch.device("cpu")
    union = torch.zeros((len(masks), 1, height, width), device=device)
    for i, image_masks in enumerate(masks):
        h, w = image_masks.shape[-2:]
        if h > height or w > width:
            raise ValueError(
                f"image {i}: masks of size {h}x{w} do not fit the padded size {height}x{width}"
            )
        if image_masks.shape[0] > 0:
            union[i, 0, :h, :w] = image_masks.any(dim=0)
    resized = F.interpolate(union, size=out_size, mode="bilinear", align_corners=False)
    return resized[:, 0] >= 0.5
