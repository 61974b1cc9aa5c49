"""RoIAlign with the numbers of ``torchvision.ops.roi_align`` (spec §1.1), in pure PyTorch.

Each output bin averages ``gh * gw`` bilinear samples taken on a regular grid inside the bin.
Sampling grid, bilinear weights and validity rule are all separable in y and x, so a bin is
a weighted sum of (row tap x column tap) pixels, at most ``(gh + 1) * (gw + 1)`` of them for
adaptive sampling instead of ``4 * gh * gw`` corner reads. Every bin is a weighted sum of
rows of the ``(B*H*W, C)`` feature table: one ``embedding_bag`` call evaluates every bin of
every RoI at once, never materialising per-sample channel vectors, and its autograd gives
the feature gradient. Adaptive sampling (``sampling_ratio <= 0``) gives each RoI its own
grid size; the bins are enumerated as one ragged range.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    as_rois,
    autocast_enabled,
    bag_offsets,
    bags_to_nchw,
    channels_last_table,
    check_bool,
    check_feature_map,
    check_float,
    check_int,
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


def _axis_taps(
    start: Tensor, bin_size: Tensor, grid: Tensor, bins: int, size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The pixels ("taps") each bin reads along one axis, and their weights.

    The samples of a bin form a ``grid_h x grid_w`` tensor product and the bilinear weights
    and the validity rule are separable, so a bin's average is
    ``sum_{r, c} wy[r] * wx[c] * F[r, c]``: a weighted sum over row taps times column taps.
    Each sample touches two pixels per axis; along the axis the taps of one bin are stored
    either as that list (``2 * grid`` entries) or, when shorter, as the dense pixel range they
    span with the weights of shared pixels summed (at most ``grid + 1`` entries when samples
    are at most one pixel apart, as adaptive sampling guarantees).

    Returns ``(pixels, weights, counts)``: ``(K, bins, T)`` pixel indices and weights (the
    weights include the ``1 / grid`` of the average and zero for invalid samples), and the
    ``(K, bins)`` number of meaningful taps in each bin.
    """
    k = start.shape[0]
    samples = max(int(grid.max()), 1)
    step = torch.arange(samples, device=start.device)
    bin_index = torch.arange(bins, device=start.device)
    size_ = bin_size[:, None, None]
    # torchvision's order of operations: start + b * bin + (i + 0.5) * bin / grid.
    coord = (start[:, None, None] + bin_index[:, None] * size_) + (
        (step + 0.5) * size_ / grid.clamp(min=1)[:, None, None]
    )  # (K, bins, samples)
    active = (step < grid[:, None, None]).expand(k, bins, samples)
    valid, low, high, w_low, w_high = _bilinear_corners(coord, size)
    used = valid & active
    scale = used.to(coord.dtype) / grid.clamp(min=1).to(coord.dtype)[:, None, None]
    w_low, w_high = w_low * scale, w_high * scale

    # Dense pixel range of the used samples, with shared pixels' weights summed.
    first = torch.where(used, low, size).amin(-1)
    last = torch.where(used, high, -1).amax(-1)
    span = (last - first + 1).clamp(min=0)
    width = 2 * samples
    as_range = span <= 2 * grid[:, None]
    offset_low = (low - first[..., None]).clamp(0, width - 1)
    offset_high = (high - first[..., None]).clamp(0, width - 1)
    mask = as_range[..., None].to(coord.dtype)
    range_weights = torch.zeros(k, bins, width, dtype=coord.dtype, device=coord.device)
    range_weights.scatter_add_(-1, offset_low, w_low * mask)
    range_weights.scatter_add_(-1, offset_high, w_high * mask)
    range_pixels = (first[..., None] + torch.arange(width, device=start.device)).clamp(0, size - 1)
    # Otherwise the list of both taps of every sample, interleaved.
    list_pixels = torch.stack([low, high], -1).reshape(k, bins, width)
    list_weights = torch.stack([w_low, w_high], -1).reshape(k, bins, width)

    counts = torch.where(as_range, span, 2 * grid[:, None].expand(k, bins))
    taps = max(int(counts.max()), 1)
    pixels = torch.where(as_range[..., None], range_pixels, list_pixels)[..., :taps]
    weights = torch.where(as_range[..., None], range_weights, list_weights)[..., :taps]
    return pixels, weights, counts


def roi_taps(
    boxes: Tensor,
    output_size: tuple[int, int],
    map_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """RoIAlign's row and column taps (:func:`_axis_taps`) of ``(K, 4)`` xyxy ``boxes`` pooled
    at ``output_size = (PH, PW)`` from a map of ``map_size = (H, W)``, with torchvision's
    coordinate arithmetic and adaptive grid (``sampling_ratio <= 0``)."""
    ph, pw = output_size
    offset = 0.5 if aligned else 0.0
    x1 = boxes[:, 0] * spatial_scale - offset
    y1 = boxes[:, 1] * spatial_scale - offset
    roi_w = boxes[:, 2] * spatial_scale - offset - x1
    roi_h = boxes[:, 3] * spatial_scale - offset - y1
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = torch.full(
            (boxes.shape[0],), sampling_ratio, dtype=torch.long, device=boxes.device
        )
        grid_w = grid_h
    else:
        # An inverted aligned box has a negative size: no samples, the bin reads 0.
        grid_h = torch.ceil(roi_h / ph).long().clamp(min=0)
        grid_w = torch.ceil(roi_w / pw).long().clamp(min=0)
    rows = _axis_taps(y1, roi_h / ph, grid_h, ph, map_size[0])
    cols = _axis_taps(x1, roi_w / pw, grid_w, pw, map_size[1])
    return rows, cols


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
        input: feature map ``(B, C, H, W)``; float16/bfloat16 are computed in float32 and
            returned in their dtype.
        boxes: ``(K, 5)`` RoIs ``(batch_idx, x1, y1, x2, y2)`` or a list of ``(L_i, 4)`` boxes,
            in ``input``'s dtype (float32 RoIs are also accepted with float16/bfloat16 input,
            and under autocast any mix of float16, bfloat16 and float32, as torchvision).
        output_size: ``PH`` or ``(PH, PW)``.
        spatial_scale: factor from box coordinates to feature-map coordinates.
        sampling_ratio: samples per bin along each axis; ``<= 0`` means ``ceil(roi_size / bins)``.
        aligned: shift box coordinates by -0.5 pixel (the pixel-centre model of Detectron2).

    The output is contiguous, as torchvision's; :func:`roi_align_keep_layout` keeps a
    channels-last input's layout instead.
    """
    return _roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, False)


def roi_align_keep_layout(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """:func:`roi_align` whose output is channels-last when ``input`` is, as a convolution's
    would be (a view of the pooled rows, no copy). The RoI heads use it so that a
    channels-last network stays channels-last."""
    return _roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, True)


def _roi_align(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    keep_layout: bool,
) -> Tensor:
    check_feature_map(input)
    rois = as_rois(boxes, input, mixed_dtypes=autocast_enabled(input.device))
    ph, pw = pair(output_size, "output_size")
    spatial_scale = check_float(spatial_scale, "spatial_scale")
    sampling_ratio = check_int(sampling_ratio, "sampling_ratio")
    aligned = check_bool(aligned, "aligned")
    _, channels, height, width = input.shape
    k = rois.shape[0]
    if k == 0 or channels == 0:
        return empty_output(input, k, channels, ph, pw)

    dtype = compute_dtype(input.dtype)
    rows_taps, cols_taps = roi_taps(
        rois.detach().to(dtype)[:, 1:],
        (ph, pw),
        (height, width),
        spatial_scale,
        sampling_ratio,
        aligned,
    )
    rows, row_weights, row_counts = rows_taps
    cols, col_weights, col_counts = cols_taps

    # A bin is the outer product of its row taps and column taps: enumerate every pair of
    # every bin of every RoI as one ragged range, ordered (roi, ph, pw, row tap, col tap).
    bag_sizes = (row_counts[:, :, None] * col_counts[:, None, :]).reshape(-1)
    bag, rank = ragged_arange(bag_sizes)
    roi = bag // (ph * pw)
    by = (bag // pw) % ph
    bx = bag % pw
    n_cols = col_counts[roi, bx]
    ty, tx = rank // n_cols, rank % n_cols
    image = rois[:, 0].detach().long()[roi]
    index = (image * height + rows[roi, by, ty]) * width + cols[roi, bx, tx]
    weight = row_weights[roi, by, ty] * col_weights[roi, bx, tx]

    pooled = F.embedding_bag(
        index,
        channels_last_table(input, dtype),
        offsets=bag_offsets(bag_sizes),
        per_sample_weights=weight,
        mode="sum",
    )
    return bags_to_nchw(
        pooled,
        k,
        ph,
        pw,
        input.dtype,
        keep_layout and input.is_contiguous(memory_format=torch.channels_last),
    )


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
        pair(output_size, "output_size")  # fail at construction, not at the first call
        self.output_size = output_size  # as given, like torchvision (and its repr)
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
