"""RoIPool (max pooling over quantised bins) with the numbers of ``torchvision.ops.roi_pool``.

Box corners are rounded to feature pixels (half away from zero, as C's ``round``), the RoI
is split into ``PH x PW`` bins with floor/ceil edges, and each bin takes the maximum of its
pixels (0 for an empty bin). The bins are ragged, so every pixel of every bin is enumerated
once and ``embedding_bag(mode="max")`` reduces them; its autograd routes the gradient to the
arg-max pixel as the C++ kernel does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    ArgumentRuntimeError,
    as_rois,
    bag_offsets,
    bags_to_nchw,
    channels_last_table,
    check_feature_map,
    check_float,
    compute_dtype,
    empty_output,
    pair,
    ragged_arange,
)


def _round_half_away(v: Tensor) -> Tensor:
    """C's ``std::round``. ``floor(|v| + 0.5)`` would round 0.49999999999999994 up, since the
    addition rounds; ``|v| - floor(|v|)`` is exact."""
    magnitude = v.abs()
    whole = torch.floor(magnitude)
    return torch.sign(v) * (whole + (magnitude - whole >= 0.5).to(v.dtype))


def roi_pool(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """Max-pool ``(K, C, PH, PW)`` features for each RoI, as ``torchvision.ops.roi_pool``.

    ``input`` is ``(B, C, H, W)`` (float16/bfloat16 are computed in float32 and returned in
    their dtype); ``boxes`` are in its dtype (float32 RoIs are also accepted with
    float16/bfloat16 input), as a ``(K, 5)`` tensor or a list of ``(L_i, 4)`` tensors.
    """
    check_feature_map(input, not_tensor=ArgumentRuntimeError)
    rois = as_rois(boxes, input)
    ph, pw = pair(output_size, "output_size")
    spatial_scale = check_float(spatial_scale, "spatial_scale")
    _, channels, height, width = input.shape
    k = rois.shape[0]
    if k == 0 or channels == 0:
        return empty_output(input, k, channels, ph, pw)

    dtype = compute_dtype(input.dtype)
    device = input.device
    r = rois.detach().to(dtype)
    start_x = _round_half_away(r[:, 1] * spatial_scale).long()
    start_y = _round_half_away(r[:, 2] * spatial_scale).long()
    end_x = _round_half_away(r[:, 3] * spatial_scale).long()
    end_y = _round_half_away(r[:, 4] * spatial_scale).long()
    bin_w = (end_x - start_x + 1).clamp(min=1).to(dtype) / pw
    bin_h = (end_y - start_y + 1).clamp(min=1).to(dtype) / ph

    by = torch.arange(ph, device=device, dtype=dtype)
    bx = torch.arange(pw, device=device, dtype=dtype)
    h0 = (torch.floor(by[None] * bin_h[:, None]).long() + start_y[:, None]).clamp(0, height)
    h1 = (torch.ceil((by[None] + 1) * bin_h[:, None]).long() + start_y[:, None]).clamp(0, height)
    w0 = (torch.floor(bx[None] * bin_w[:, None]).long() + start_x[:, None]).clamp(0, width)
    w1 = (torch.ceil((bx[None] + 1) * bin_w[:, None]).long() + start_x[:, None]).clamp(0, width)
    # Per bin (K, PH, PW): top-left pixel and extent; an empty bin has no pixels and reads 0.
    top = h0[:, :, None].expand(k, ph, pw).reshape(-1)
    left = w0[:, None, :].expand(k, ph, pw).reshape(-1)
    rows = (h1 - h0).clamp(min=0)[:, :, None].expand(k, ph, pw).reshape(-1)
    cols = (w1 - w0).clamp(min=0)[:, None, :].expand(k, ph, pw).reshape(-1)
    sizes = rows * cols

    bin_id, rank = ragged_arange(sizes)
    y = top[bin_id] + rank // cols[bin_id]
    x = left[bin_id] + rank % cols[bin_id]
    image = rois[:, 0].detach().long().repeat_interleave(ph * pw)[bin_id]
    index = (image * height + y) * width + x

    pooled = F.embedding_bag(
        index, channels_last_table(input, dtype), offsets=bag_offsets(sizes), mode="max"
    )
    return bags_to_nchw(pooled, k, ph, pw, input.dtype)


class RoIPool(nn.Module):
    """Module form of :func:`roi_pool` (same arguments as ``torchvision.ops.RoIPool``)."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float) -> None:
        super().__init__()
        pair(output_size, "output_size")  # fail at construction, not at the first call
        self.output_size = output_size  # as given, like torchvision (and its repr)
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, rois: Tensor | Sequence[Tensor]) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"
