"""RefineMask (Zhang et al., CVPR 2021; spec §3): the boundary-aware parts.

RefineMask predicts a mask at 14, 28, 56 and 112 px per RoI. Stages after ``start_stage``
are trained only on a boundary band of the previous stage's mask (BAR loss, §3.6), and at
test time each finer prediction replaces the upsampled coarser one only in the width-1 band
of the coarser binary mask (§3.8). This module holds those pieces: the band
(``block_target``, §3.5), the test-time merge, and the loss. The head itself comes next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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
            loss = F.binary_cross_entropy_with_logits(logits, target)
            previous_binary = logits.sigmoid() >= 0.5
        else:
            assert previous_binary is not None
            size = logits.shape[-1]
            region = (block_target(previous_binary, boundary_width) == BOUNDARY) | (
                block_target(stage_targets[i - 1], boundary_width) == BOUNDARY
            )
            region = _upsample_region(region, size)
            pixel_loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            loss = (pixel_loss * region).sum() / region.sum().clamp(min=1)
            # The next region starts from this stage merged into the previous one: the band
            # of the merged binary mask, the raw logits of the previous stage elsewhere.
            merged = merge_stage_logits(stage_logits[i - 1], logits, previous_binary)
            previous_binary = merged.sigmoid() >= 0.5
        total = total + weight * loss
    return total
