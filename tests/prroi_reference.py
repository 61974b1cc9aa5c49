"""Float64 loop references for Precise RoI Pooling, shared by the PyTorch and TensorFlow tests.

Written here, loop by loop in plain Python / numpy, straight from the definition (spec §6):

* the continuous surface ``f(x, y) = sum_{i<H, j<W} F[i, j] k(y - i) k(x - j)`` with the hat
  ``k(t) = max(0, 1 - |t|)`` (pixel ``(i, j)`` sits at ``y = i, x = j``; zero outside the map);
* a bin's value is the integral of ``f`` over the bin divided by the bin area (0 for a zero-area
  bin); area outside the map integrates to 0 but still counts (dilution);
* the box gradient of spec §6.4 (edge integrals of ``f``), chained to the RoI coordinates;
* the feature gradient: the output is linear in the map, so it is the reference forward of unit
  maps weighted by the upstream gradient.

Nothing of instseg is imported.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# --------------------------------------------------------------------------------------------
# Float64 references
# --------------------------------------------------------------------------------------------


def _hat_integral(p: float, q: float) -> float:
    """``int_p^q (1 - u) du`` for ``0 <= p <= q <= 1``."""
    return (q - q * q / 2.0) - (p - p * p / 2.0)


def ref_bin_integral(fmap: np.ndarray, a1: float, a2: float, b1: float, b2: float) -> float:
    """Exact ``int_{b1}^{b2} int_{a1}^{a2} f(x, y) dx dy``, cell by cell.

    Inside the unit cell ``[w, w+1] x [h, h+1]`` the surface is bilinear in the cell's four
    corner pixels (corners outside the map contribute 0); the integral over the clipped cell
    is a sum over corners of ``F[corner] * I(u-range) * I(v-range)``.
    """
    height, width = fmap.shape
    if a2 <= a1 or b2 <= b1:
        return 0.0
    total = 0.0
    # Cells with h in [-1, H-1] (w in [-1, W-1]) touch at least one pixel of the map.
    for h in range(max(math.floor(b1), -1), min(math.ceil(b2), height)):
        beta0, beta1 = max(b1, float(h)), min(b2, float(h + 1))
        if beta1 <= beta0:
            continue
        iy_top = _hat_integral(beta0 - h, beta1 - h)
        iy_bottom = _hat_integral(h + 1 - beta1, h + 1 - beta0)
        for w in range(max(math.floor(a1), -1), min(math.ceil(a2), width)):
            alpha0, alpha1 = max(a1, float(w)), min(a2, float(w + 1))
            if alpha1 <= alpha0:
                continue
            ix_left = _hat_integral(alpha0 - w, alpha1 - w)
            ix_right = _hat_integral(w + 1 - alpha1, w + 1 - alpha0)
            for yy, iy in ((h, iy_top), (h + 1, iy_bottom)):
                for xx, ix in ((w, ix_left), (w + 1, ix_right)):
                    if 0 <= yy < height and 0 <= xx < width:
                        total += float(fmap[yy, xx]) * iy * ix
    return total


def _roi_geometry(roi, ph_count: int, pw_count: int, scale: float):
    """Batch index, box start, bin size of one RoI, as the definition states."""
    batch = int(roi[0])  # truncated to int
    xs, ys = float(roi[1]) * scale, float(roi[2]) * scale
    xe, ye = float(roi[3]) * scale, float(roi[4]) * scale
    rw, rh = max(xe - xs, 0.0), max(ye - ys, 0.0)
    return batch, xs, ys, rw / pw_count, rh / ph_count


def ref_prroi_pool(features, rois, ph_count: int, pw_count: int, scale: float) -> np.ndarray:
    """Reference forward, ``(K, C, PH, PW)`` float64."""
    feats = np.asarray(features, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    channels = feats.shape[1]
    out = np.zeros((rois.shape[0], channels, ph_count, pw_count), dtype=np.float64)
    for k in range(rois.shape[0]):
        batch, xs, ys, bw, bh = _roi_geometry(rois[k], ph_count, pw_count, scale)
        area = bw * bh
        if area == 0:
            continue
        for ph in range(ph_count):
            b1, b2 = ys + ph * bh, ys + (ph + 1) * bh
            for pw in range(pw_count):
                a1, a2 = xs + pw * bw, xs + (pw + 1) * bw
                for c in range(channels):
                    out[k, c, ph, pw] = ref_bin_integral(feats[batch, c], a1, a2, b1, b2) / area
    return out


def surface(fmap: np.ndarray, xs, ys) -> np.ndarray:
    """``f`` on the grid ``ys x xs`` from the hat-kernel sum; shape ``(len(ys), len(xs))``."""
    height, width = fmap.shape
    xs = np.atleast_1d(np.asarray(xs, dtype=np.float64))
    ys = np.atleast_1d(np.asarray(ys, dtype=np.float64))
    kx = np.maximum(0.0, 1.0 - np.abs(xs[:, None] - np.arange(width)[None, :]))  # (nx, W)
    ky = np.maximum(0.0, 1.0 - np.abs(ys[:, None] - np.arange(height)[None, :]))  # (ny, H)
    return ky @ fmap @ kx.T


def riemann_bin_integral(fmap, a1, a2, b1, b2, n: int = 60) -> float:
    """Midpoint rule with ``n x n`` points."""
    dx, dy = (a2 - a1) / n, (b2 - b1) / n
    xs = a1 + (np.arange(n) + 0.5) * dx
    ys = b1 + (np.arange(n) + 0.5) * dy
    return float(surface(fmap, xs, ys).sum() * dx * dy)


def _breakpoints(p: float, q: float, size: int) -> list[float]:
    """``p``, the integers strictly between ``p`` and ``q`` (only those near the map), ``q``."""
    inner = [float(i) for i in range(max(math.ceil(p), -1), min(math.floor(q), size) + 1)]
    return [p, *[t for t in inner if p < t < q], q]


def edge_integral_vertical(fmap: np.ndarray, x: float, b1: float, b2: float) -> float:
    """``int_{b1}^{b2} f(x, y) dy``: ``f(x, .)`` is linear between integer rows, so the
    trapezoid rule on each piece is exact."""
    pts = _breakpoints(b1, b2, fmap.shape[0])
    vals = surface(fmap, [x], pts)[:, 0]
    return float(
        sum((pts[n + 1] - pts[n]) * (vals[n] + vals[n + 1]) / 2 for n in range(len(pts) - 1))
    )


def edge_integral_horizontal(fmap: np.ndarray, y: float, a1: float, a2: float) -> float:
    """``int_{a1}^{a2} f(x, y) dx``, exact piecewise trapezoid as above."""
    pts = _breakpoints(a1, a2, fmap.shape[1])
    vals = surface(fmap, pts, [y])[0, :]
    return float(
        sum((pts[n + 1] - pts[n]) * (vals[n] + vals[n + 1]) / 2 for n in range(len(pts) - 1))
    )


def ref_box_grad(features, rois, ph_count, pw_count, scale, grad_out) -> np.ndarray:
    """Spec §6.4: d(sum(grad_out * out)) / d(rois), ``(K, 5)`` with a zero batch column.

    Valid for boxes with ``x1 > x0`` and ``y1 > y0`` (no clamp of the width/height).
    """
    feats = np.asarray(features, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    grad_out = np.asarray(grad_out, dtype=np.float64)
    grad = np.zeros((rois.shape[0], 5), dtype=np.float64)
    for k in range(rois.shape[0]):
        batch, xs, ys, bw, bh = _roi_geometry(rois[k], ph_count, pw_count, scale)
        area = bw * bh
        assert area > 0, "the §6.4 reference needs a non-degenerate box"
        for ph in range(ph_count):
            b1, b2 = ys + ph * bh, ys + (ph + 1) * bh
            for pw in range(pw_count):
                a1, a2 = xs + pw * bw, xs + (pw + 1) * bw
                for c in range(feats.shape[1]):
                    fmap = feats[batch, c]
                    value = ref_bin_integral(fmap, a1, a2, b1, b2) / area
                    d_a1 = (-edge_integral_vertical(fmap, a1, b1, b2) + (b2 - b1) * value) / area
                    d_a2 = (edge_integral_vertical(fmap, a2, b1, b2) - (b2 - b1) * value) / area
                    d_b1 = (-edge_integral_horizontal(fmap, b1, a1, a2) + (a2 - a1) * value) / area
                    d_b2 = (edge_integral_horizontal(fmap, b2, a1, a2) - (a2 - a1) * value) / area
                    g = grad_out[k, c, ph, pw]
                    grad[k, 1] += (
                        g * scale * (d_a1 * (1 - pw / pw_count) + d_a2 * (1 - (pw + 1) / pw_count))
                    )
                    grad[k, 3] += (
                        g * scale * (d_a1 * (pw / pw_count) + d_a2 * ((pw + 1) / pw_count))
                    )
                    grad[k, 2] += (
                        g * scale * (d_b1 * (1 - ph / ph_count) + d_b2 * (1 - (ph + 1) / ph_count))
                    )
                    grad[k, 4] += (
                        g * scale * (d_b1 * (ph / ph_count) + d_b2 * ((ph + 1) / ph_count))
                    )
    return grad


# --------------------------------------------------------------------------------------------
# Fixtures: small random maps and a varied set of RoIs
# --------------------------------------------------------------------------------------------


def make_features(seed: int = 0, shape=(2, 2, 9, 11), dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def make_rois(scale: float, seed: int = 0) -> torch.Tensor:
    """RoIs in image coordinates (feature-map coordinates divided by ``scale``)."""
    feature_boxes = [
        (0, 1.3, 2.1, 7.6, 6.9),  # inside
        (1, 0.2, 0.7, 10.4, 8.3),  # inside, batch 1
        (1, -3.4, -2.2, 4.1, 5.5),  # partly outside (top-left)
        (0, 6.5, 4.25, 14.7, 12.3),  # partly outside (bottom-right)
        (0, -9.0, -7.5, -2.5, -1.8),  # wholly outside (top-left)
        (1, 13.0, 11.2, 17.4, 15.0),  # wholly outside (bottom-right)
        (0, 4.37, 3.61, 4.52, 3.83),  # tiny, sub-pixel
        (1, 5.0, 3.0, 5.6, 3.4),  # tiny, starting on integer points
        (0, -6.3, -5.1, 18.2, 16.9),  # large, covers the whole map
        (1, 2.0, 1.0, 8.0, 7.0),  # integer corners
    ]
    gen = torch.Generator().manual_seed(1000 + seed)
    random_boxes = []
    for _ in range(4):
        b = int(torch.randint(0, 2, (1,), generator=gen))
        x0, y0 = (torch.rand(2, generator=gen, dtype=torch.float64) * 14 - 3).tolist()
        w, h = (torch.rand(2, generator=gen, dtype=torch.float64) * 7 + 0.3).tolist()
        random_boxes.append((b, x0, y0, x0 + w, y0 + h))
    rois = torch.tensor(feature_boxes + random_boxes, dtype=torch.float64)
    rois[:, 1:] /= scale
    return rois


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def ref_feature_grad(features, rois, ph_count, pw_count, scale, grad_out) -> np.ndarray:
    """d(sum(grad_out * out)) / d(features), ``features``' shape, from unit maps."""
    feats = np.asarray(features, dtype=np.float64)
    grad_out = np.asarray(grad_out, dtype=np.float64)
    batch, channels, height, width = feats.shape
    grad = np.zeros(feats.shape)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                unit = np.zeros((batch, 1, height, width))
                unit[b, 0, i, j] = 1.0
                basis = ref_prroi_pool(unit, rois, ph_count, pw_count, scale)[:, 0]  # (K, PH, PW)
                for c in range(channels):
                    grad[b, c, i, j] = (basis * grad_out[:, c]).sum()
    return grad
