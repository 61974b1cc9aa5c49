"""Tests for ``instseg.ops.roi_align`` / ``RoIAlign``.

The expected numbers come from a brute-force reference written below, loop by loop, from the
published definition (torchvision's CPU kernel). It works in float64 (or emulates float32
coordinate arithmetic for the float32 comparison) and never uses instseg code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instseg.ops import RoIAlign, roi_align
from instseg.ops.roi_align import roi_align_keep_layout

B, C, H, W = 2, 3, 12, 15

CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
)
DEVICES = ["cpu", CUDA]


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def _bilinear_taps(y, x, height, width, real):
    """The four (row, col, weight) taps of one bilinear sample; [] when it reads 0."""
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return []
    if y <= 0:
        y = real(0)
    if x <= 0:
        x = real(0)
    y_low = int(y)
    x_low = int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = real(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = real(x_low)
    else:
        x_high = x_low + 1
    ly = y - y_low
    lx = x - x_low
    hy = 1 - ly
    hx = 1 - lx
    return [
        (y_low, x_low, float(hy * hx)),
        (y_low, x_high, float(hy * lx)),
        (y_high, x_low, float(ly * hx)),
        (y_high, x_high, float(ly * lx)),
    ]


def ref_roi_align(
    feat,
    rois,
    output_size,
    spatial_scale=1.0,
    sampling_ratio=-1,
    aligned=False,
    grad_out=None,
    real=np.float64,
):
    """Brute-force RoIAlign: returns (output, d(sum(output * grad_out))/d feat or None).

    ``feat`` (B, C, H, W) and ``rois`` (K, 5) are array-likes; values are accumulated in
    float64, coordinate arithmetic is done in ``real`` (np.float64 or np.float32).
    """
    feat = np.asarray(feat, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64).reshape(-1, 5)
    _, channels, height, width = feat.shape
    pooled_h, pooled_w = _pair(output_size)
    pixels = np.ascontiguousarray(feat.transpose(0, 2, 3, 1))  # (B, H, W, C)
    out = np.zeros((rois.shape[0], channels, pooled_h, pooled_w))
    grad = None
    if grad_out is not None:
        grad_out = np.asarray(grad_out, dtype=np.float64)
        grad = np.zeros_like(pixels)
    scale = real(spatial_scale)
    offset = real(0.5 if aligned else 0.0)
    for k, roi in enumerate(rois):
        b = int(roi[0])
        x1, y1, x2, y2 = (real(v) for v in roi[1:])
        start_w = x1 * scale - offset
        start_h = y1 * scale - offset
        end_w = x2 * scale - offset
        end_h = y2 * scale - offset
        roi_w = end_w - start_w
        roi_h = end_h - start_h
        if not aligned:
            roi_w = max(roi_w, real(1))
            roi_h = max(roi_h, real(1))
        bin_w = roi_w / real(pooled_w)
        bin_h = roi_h / real(pooled_h)
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / real(pooled_h))
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / real(pooled_w))
        count = max(grid_h * grid_w, 1)
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                acc = np.zeros(channels)
                for iy in range(grid_h):
                    y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        for row, col, weight in _bilinear_taps(y, x, height, width, real):
                            acc += weight * pixels[b, row, col]
                            if grad is not None:
                                grad[b, row, col] += weight / count * grad_out[k, :, ph, pw]
                out[k, :, ph, pw] = acc / count
    if grad is not None:
        grad = grad.transpose(0, 3, 1, 2)
    return out, grad


# --------------------------------------------------------------------------------------------
# Random cases
# --------------------------------------------------------------------------------------------

KINDS = (
    "inside",
    "inside",
    "partial",
    "partial_corner",
    "outside_near",
    "outside_far",
    "tiny",
    "tiny_edge",
    "huge",
    "inverted",
    "inverted_x",
)


def _uniform(gen, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()


def random_rois(gen, spatial_scale=1.0, kinds=KINDS, batch=B, height=H, width=W):
    """(K, 5) float64 RoIs in image coordinates; one per kind, batch index cycling."""
    u = lambda lo, hi: _uniform(gen, lo, hi)  # noqa: E731
    rows = []
    for i, kind in enumerate(kinds):
        if kind == "inside":
            x1, y1 = u(0, width - 6), u(0, height - 6)
            x2, y2 = x1 + u(1, 5.5), y1 + u(1, 5.5)
        elif kind == "partial":  # crosses the left and bottom borders
            x1, y1 = u(-6, -0.5), u(height - 5, height - 1)
            x2, y2 = u(2, 7), u(height + 0.5, height + 5)
        elif kind == "partial_corner":  # crosses the top and right borders
            x1, y1 = u(width - 5, width - 1), u(-4, -0.2)
            x2, y2 = u(width + 0.3, width + 6), u(1, 4)
        elif kind == "outside_near":  # wholly outside, within the 1-pixel band of the kernel
            x1, y1 = u(-1.9, -1.3), u(2, 6)
            x2, y2 = x1 + u(0.3, 1.2), y1 + u(1, 3)
        elif kind == "outside_far":  # wholly outside, far away
            x1, y1 = u(width + 3, width + 8), u(-12, -6)
            x2, y2 = x1 + u(1, 4), y1 + u(1, 3)
        elif kind == "tiny":
            x1, y1 = u(1, width - 2), u(1, height - 2)
            x2, y2 = x1 + u(0.02, 0.9), y1 + u(0.02, 0.9)
        elif kind == "tiny_edge":  # sub-pixel box astride the last row / column
            x1, y1 = u(width - 1.4, width - 0.6), u(height - 1.4, height - 0.6)
            x2, y2 = x1 + u(0.05, 0.5), y1 + u(0.05, 0.5)
        elif kind == "huge":
            x1, y1 = u(-22, -8), u(-20, -8)
            x2, y2 = u(width + 8, width + 22), u(height + 8, height + 20)
        elif kind == "inverted":  # x2 < x1 and y2 < y1
            x1, y1 = u(3, width - 2), u(3, height - 2)
            x2, y2 = x1 - u(0.1, 3), y1 - u(0.1, 3)
        elif kind == "inverted_x":  # only x2 < x1
            x1, y1 = u(3, width - 2), u(1, height - 6)
            x2, y2 = x1 - u(0.6, 3), y1 + u(1, 4)
        else:
            raise AssertionError(kind)
        rows.append([i % batch, x1, y1, x2, y2])
    rois = torch.tensor(rows, dtype=torch.float64)
    # Feature-map coordinates -> image coordinates (exact for power-of-two scales).
    rois[:, 1:] /= spatial_scale
    return rois


def random_map(gen, shape=(B, C, H, W)):
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _reference(x, rois, *args, **kwargs):
    out, grad = ref_roi_align(x.detach().cpu().double(), rois.cpu().double(), *args, **kwargs)
    return torch.from_numpy(out), (None if grad is None else torch.from_numpy(grad))


# --------------------------------------------------------------------------------------------
# Forward against the reference
# --------------------------------------------------------------------------------------------

GEOMETRIES = [(1.0, (3, 4)), (0.5, 2), (0.25, (2, 5))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
@pytest.mark.parametrize(("spatial_scale", "output_size"), GEOMETRIES)
def test_matches_reference_float64(device, aligned, sampling_ratio, spatial_scale, output_size):
    gen = torch.Generator().manual_seed(
        1000 + 100 * aligned + 10 * sampling_ratio + int(8 * spatial_scale)
    )
    x = random_map(gen)
    rois = random_rois(gen, spatial_scale)
    expected, _ = _reference(x, rois, output_size, spatial_scale, sampling_ratio, aligned)
    out = roi_align(
        x.to(device), rois.to(device), output_size, spatial_scale, sampling_ratio, aligned
    )
    ph, pw = _pair(output_size)
    assert out.shape == (rois.shape[0], C, ph, pw)
    assert out.dtype == torch.float64
    assert out.device.type == device
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-12, atol=1e-12)
    # The cases are not degenerate: some bins read data, some RoIs read exactly zero.
    assert expected.abs().amax() > 0.1


def test_reference_is_exact_on_a_linear_ramp():
    """Bilinear interpolation of a linear map is exact: checks the reference itself too."""
    ys, xs = torch.meshgrid(
        torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij"
    )
    x = (0.25 * xs - 0.5 * ys + 3.0).expand(1, 2, H, W).contiguous()
    # Aligned boxes whose samples all lie in [0, W-1] x [0, H-1].
    rois = torch.tensor([[0, 2.0, 1.5, 9.0, 7.5], [0, 4.25, 3.0, 12.5, 11.0]], dtype=torch.float64)
    out = roi_align(x, rois, (2, 4), 1.0, 2, aligned=True)
    ref, _ = _reference(x, rois, (2, 4), 1.0, 2, True)
    for k, (_, x1, y1, x2, y2) in enumerate(rois.tolist()):
        cy = (y1 - 0.5) + (torch.arange(2, dtype=torch.float64) + 0.5) * (y2 - y1) / 2
        cx = (x1 - 0.5) + (torch.arange(4, dtype=torch.float64) + 0.5) * (x2 - x1) / 4
        expected = 0.25 * cx[None, :] - 0.5 * cy[:, None] + 3.0
        for c in range(2):
            torch.testing.assert_close(out[k, c], expected, rtol=0, atol=1e-12)
            torch.testing.assert_close(ref[k, c], expected, rtol=0, atol=1e-12)


def test_hand_computed_values():
    """A few values worked out by hand from the definition."""
    x = torch.arange(12, dtype=torch.float64).reshape(1, 1, 3, 4)  # F[y, x] = 4y + x
    # One sample at the centre (1.5, 1.0) -> 4*1 + 1.5 = 5.5.
    rois = torch.tensor([[0, 1.0, 0.5, 2.0, 1.5]], dtype=torch.float64)
    assert roi_align(x, rois, 1, 1.0, 1).item() == pytest.approx(5.5, abs=1e-12)
    # aligned=False clamps a zero-size box to 1 px: sample at (3.5, 2.5) -> clamped to the
    # last row and column -> F[2, 3] = 11.
    rois = torch.tensor([[0, 3.0, 2.0, 3.0, 2.0]], dtype=torch.float64)
    assert roi_align(x, rois, 1, 1.0, 1).item() == pytest.approx(11.0, abs=1e-12)
    # A sample at y = -1.5 (above the -1 band) reads 0.
    rois = torch.tensor([[0, 0.0, -2.0, 1.0, -1.0]], dtype=torch.float64)
    assert roi_align(x, rois, 1, 1.0, 1).item() == 0.0
    # A sample at y = -0.5 is clamped to row 0: x = 1.5 -> 1.5.
    rois = torch.tensor([[0, 1.0, -1.0, 2.0, 0.0]], dtype=torch.float64)
    assert roi_align(x, rois, 1, 1.0, 1).item() == pytest.approx(1.5, abs=1e-12)
    # Adaptive sampling on an inverted aligned box gives no samples: 0.
    rois = torch.tensor([[0, 3.0, 2.0, 1.0, 1.0]], dtype=torch.float64)
    assert roi_align(x, rois, 1, 1.0, 0, aligned=True).item() == 0.0


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ((1.0, 2.5, 2.0, 3.5), 9.5),  # sample at y == H: valid, reads the last row
        ((1.0, -1.5, 2.0, -0.5), 1.5),  # sample at y == -1: valid, clamped to row 0
        ((3.5, 0.5, 4.5, 1.5), 7.0),  # sample at x == W: valid, reads the last column
        ((-1.5, 0.5, -0.5, 1.5), 4.0),  # sample at x == -1: valid, clamped to column 0
        ((1.0, 2.5 + 2**-40, 2.0, 3.5 + 2**-40), 0.0),  # just below the map: 0
        ((1.0, -1.5 - 2**-40, 2.0, -0.5 - 2**-40), 0.0),  # just above the map: 0
        ((3.5 + 2**-40, 0.5, 4.5 + 2**-40, 1.5), 0.0),  # just right of the map: 0
        ((-1.5 - 2**-40, 0.5, -0.5 - 2**-40, 1.5), 0.0),  # just left of the map: 0
    ],
)
def test_sample_validity_boundaries(box, expected):
    """Samples exactly on the [-1, H] x [-1, W] limits are read; just beyond them read 0."""
    x = torch.arange(12, dtype=torch.float64).reshape(1, 1, 3, 4)  # F[y, x] = 4y + x
    rois = torch.tensor([[0.0, *box]], dtype=torch.float64)
    out = roi_align(x, rois, 1, 1.0, 1)
    ref, _ = _reference(x, rois, 1, 1.0, 1)
    assert out.item() == pytest.approx(expected, abs=1e-12)
    assert ref.item() == pytest.approx(expected, abs=1e-12)


def test_keep_layout_returns_a_channels_last_view_with_the_same_values():
    gen = torch.Generator().manual_seed(8)
    x = random_map(gen)
    rois = random_rois(gen, 0.5)
    dense = roi_align(x, rois, (3, 2), 0.5, 2, True)
    cl = x.contiguous(memory_format=torch.channels_last)
    default = roi_align(cl, rois, (3, 2), 0.5, 2, True)
    kept = roi_align_keep_layout(cl, rois, (3, 2), 0.5, 2, True)
    assert default.is_contiguous()  # torchvision's layout unless asked
    assert kept.is_contiguous(memory_format=torch.channels_last) and not kept.is_contiguous()
    assert torch.equal(kept, dense) and torch.equal(default, dense)
    # NCHW input: NCHW output.
    assert roi_align_keep_layout(x, rois, (3, 2), 0.5, 2, True).is_contiguous()


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_non_contiguous_input(layout):
    gen = torch.Generator().manual_seed(7)
    if layout == "transposed":
        x = torch.randn(B, C, W, H, generator=gen, dtype=torch.float64).transpose(2, 3)
    elif layout == "sliced":
        x = torch.randn(B + 1, 2 * C, H + 3, 2 * W, generator=gen, dtype=torch.float64)
        x = x[1:, ::2, 2:-1, 1::2]
    else:
        x = random_map(gen).contiguous(memory_format=torch.channels_last)
    assert x.shape == (B, C, H, W)
    assert not x.is_contiguous()
    rois = random_rois(gen, 0.5)
    for aligned, sampling_ratio in [(False, -1), (True, 2)]:
        expected, _ = _reference(x, rois, (3, 2), 0.5, sampling_ratio, aligned)
        out = roi_align(x, rois, (3, 2), 0.5, sampling_ratio, aligned)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        dense = roi_align(x.contiguous(), rois, (3, 2), 0.5, sampling_ratio, aligned)
        torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aligned", [False, True])
def test_list_of_boxes_equals_k5_form(aligned):
    gen = torch.Generator().manual_seed(11)
    x = random_map(gen, (3, C, H, W))
    per_image = [random_rois(gen, 1.0, KINDS[:5]), torch.zeros(0, 5), random_rois(gen, 1.0)]
    boxes = [r[:, 1:].to(torch.float64) for r in per_image]
    rois = torch.cat(
        [torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)]
    ).to(torch.float64)
    assert rois.shape[0] == len(KINDS) + 5
    out_list = roi_align(x, boxes, (2, 3), 1.0, -1, aligned)
    out_k5 = roi_align(x, rois, (2, 3), 1.0, -1, aligned)
    assert out_list.shape == (rois.shape[0], C, 2, 3)
    torch.testing.assert_close(out_list, out_k5, rtol=0, atol=0)
    expected, _ = _reference(x, rois, (2, 3), 1.0, -1, aligned)
    torch.testing.assert_close(out_list, expected, rtol=1e-12, atol=1e-12)
    # Image 2's boxes really read image 2.
    torch.testing.assert_close(
        out_list[5:], roi_align(x[2:], [boxes[2]], (2, 3), 1.0, -1, aligned), rtol=0, atol=0
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("aligned", "sampling_ratio"), [(False, -1), (True, 0), (True, 2)])
def test_float32_matches_reference(device, aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(23 + sampling_ratio)
    x = random_map(gen).float()
    rois = random_rois(gen, 0.5).float()
    # Reference in float32 coordinate arithmetic (as the kernel), values in float64.
    expected, _ = _reference(x, rois, (3, 4), 0.5, sampling_ratio, aligned, real=np.float32)
    out = roi_align(x.to(device), rois.to(device), (3, 4), 0.5, sampling_ratio, aligned)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("aligned", "sampling_ratio", "spatial_scale"),
    [(False, -1, 1.0), (True, 2, 0.5), (True, 0, 1.0)],
)
def test_gradient_matches_reference(device, aligned, sampling_ratio, spatial_scale):
    gen = torch.Generator().manual_seed(31 + sampling_ratio)
    x = random_map(gen)
    rois = random_rois(gen, spatial_scale)
    weights = torch.randn(rois.shape[0], C, 2, 3, generator=gen, dtype=torch.float64)
    xd = x.to(device).requires_grad_(True)
    out = roi_align(xd, rois.to(device), (2, 3), spatial_scale, sampling_ratio, aligned)
    (out * weights.to(device)).sum().backward()
    expected_out, expected_grad = _reference(
        x, rois, (2, 3), spatial_scale, sampling_ratio, aligned, grad_out=weights
    )
    torch.testing.assert_close(out.detach().cpu(), expected_out, rtol=1e-12, atol=1e-12)
    assert xd.grad is not None and xd.grad.shape == x.shape
    torch.testing.assert_close(xd.grad.cpu(), expected_grad, rtol=1e-12, atol=1e-12)
    assert expected_grad.abs().amax() > 0.01


def test_gradcheck():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 0.3, 0.7, 4.2, 3.1], [1, -1.5, 2.0, 7.5, 6.0], [1, 2.2, 1.1, 2.6, 1.4]],
        dtype=torch.float64,
    )
    for aligned, sampling_ratio in [(False, -1), (True, 2)]:
        assert torch.autograd.gradcheck(
            lambda inp, a=aligned, s=sampling_ratio: roi_align(inp, rois, (2, 3), 1.0, s, a),
            (x,),
        )


# --------------------------------------------------------------------------------------------
# Low precision, empty input, module
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("rois_float32", [False, True])
def test_low_precision_input(device, dtype, tol, rois_float32):
    gen = torch.Generator().manual_seed(41)
    x = random_map(gen).to(dtype)
    rois = random_rois(gen, 0.5)
    rois = rois.float() if rois_float32 else rois.to(dtype)
    out = roi_align(x.to(device), rois.to(device), (3, 2), 0.5, -1, True)
    assert out.dtype == dtype
    assert out.shape == (rois.shape[0], C, 3, 2)
    ref32 = roi_align(x.float(), rois.float(), (3, 2), 0.5, -1, True)
    torch.testing.assert_close(out.cpu().float(), ref32, rtol=tol, atol=tol)
    expected, _ = _reference(x.float(), rois.float(), (3, 2), 0.5, -1, True)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_gradient(device):
    gen = torch.Generator().manual_seed(43)
    x = random_map(gen).half().to(device).requires_grad_(True)
    rois = random_rois(gen).float().to(device)
    roi_align(x, rois, 2, 1.0, 2, False).sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float16
    x32 = x.detach().float().requires_grad_(True)
    roi_align(x32, rois, 2, 1.0, 2, False).sum().backward()
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("boxes_form", ["tensor", "list", "empty_list"])
def test_empty_rois(boxes_form):
    x = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    if boxes_form == "tensor":
        boxes = torch.zeros(0, 5, dtype=torch.float64)
    elif boxes_form == "list":
        boxes = [torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64)]
    else:
        boxes = []
    out = roi_align(x, boxes, (3, 5), 0.5, 2, True)
    assert out.shape == (0, C, 3, 5)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert x.grad is None or not x.grad.any()


@pytest.mark.parametrize("aligned", [False, True])
def test_module_matches_function(aligned):
    gen = torch.Generator().manual_seed(53)
    x = random_map(gen)
    rois = random_rois(gen, 0.25)
    module = RoIAlign((2, 3), spatial_scale=0.25, sampling_ratio=2, aligned=aligned)
    expected = roi_align(x, rois, (2, 3), 0.25, 2, aligned)
    torch.testing.assert_close(module(x, rois), expected, rtol=0, atol=0)
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(B)]
    order = torch.argsort(rois[:, 0], stable=True)
    torch.testing.assert_close(module(x, boxes), expected[order], rtol=0, atol=0)
    assert RoIAlign(4, 1.0, -1)(x, rois).shape == (rois.shape[0], C, 4, 4)
    assert "aligned" in repr(module)


# --------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------


def _valid():
    x = torch.randn(B, C, H, W)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [1, 2.0, 0.0, 8.0, 9.0]])
    return x, rois


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("rois_k4", r"\[K, 5\]"),
        ("rois_1d", r"\[K, 5\]"),
        ("list_bad_shape", r"Tensor\[L, 4\]"),
        ("batch_too_big", "batch index out of range"),
        ("batch_negative", "batch index out of range"),
        ("output_zero", "positive"),
        ("output_negative", "positive"),
        ("int_input", "floating point"),
        ("rois_float64", "dtype"),
        ("rois_half_for_float_input", "dtype"),
        ("rois_float64_for_half_input", "dtype"),
        ("nan", "NaN or inf"),
        ("inf", "NaN or inf"),
    ],
)
def test_invalid_arguments(case, match):
    x, rois = _valid()
    size = 2
    boxes = rois
    if case == "rois_k4":
        boxes = rois[:, 1:]
    elif case == "rois_1d":
        boxes = rois[0]
    elif case == "list_bad_shape":
        boxes = [rois[:, 1:], rois]
    elif case == "batch_too_big":
        boxes = rois.clone()
        boxes[1, 0] = B
    elif case == "batch_negative":
        boxes = rois.clone()
        boxes[0, 0] = -1
    elif case == "output_zero":
        size = 0
    elif case == "output_negative":
        size = (2, -1)
    elif case == "int_input":
        x = torch.ones(B, C, H, W, dtype=torch.int32)
    elif case == "rois_float64":
        boxes = rois.double()
    elif case == "rois_half_for_float_input":
        boxes = rois.half()
    elif case == "rois_float64_for_half_input":
        x, boxes = x.half(), rois.double()
    elif case == "nan":
        boxes = rois.clone()
        boxes[1, 3] = float("nan")
    elif case == "inf":
        boxes = rois.clone()
        boxes[0, 2] = -float("inf")
    with pytest.raises(ValueError, match=match):
        roi_align(x, boxes, size, 1.0, 2, False)


def test_invalid_output_size_in_module():
    with pytest.raises(ValueError, match="positive"):
        RoIAlign((0, 2), 1.0, 2)


def test_float32_rois_allowed_with_low_precision_input():
    x, rois = _valid()
    for dtype in (torch.float16, torch.bfloat16):
        out = roi_align(x.to(dtype), rois.float(), 2, 1.0, 2)
        assert out.dtype == dtype and out.shape == (2, C, 2, 2)


@pytest.mark.parametrize("rois_device", ["meta", CUDA])
def test_device_mismatch(rois_device):
    x, rois = _valid()
    with pytest.raises(ValueError, match="feature map is on"):
        roi_align(x, rois.to(rois_device), 2, 1.0, 2)
    if rois_device == "cuda":
        with pytest.raises(ValueError, match="feature map is on"):
            roi_align(x.cuda(), rois, 2, 1.0, 2)


# --------------------------------------------------------------------------------------------
# torchvision (only where it can be imported and run)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tv_ops():
    try:
        import torchvision

        x = torch.rand(1, 1, 4, 4)
        torchvision.ops.roi_align(x, torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]]), 2)
    except Exception as exc:
        pytest.skip(f"torchvision.ops.roi_align is not usable here: {exc!r}")
    return torchvision.ops


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize(("spatial_scale", "output_size"), GEOMETRIES)
def test_matches_torchvision(tv_ops, device, aligned, spatial_scale, output_size):
    gen = torch.Generator().manual_seed(61 + int(8 * spatial_scale) + 100 * aligned)
    x = random_map(gen).to(device)
    rois = random_rois(gen, spatial_scale).to(device)
    for sampling_ratio in (-1, 0, 1, 2):
        expected = tv_ops.roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned)
        out = roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        module = tv_ops.RoIAlign(output_size, spatial_scale, sampling_ratio, aligned)
        torch.testing.assert_close(
            RoIAlign(output_size, spatial_scale, sampling_ratio, aligned)(x, rois),
            module(x, rois),
            rtol=1e-10,
            atol=1e-10,
        )
    x32 = x.float().requires_grad_(True)
    xtv = x.float().requires_grad_(True)
    weights = torch.randn(rois.shape[0], C, *_pair(output_size), generator=gen).to(device)
    (
        roi_align(x32, rois.float(), output_size, spatial_scale, -1, aligned) * weights
    ).sum().backward()
    (
        tv_ops.roi_align(xtv, rois.float(), output_size, spatial_scale, -1, aligned) * weights
    ).sum().backward()
    torch.testing.assert_close(x32.grad, xtv.grad, rtol=1e-4, atol=1e-5)
