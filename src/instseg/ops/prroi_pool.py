"""Precise RoI Pooling (IoU-Net; official ``vacancy/PreciseRoIPooling`` semantics, spec §6).

Each bin's value is the exact integral of the zero-extended bilinear feature surface over
the bin, divided by the bin area. Feature pixel ``(i, j)`` sits at the continuous point
``(y=i, x=j)``; boxes are ``[L, R)`` with width ``x1 - x0``; a zero-area bin reads 0; area
outside the map integrates to 0 but still counts in the area (dilution).

How it is computed (spec §6.2, "O(1)-per-bin form"): with ``S`` the 2-D prefix sum of the
map, the integral of the surface over ``(-inf, x] x (-inf, y]`` is
``G(x, y) = sum_{a,b in {-1,0,1}} q_a(ty) q_b(tx) S[ky + a, kx + b]`` (quadratic B-spline
weights of the fractional parts). A RoI with ``PH x PW`` bins needs ``G`` only on its
``(PH+1) x (PW+1)`` bin corners, and each bin integral is a 2-D difference of ``G``. So the
cost per RoI is independent of its size, one ``embedding_bag`` call evaluates all corners of
all RoIs, and plain autograd through the spline weights gives the continuous gradient with
respect to the four box coordinates (spec §6.4); the feature gradient (§6.3) is the
reverse prefix sum of the gradient reaching the table. ``S`` is kept in float64 (float32
prefix sums over large maps lose about 1e-2 relative precision), except on devices without
float64 (MPS).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    ArgumentAssertionError,
    as_rois,
    bags_to_nchw,
    check_feature_map,
    check_float,
    empty_output,
    pair,
)


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class _PrefixSumTable(torch.autograd.Function):
    """The 2-D inclusive prefix sums of a ``(B, C, H, W)`` map as a ``(B*(H+1)*(W+1), C)``
    row table (channels last, for ``embedding_bag``), in ``dtype``.

    Row/column 0 of each image stand for index -1 and hold zeros. The backward is the
    reverse 2-D prefix sum of the incoming gradient. Written as one Function so that
    forward and backward are a handful of in-place passes over the map instead of the
    chain of copies that autograd through ``to``/``cumsum``/``pad``/``permute`` makes.
    """

    @staticmethod
    def forward(ctx, features: Tensor, dtype: torch.dtype) -> Tensor:
        batch, channels, height, width = features.shape
        table = features.new_zeros((batch, height + 1, width + 1, channels), dtype=dtype)
        table[:, 1:, 1:].copy_(features.permute(0, 2, 3, 1))
        table.cumsum_(1)
        table.cumsum_(2)
        ctx.features_dtype = features.dtype
        ctx.shape = (batch, channels, height, width)
        return table.view(-1, channels)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        batch, channels, height, width = ctx.shape
        grad = grad.reshape(batch, height + 1, width + 1, channels)[:, 1:, 1:].flip((1, 2))
        grad.cumsum_(1)
        grad.cumsum_(2)
        grad = grad.flip((1, 2)).permute(0, 3, 1, 2)
        return grad.to(dtype=ctx.features_dtype, memory_format=torch.contiguous_format), None


class _CornerDifference(torch.autograd.Function):
    """Bin integrals ``G[q+1, p+1] - G[q, p+1] - G[q+1, p] + G[q, p]`` from ``(K, PH+1, PW+1, C)``
    corner values. One Function so that the backward is four in-place adds into one buffer
    rather than four zero-filled slice gradients."""

    @staticmethod
    def forward(ctx, corners: Tensor) -> Tensor:
        out = corners[:, 1:, 1:] - corners[:, :-1, 1:]
        out -= corners[:, 1:, :-1]
        out += corners[:, :-1, :-1]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        k, ph, pw, channels = grad.shape
        corners = grad.new_zeros((k, ph + 1, pw + 1, channels))
        corners[:, 1:, 1:] += grad
        corners[:, :-1, 1:] -= grad
        corners[:, 1:, :-1] -= grad
        corners[:, :-1, :-1] += grad
        return corners


def _spline_taps(coord: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Prefix-sum rows (shifted by one for the zero pad) and weights of ``G`` along one axis.

    ``coord`` is clamped to ``[-2, size + 1]``: ``G`` is constant (0, or the full sum) beyond
    ``-1`` and ``size``, so the clamp changes neither the value nor the gradient (both zero
    there), and it keeps ``floor`` far from integer overflow.
    """
    coord = coord.clamp(-2.0, size + 1.0)
    k = coord.detach().floor()
    t = coord - k
    weights = torch.stack([(1 - t) ** 2 / 2, 0.5 + t - t * t, t * t / 2], dim=-1)
    taps = torch.tensor([-1, 0, 1], device=coord.device)
    rows = (k.long()[..., None] + taps).clamp(-1, size - 1) + 1
    return rows, weights


def prroi_pool2d(
    features: Tensor,
    rois: Tensor | Sequence[Tensor],
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
) -> Tensor:
    """Precise RoI pooling: ``(K, C, pooled_height, pooled_width)``, differentiable in both
    ``features`` and the four coordinates of ``rois`` (the batch-index column gets 0).

    Args:
        features: ``(B, C, H, W)`` float32 or float64; float16/bfloat16 are computed at higher
            precision and returned in their own dtype. Any device (the official code is
            CUDA-only).
        rois: ``(K, 5)`` ``(batch_idx, x0, y0, x1, y1)`` in input-image coordinates (or a list
            of ``(L_i, 4)`` boxes per image).
        pooled_height, pooled_width: bins per RoI.
        spatial_scale: factor from RoI coordinates to feature-map coordinates (e.g. 1/16).
    """
    # The official code asserts float features and rois: its dtype errors are AssertionErrors.
    check_feature_map(features, "features", dtype_error=ArgumentAssertionError)
    rois = as_rois(rois, features, "rois", dtype_error=ArgumentAssertionError)
    ph, pw = pair((pooled_height, pooled_width), "(pooled_height, pooled_width)")
    spatial_scale = check_float(spatial_scale, "spatial_scale")
    _, channels, height, width = features.shape
    k = rois.shape[0]
    if k == 0 or channels == 0:
        return empty_output(features, k, channels, ph, pw)

    acc = _accumulation_dtype(features.device)
    table = _PrefixSumTable.apply(features, acc)

    r = rois.to(acc)
    x0, y0 = r[:, 1] * spatial_scale, r[:, 2] * spatial_scale
    roi_w = (r[:, 3] * spatial_scale - x0).clamp(min=0)
    roi_h = (r[:, 4] * spatial_scale - y0).clamp(min=0)
    bin_w, bin_h = roi_w / pw, roi_h / ph
    steps_x = torch.arange(pw + 1, device=features.device, dtype=acc)
    steps_y = torch.arange(ph + 1, device=features.device, dtype=acc)
    corner_x = x0[:, None] + steps_x * bin_w[:, None]  # (K, PW+1)
    corner_y = y0[:, None] + steps_y * bin_h[:, None]  # (K, PH+1)
    rows_x, wts_x = _spline_taps(corner_x, width)
    rows_y, wts_y = _spline_taps(corner_y, height)

    # 9 prefix-sum taps for each of the (PH+1)(PW+1) bin corners: (K, PH+1, PW+1, 3, 3).
    image_rows = rois[:, 0].detach().long()[:, None, None] * (height + 1) + rows_y  # (K, PH+1, 3)
    index = image_rows[:, :, None, :, None] * (width + 1) + rows_x[:, None, :, None, :]
    # Dividing by the bin area is folded into the weights; a zero-area bin gets weight 0.
    area = bin_w * bin_h
    positive = area > 0
    inv_area = torch.where(positive, 1 / torch.where(positive, area, 1.0), 0.0)
    weight = (
        wts_y[:, :, None, :, None]
        * wts_x[:, None, :, None, :]
        * inv_area[:, None, None, None, None]
    )
    corners = F.embedding_bag(
        index.reshape(-1, 9), table, per_sample_weights=weight.reshape(-1, 9), mode="sum"
    ).view(k, ph + 1, pw + 1, channels)
    pooled = _CornerDifference.apply(corners)
    return bags_to_nchw(pooled.reshape(k * ph * pw, channels), k, ph, pw, features.dtype)


class PrRoIPool2D(nn.Module):
    """Module form of :func:`prroi_pool2d`, as the official ``PrRoIPool2D``."""

    def __init__(self, pooled_height: int, pooled_width: int, spatial_scale: float) -> None:
        super().__init__()
        self.pooled_height, self.pooled_width = pair(
            (pooled_height, pooled_width), "(pooled_height, pooled_width)"
        )
        self.spatial_scale = float(spatial_scale)

    def forward(self, features: Tensor, rois: Tensor | Sequence[Tensor]) -> Tensor:
        return prroi_pool2d(
            features, rois, self.pooled_height, self.pooled_width, self.spatial_scale
        )

    def extra_repr(self) -> str:
        return (
            f"pooled_height={self.pooled_height}, pooled_width={self.pooled_width}, "
            f"spatial_scale={self.spatial_scale}"
        )
