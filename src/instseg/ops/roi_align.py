"""RoIAlign with the numbers of ``torchvision.ops.roi_align`` (spec §1.1), in pure PyTorch.

Each output bin averages ``gh * gw`` bilinear samples taken on a regular grid inside the bin.
A bilinear sample is a weighted sum of four feature pixels, so a whole bin is a weighted sum
of ``4 * gh * gw`` rows of the ``(B*H*W, C)`` feature table: one ``embedding_bag`` call
evaluates every bin of every RoI at once, never materialising per-sample channel vectors,
and its autograd gives the feature gradient. Adaptive sampling (``sampling_ratio <= 0``)
gives each RoI its own grid size; the samples are enumerated as one ragged range.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    as_rois,
    bag_offsets,
    bags_to_nchw,
    channels_last_table,
    check_feature_map,
    compute_dtype,
    empty_output,
    pair,
    ragged_arange,
)


def _bilinear_corners(coord: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """torchvision's bilinear rule along one axis.

    Returns ``(valid, low, high, w_low, w_high)``: a sample outside ``[-1, size]`` is invalid
    (contributes 0); otherwise it is clamped below at 0, and at or past the last pixel it reads
    only that pixel.
    """
    valid = (coord >= -1.0) & (coord <= size)
    coord = torch.where(valid, coord, torch.zeros_like(coord)).clamp(min=0)
    low = coord.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(coord), coord - low.to(coord.dtype))
    return valid, low, high, 1.0 - frac, frac


def roi_align(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """Pool ``(K, C, PH, PW)`` features for each RoI, as ``torchvision.ops.roi_align``.

    Args:
        input: feature map ``(B, C, H, W)``; float16/bfloat16 are computed in float32.
        boxes: ``(K, 5)`` RoIs ``(batch_idx, x1, y1, x2, y2)`` or a list of ``(L_i, 4)`` boxes.
        output_size: ``PH`` or ``(PH, PW)``.
        spatial_scale: factor from box coordinates to feature-map coordinates.
        sampling_ratio: samples per bin along each axis; ``<= 0`` means ``ceil(roi_size / bins)``.
        aligned: shift box coordinates by -0.5 pixel (the pixel-centre model of Detectron2).
    """
    check_feature_map(input)
    rois = as_rois(boxes, input)
    ph, pw = pair(output_size, "output_size")
    if not isinstance(sampling_ratio, int):
        raise ValueError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    _, channels, height, width = input.shape
    k = rois.shape[0]
    if k == 0:
        return empty_output(input, channels, ph, pw)

    dtype = compute_dtype(input.dtype)
    device = input.device
    r = rois.detach().to(dtype)
    offset = 0.5 if aligned else 0.0
    x1 = r[:, 1] * spatial_scale - offset
    y1 = r[:, 2] * spatial_scale - offset
    roi_w = r[:, 3] * spatial_scale - offset - x1
    roi_h = r[:, 4] * spatial_scale - offset - y1
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_w = roi_w / pw
    bin_h = roi_h / ph
    if sampling_ratio > 0:
        grid_h = torch.full((k,), sampling_ratio, dtype=torch.long, device=device)
        grid_w = grid_h
    else:
        # An inverted aligned box has a negative size: no samples, the bin reads 0.
        grid_h = torch.ceil(roi_h / ph).long().clamp(min=0)
        grid_w = torch.ceil(roi_w / pw).long().clamp(min=0)
    samples_per_bin = grid_h * grid_w

    # Every sample of every bin of every RoI, ordered (roi, ph, pw, iy, ix).
    roi, rank = ragged_arange(samples_per_bin * (ph * pw))
    gw, gh = grid_w[roi], grid_h[roi]
    ix = rank % gw
    rank = rank // gw
    iy = rank % gh
    rank = rank // gh
    bx = rank % pw
    by = rank // pw
    bh, bw = bin_h[roi], bin_w[roi]
    y = y1[roi] + by * bh + (iy + 0.5) * bh / gh
    x = x1[roi] + bx * bw + (ix + 0.5) * bw / gw

    valid_y, y_lo, y_hi, wy_lo, wy_hi = _bilinear_corners(y, height)
    valid_x, x_lo, x_hi, wx_lo, wx_hi = _bilinear_corners(x, width)
    scale = (valid_y & valid_x).to(dtype) / samples_per_bin[roi].clamp(min=1).to(dtype)
    base = rois[roi, 0].detach().long() * height
    rows_lo = (base + y_lo) * width
    rows_hi = (base + y_hi) * width
    index = torch.stack([rows_lo + x_lo, rows_lo + x_hi, rows_hi + x_lo, rows_hi + x_hi], 1)
    weight = torch.stack([wy_lo * wx_lo, wy_lo * wx_hi, wy_hi * wx_lo, wy_hi * wx_hi], 1)
    weight = weight * scale[:, None]

    bag_sizes = torch.repeat_interleave(4 * samples_per_bin, ph * pw)
    pooled = F.embedding_bag(
        index.reshape(-1),
        channels_last_table(input, dtype),
        offsets=bag_offsets(bag_sizes),
        per_sample_weights=weight.reshape(-1),
        mode="sum",
    )
    return bags_to_nchw(pooled, k, ph, pw, input.dtype)


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` (same arguments as ``torchvision.ops.RoIAlign``)."""

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        self.output_size = pair(output_size, "output_size")
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor | Sequence[Tensor]) -> Tensor:
        return roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )
