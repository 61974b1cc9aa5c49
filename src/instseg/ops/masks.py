"""Pasting fixed-size RoI masks into the image (mmdet ``_do_paste_mask``, spec §1.4, or
torchvision's ``paste_masks_in_image``, spec §13.6).

The reference semantics (``mode="grid_sample"``, mmdet): for image pixel centres
``u = x + 0.5``, ``v = y + 0.5`` form ``gx = (u - x1) / (x2 - x1) * 2 - 1`` (``gy``
likewise; a non-finite value from a zero-size box becomes 0) and bilinearly sample the mask
there with ``align_corners=False`` and zero padding. Thresholding is ``>= threshold``.

``mode="torchvision"``: the mask is padded by one zero cell on each side, its box grown by
``(M + 2) / M`` about the centre and truncated to integers ``[x0, x1]`` (``int64``
conversion, towards zero); the padded mask is resized bilinearly (``align_corners=False``,
source coordinates clamped at 0) to ``(y1 - y0 + 1, x1 - x0 + 1)`` and written at
``(y0, x0)``, cut to the image.

How: that sampling is separable, so one mask's pasted window is ``Ay @ M @ Ax^T`` with two
thin interpolation matrices. Each mask is evaluated only over its window (its box grown by
its full interpolation support, so the window loses nothing), masks are sorted by window
size and processed in chunks whose float buffers stay under ``max_chunk_bytes``. Hundreds of
masks on a large image therefore never hold all dense float masks at once; only the (bool)
result is image-sized.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import compute_dtype

PASTE_MODES = ("grid_sample", "torchvision")
# Bytes touched per window pixel in one chunk: float value, bool validity, flat int64 index,
# and the compacted index and value of the pixels written.
_BYTES_PER_WINDOW_PIXEL = 32


def _window(lo: Tensor, hi: Tensor, mask_size: int, limit: int) -> tuple[Tensor, Tensor]:
    """Pixel range ``[start, stop)`` that covers the support of a pasted mask along one axis.

    The mask samples are non-zero up to half a mask cell beyond the box edges.
    """
    margin = (hi - lo).abs() / (2 * mask_size)
    start = (torch.floor(lo - margin) - 1).clamp(0, limit).long()
    stop = (torch.ceil(hi + margin) + 1).clamp(0, limit).long()
    return start, torch.maximum(stop, start)


def _interpolation_matrix(centres: Tensor, lo: Tensor, hi: Tensor, mask_size: int) -> Tensor:
    """``(N, P, mask_size)`` weights of ``grid_sample(align_corners=False)`` along one axis.

    ``centres`` are the ``(N, P)`` pixel centres; ``lo, hi`` the ``(N,)`` box edges.
    """
    g = (centres - lo[:, None]) / (hi - lo)[:, None] * 2 - 1
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    source = ((g + 1) * mask_size - 1) / 2
    left = torch.floor(source)
    frac = source - left
    cells = torch.arange(mask_size, device=centres.device, dtype=centres.dtype)
    offset = cells - left[..., None]  # 0 at the left tap, 1 at the right tap
    return (offset == 0) * (1 - frac)[..., None] + (offset == 1) * frac[..., None]


def _resize_matrix(pixels: Tensor, start: Tensor, size: Tensor, mask_size: int) -> Tensor:
    """``(N, P, mask_size)`` weights of a bilinear resize (``align_corners=False``) of
    ``mask_size`` cells to ``size`` outputs whose first output sits at pixel ``start``:
    ``F.interpolate``'s sampling rule along one axis, evaluated at image ``pixels``."""
    scale = mask_size / size.to(pixels.dtype)
    source = (scale[:, None] * (pixels - start[:, None] + 0.5) - 0.5).clamp(min=0)
    left = torch.floor(source)
    frac = source - left
    right = (left + 1).clamp(max=mask_size - 1)
    cells = torch.arange(mask_size, device=pixels.device, dtype=pixels.dtype)
    return (cells == left[..., None]) * (1 - frac)[..., None] + (cells == right[..., None]) * frac[
        ..., None
    ]


def _chunks(heights: Tensor, widths: Tensor, max_pixels: int) -> list[tuple[int, int]]:
    """Split masks (sorted by window area) into ``[start, stop)`` runs whose padded windows
    ``count * max_h * max_w`` stay within ``max_pixels`` (always at least one mask)."""
    h, w = heights.tolist(), widths.tolist()
    spans, start, n = [], 0, len(h)
    while start < n:
        tall = torch.tensor(h[start:]).cummax(0).values
        wide = torch.tensor(w[start:]).cummax(0).values
        count = torch.arange(1, n - start + 1)
        fits = int((count * tall * wide <= max_pixels).sum())
        stop = start + max(fits, 1)
        spans.append((start, stop))
        start = stop
    return spans


def paste_masks_in_image(
    masks: Tensor,
    boxes: Tensor,
    image_shape: tuple[int, int],
    threshold: float | None = 0.5,
    max_chunk_bytes: int = 256 * 2**20,
    mode: str = "grid_sample",
) -> Tensor:
    """Paste ``(N, 1, M, M)`` (or ``(N, Mh, Mw)``) mask probabilities into an image.

    Args:
        masks: per-RoI mask probabilities.
        boxes: ``(N, 4)`` boxes in the output image's coordinates.
        image_shape: ``(height, width)`` of the output image.
        threshold: ``>= threshold`` gives a bool ``(N, H, W)``; ``None`` returns the soft masks
            ``(N, H, W)`` in the masks' dtype.
        max_chunk_bytes: upper bound on the scratch memory of one chunk.
        mode: "grid_sample" (mmdet) or "torchvision" (its one-cell padding and integer
            boxes); see the module docstring.
    """
    if mode not in PASTE_MODES:
        raise ValueError(f"mode must be one of {PASTE_MODES}, got {mode!r}")
    if not isinstance(masks, Tensor) or masks.dim() not in (3, 4):
        raise ValueError("masks must be a Tensor[N, 1, Mh, Mw] or Tensor[N, Mh, Mw]")
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"masks must have one channel, got shape {tuple(masks.shape)}")
        masks = masks[:, 0]
    if not masks.is_floating_point():
        raise ValueError(f"masks must be floating point probabilities, got {masks.dtype}")
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape != (masks.shape[0], 4):
        got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be a Tensor[{masks.shape[0]}, 4] (one per mask), got {got}")
    if boxes.device != masks.device:
        raise ValueError(f"boxes are on {boxes.device} but masks are on {masks.device}")
    height, width = (int(s) for s in image_shape)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_shape must be positive (height, width), got {image_shape!r}")
    if max_chunk_bytes <= 0:
        raise ValueError(f"max_chunk_bytes must be positive, got {max_chunk_bytes}")

    n, mask_h, mask_w = masks.shape
    device = masks.device
    out_dtype = torch.bool if threshold is not None else masks.dtype
    out = torch.zeros((n, height, width), dtype=out_dtype, device=device)
    if n == 0:
        return out

    dtype = compute_dtype(masks.dtype)
    if mode == "torchvision":
        masks = torch.nn.functional.pad(masks, (1, 1, 1, 1))
        # The box grows by the padded/unpadded ratio of the mask's width, in the boxes' dtype.
        ratio = (mask_w + 2) / mask_w
        b = boxes.detach()
        half_w, half_h = (b[:, 2] - b[:, 0]) * 0.5 * ratio, (b[:, 3] - b[:, 1]) * 0.5 * ratio
        cx, cy = (b[:, 2] + b[:, 0]) * 0.5, (b[:, 3] + b[:, 1]) * 0.5
        corner = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 1).long()
        b = corner.to(dtype)
        size_x = (corner[:, 2] - corner[:, 0] + 1).clamp(min=1)
        size_y = (corner[:, 3] - corner[:, 1] + 1).clamp(min=1)
        x_start, x_stop = corner[:, 0].clamp(0, width), (corner[:, 2] + 1).clamp(0, width)
        y_start, y_stop = corner[:, 1].clamp(0, height), (corner[:, 3] + 1).clamp(0, height)
        x_stop, y_stop = torch.maximum(x_stop, x_start), torch.maximum(y_stop, y_start)
        mask_h, mask_w = mask_h + 2, mask_w + 2
    else:
        b = boxes.detach().to(dtype)
        x_start, x_stop = _window(b[:, 0], b[:, 2], mask_w, width)
        y_start, y_stop = _window(b[:, 1], b[:, 3], mask_h, height)
    win_h, win_w = y_stop - y_start, x_stop - x_start
    order = torch.argsort(win_h * win_w)
    max_pixels = max(1, max_chunk_bytes // _BYTES_PER_WINDOW_PIXEL)
    flat_out = out.view(-1)

    for start, stop in _chunks(win_h[order], win_w[order], max_pixels):
        idx = order[start:stop]
        rows = int(win_h[idx].max())
        cols = int(win_w[idx].max())
        if rows == 0 or cols == 0:
            continue
        ys = y_start[idx, None] + torch.arange(rows, device=device)  # (n_c, rows)
        xs = x_start[idx, None] + torch.arange(cols, device=device)  # (n_c, cols)
        if mode == "torchvision":
            ay = _resize_matrix(ys.to(dtype), b[idx, 1], size_y[idx], mask_h)
            ax = _resize_matrix(xs.to(dtype), b[idx, 0], size_x[idx], mask_w)
        else:
            ay = _interpolation_matrix(ys.to(dtype) + 0.5, b[idx, 1], b[idx, 3], mask_h)
            ax = _interpolation_matrix(xs.to(dtype) + 0.5, b[idx, 0], b[idx, 2], mask_w)
        pasted = ay @ masks[idx].to(dtype) @ ax.transpose(1, 2)  # (n_c, rows, cols)
        inside = (ys < y_stop[idx, None])[:, :, None] & (xs < x_stop[idx, None])[:, None, :]
        flat = (idx[:, None, None] * height + ys[:, :, None]) * width + xs[:, None, :]
        values = pasted[inside]
        flat_out[flat[inside]] = (
            values >= threshold if threshold is not None else values.to(out_dtype)
        )
    return out
