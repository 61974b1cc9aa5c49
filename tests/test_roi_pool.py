"""Tests for ``instseg.ops.roi_pool`` / ``RoIPool``.

The expected numbers come from a brute-force reference written below, loop by loop, from the
published definition (torchvision's CPU kernel: corners rounded half away from zero, floor /
ceil bin edges, max over the bin, 0 for an empty bin, gradient to the first arg-max). It never
uses instseg code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instseg.ops import RoIPool, roi_pool

B, C, H, W = 2, 3, 12, 15
NEG_FLT_MAX = -float(np.finfo(np.float32).max)

CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
)
DEVICES = ["cpu", CUDA]


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def c_round(v) -> int:
    """C's std::round: nearest integer, halves away from zero (exact for any float)."""
    a = abs(v)
    r = math.floor(a)
    if a - r >= 0.5:  # a - floor(a) is exact
        r += 1
    return -r if v < 0 else r


def ref_roi_pool(feat, rois, output_size, spatial_scale=1.0, grad_out=None, real=np.float64):
    """Brute-force RoIPool: returns (output, d(sum(output * grad_out))/d feat or None).

    Coordinate arithmetic is done in ``real`` (np.float64 or np.float32, as the kernel's
    scalar type); values are compared and stored in float64.
    """
    feat = np.asarray(feat, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64).reshape(-1, 5)
    _, channels, height, width = feat.shape
    pooled_h, pooled_w = _pair(output_size)
    out = np.zeros((rois.shape[0], channels, pooled_h, pooled_w))
    grad = None
    if grad_out is not None:
        grad_out = np.asarray(grad_out, dtype=np.float64)
        grad = np.zeros_like(feat)
    scale = real(spatial_scale)
    for k, roi in enumerate(rois):
        b = int(roi[0])
        start_w = c_round(real(roi[1]) * scale)
        start_h = c_round(real(roi[2]) * scale)
        end_w = c_round(real(roi[3]) * scale)
        end_h = c_round(real(roi[4]) * scale)
        roi_w = max(end_w - start_w + 1, 1)
        roi_h = max(end_h - start_h + 1, 1)
        bin_h = real(roi_h) / real(pooled_h)
        bin_w = real(roi_w) / real(pooled_w)
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                hstart = math.floor(real(ph) * bin_h)
                wstart = math.floor(real(pw) * bin_w)
                hend = math.ceil(real(ph + 1) * bin_h)
                wend = math.ceil(real(pw + 1) * bin_w)
                hstart = min(max(hstart + start_h, 0), height)
                hend = min(max(hend + start_h, 0), height)
                wstart = min(max(wstart + start_w, 0), width)
                wend = min(max(wend + start_w, 0), width)
                if hend <= hstart or wend <= wstart:
                    continue  # empty bin: 0, no gradient
                best = np.full(channels, NEG_FLT_MAX)
                best_y = np.full(channels, -1)
                best_x = np.full(channels, -1)
                for y in range(hstart, hend):
                    for x in range(wstart, wend):
                        value = feat[b, :, y, x]
                        better = value > best  # strict: the first maximum wins
                        best = np.where(better, value, best)
                        best_y = np.where(better, y, best_y)
                        best_x = np.where(better, x, best_x)
                out[k, :, ph, pw] = best
                if grad is not None:
                    for c in range(channels):
                        grad[b, c, best_y[c], best_x[c]] += grad_out[k, c, ph, pw]
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
    "huge",
    "inverted",
    "halves",
)


def _uniform(gen, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()


def random_rois(gen, spatial_scale=1.0, kinds=KINDS, batch=B, height=H, width=W):
    """(K, 5) float64 RoIs in image coordinates; one per kind, batch index cycling."""
    u = lambda lo, hi: _uniform(gen, lo, hi)  # noqa: E731
    rows = []
    for i, kind in enumerate(kinds):
        if kind == "inside":
            x1, y1 = u(0, width - 7), u(0, height - 7)
            x2, y2 = x1 + u(1, 6.5), y1 + u(1, 6.5)
        elif kind == "partial":  # crosses the left and bottom borders
            x1, y1 = u(-6, -0.6), u(height - 5, height - 1)
            x2, y2 = u(2, 7), u(height + 0.6, height + 5)
        elif kind == "partial_corner":  # crosses the top and right borders
            x1, y1 = u(width - 5, width - 1), u(-4, -0.6)
            x2, y2 = u(width + 0.6, width + 6), u(1, 4)
        elif kind == "outside_near":  # rounds to just outside the left border
            x1, y1 = u(-3.4, -2.6), u(2, 6)
            x2, y2 = u(-1.4, -0.6), y1 + u(1, 3)
        elif kind == "outside_far":
            x1, y1 = u(width + 3, width + 8), u(-12, -6)
            x2, y2 = x1 + u(1, 4), y1 + u(1, 3)
        elif kind == "tiny":
            x1, y1 = u(1, width - 2), u(1, height - 2)
            x2, y2 = x1 + u(0.02, 0.9), y1 + u(0.02, 0.9)
        elif kind == "huge":
            x1, y1 = u(-22, -8), u(-20, -8)
            x2, y2 = u(width + 8, width + 22), u(height + 8, height + 20)
        elif kind == "inverted":
            x1, y1 = u(3, width - 2), u(3, height - 2)
            x2, y2 = x1 - u(0.1, 3), y1 - u(0.1, 3)
        elif kind == "halves":  # exact .5 corners: std::round and banker's rounding differ
            x1, y1 = 0.5 + math.floor(u(0, 4)), 0.5 + math.floor(u(0, 4))
            x2, y2 = x1 + 2 * math.floor(u(2, 5)), y1 + 2 * math.floor(u(2, 4))
        else:
            raise AssertionError(kind)
        rows.append([i % batch, x1, y1, x2, y2])
    rois = torch.tensor(rows, dtype=torch.float64)
    rois[:, 1:] /= spatial_scale  # exact for power-of-two scales
    return rois


def random_map(gen, shape=(B, C, H, W)):
    """Distinct values (no ties), so the arg-max is unique."""
    n = math.prod(shape)
    perm = torch.randperm(n, generator=gen).to(torch.float64)
    return ((perm - n / 2) / 17.0).reshape(shape)


def _reference(x, rois, *args, **kwargs):
    out, grad = ref_roi_pool(x.detach().cpu().double(), rois.cpu().double(), *args, **kwargs)
    return torch.from_numpy(out), (None if grad is None else torch.from_numpy(grad))


# --------------------------------------------------------------------------------------------
# Forward against the reference
# --------------------------------------------------------------------------------------------

GEOMETRIES = [(1.0, (3, 4)), (1.0, 1), (0.5, 2), (0.25, (2, 5)), (0.5, (5, 3))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("spatial_scale", "output_size"), GEOMETRIES)
def test_matches_reference_float64(device, spatial_scale, output_size):
    gen = torch.Generator().manual_seed(2000 + int(8 * spatial_scale) + 10 * len(str(output_size)))
    x = random_map(gen)
    rois = random_rois(gen, spatial_scale)
    expected, _ = _reference(x, rois, output_size, spatial_scale)
    out = roi_pool(x.to(device), rois.to(device), output_size, spatial_scale)
    ph, pw = _pair(output_size)
    assert out.shape == (rois.shape[0], C, ph, pw)
    assert out.dtype == torch.float64
    assert out.device.type == device
    # A max selects one input value: the result is exact.
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)
    assert (expected == 0).any() and (expected != 0).any()


def test_hand_computed_values():
    x = torch.arange(20, dtype=torch.float64).reshape(1, 1, 4, 5)  # F[y, x] = 5y + x
    # Box [1, 2] x [1, 2] in 2x2 bins: one pixel per bin.
    out = roi_pool(x, torch.tensor([[0, 1.0, 1.0, 2.0, 2.0]], dtype=torch.float64), 2)
    assert out[0, 0].tolist() == [[6.0, 7.0], [11.0, 12.0]]
    # A 3-wide RoI in 2 bins: bin_w = 1.5, bins [0, 2) and [1, 3) overlap.
    out = roi_pool(x, torch.tensor([[0, 0.0, 0.0, 2.0, 0.0]], dtype=torch.float64), (1, 2))
    assert out[0, 0].tolist() == [[1.0, 2.0]]
    # Corners at .5 round away from zero: 1.5 -> 2, 2.5 -> 3 (banker's would give 2, 2).
    out = roi_pool(x, torch.tensor([[0, 1.5, 0.0, 2.5, 0.0]], dtype=torch.float64), (1, 2))
    assert out[0, 0].tolist() == [[2.0, 3.0]]
    # Negative halves: -0.5 -> -1, so the RoI is [-1, 1] and its first bin [-1, 1) is pixel 0.
    # (banker's rounding would give [0, 1] and [[1, 2, 2]]).
    out = roi_pool(x + 1, torch.tensor([[0, -0.5, 0.0, 1.0, 0.0]], dtype=torch.float64), (1, 3))
    assert out[0, 0].tolist() == [[0.0, 1.0, 2.0]]
    # Wholly outside: every bin is empty and reads 0, even where the map is negative.
    out = roi_pool(-1 - x, torch.tensor([[0, 6.0, 0.0, 9.0, 3.0]], dtype=torch.float64), 2)
    assert out.abs().sum().item() == 0.0
    # An inverted box collapses to a one-pixel RoI at its rounded start.
    out = roi_pool(x, torch.tensor([[0, 3.2, 2.4, 1.0, 0.0]], dtype=torch.float64), 2)
    assert (out == 13.0).all()


def test_round_is_std_round_just_below_half():
    """std::round(0.49999999999999994) == 0; floor(v + 0.5) gives 1 (v + 0.5 rounds up)."""
    x = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    v = 0.49999999999999994  # the largest double below 0.5
    assert v < 0.5 and c_round(v) == 0 and c_round(-v) == 0
    rois = torch.tensor([[0, v, v, v, v], [0, -v, 2.0, -v, 2.0]], dtype=torch.float64)
    expected, _ = _reference(x, rois, 1)
    assert expected.flatten().tolist() == [0.0, 8.0]
    out = roi_pool(x, rois, 1)
    assert out.flatten().tolist() == [0.0, 8.0]


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_non_contiguous_input(layout):
    gen = torch.Generator().manual_seed(7)
    if layout == "transposed":
        x = random_map(gen, (B, C, W, H)).transpose(2, 3)
    elif layout == "sliced":
        x = random_map(gen, (B + 1, 2 * C, H + 3, 2 * W))[1:, ::2, 2:-1, 1::2]
    else:
        x = random_map(gen).contiguous(memory_format=torch.channels_last)
    assert x.shape == (B, C, H, W)
    assert not x.is_contiguous()
    rois = random_rois(gen, 0.5)
    expected, _ = _reference(x, rois, (3, 2), 0.5)
    out = roi_pool(x, rois, (3, 2), 0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(out, roi_pool(x.contiguous(), rois, (3, 2), 0.5), rtol=0, atol=0)


def test_list_of_boxes_equals_k5_form():
    gen = torch.Generator().manual_seed(11)
    x = random_map(gen, (3, C, H, W))
    boxes = [
        random_rois(gen, 1.0, KINDS[:4])[:, 1:],
        torch.zeros(0, 4, dtype=torch.float64),
        random_rois(gen, 1.0)[:, 1:],
    ]
    rois = torch.cat(
        [torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)]
    ).to(torch.float64)
    assert rois.shape[0] == len(KINDS) + 4
    out_list = roi_pool(x, boxes, (2, 3))
    assert out_list.shape == (rois.shape[0], C, 2, 3)
    torch.testing.assert_close(out_list, roi_pool(x, rois, (2, 3)), rtol=0, atol=0)
    expected, _ = _reference(x, rois, (2, 3))
    torch.testing.assert_close(out_list, expected, rtol=0, atol=0)
    torch.testing.assert_close(out_list[4:], roi_pool(x[2:], [boxes[2]], (2, 3)), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("spatial_scale", "output_size"), [(1.0, (3, 4)), (0.5, 3), (0.25, 2)])
def test_float32_matches_reference(device, spatial_scale, output_size):
    gen = torch.Generator().manual_seed(23)
    x = random_map(gen).float()
    rois = random_rois(gen, spatial_scale).float()
    # Bin edges in float32 arithmetic, as the kernel computes them for float32 input.
    expected, _ = _reference(x, rois, output_size, spatial_scale, real=np.float32)
    out = roi_pool(x.to(device), rois.to(device), output_size, spatial_scale)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("spatial_scale", "output_size"), [(1.0, (3, 4)), (0.5, (2, 5))])
def test_gradient_matches_reference(device, spatial_scale, output_size):
    gen = torch.Generator().manual_seed(31)
    x = random_map(gen)
    rois = random_rois(gen, spatial_scale)
    weights = torch.randn(rois.shape[0], C, *_pair(output_size), generator=gen, dtype=x.dtype)
    xd = x.to(device).requires_grad_(True)
    out = roi_pool(xd, rois.to(device), output_size, spatial_scale)
    (out * weights.to(device)).sum().backward()
    expected_out, expected_grad = _reference(x, rois, output_size, spatial_scale, grad_out=weights)
    torch.testing.assert_close(out.detach().cpu(), expected_out, rtol=0, atol=0)
    assert xd.grad is not None and xd.grad.shape == x.shape
    torch.testing.assert_close(xd.grad.cpu(), expected_grad, rtol=1e-12, atol=1e-12)
    assert (expected_grad != 0).sum() > 10


def test_gradient_goes_to_first_maximum_on_ties():
    """With equal values in a bin, the first one in row-major order gets the gradient."""
    x = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    x[0, 0, 1, 1] = x[0, 0, 1, 2] = x[0, 0, 2, 1] = 5.0
    x[0, 1] = 7.0  # a constant channel: pixel (0, 0) is first
    x.requires_grad_(True)
    rois = torch.tensor([[0, 0.0, 0.0, 3.0, 2.0]], dtype=torch.float64)
    out = roi_pool(x, rois, 1)
    assert out.flatten().tolist() == [5.0, 7.0]
    out.sum().backward()
    expected = torch.zeros_like(x)
    expected[0, 0, 1, 1] = 1.0
    expected[0, 1, 0, 0] = 1.0
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)
    _, ref_grad = _reference(x, rois, 1, grad_out=torch.ones(1, 2, 1, 1))
    torch.testing.assert_close(ref_grad, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Low precision, empty input, module
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rois_float32", [False, True])
def test_low_precision_input(device, dtype, rois_float32):
    gen = torch.Generator().manual_seed(41)
    x = torch.randn(B, C, H, W, generator=gen).to(dtype)
    rois = random_rois(gen, 0.5)
    rois = rois.float() if rois_float32 else rois.to(dtype)
    out = roi_pool(x.to(device), rois.to(device), (3, 2), 0.5)
    assert out.dtype == dtype
    assert out.shape == (rois.shape[0], C, 3, 2)
    # The max of low-precision values is one of them: equal to the float32 result.
    ref32 = roi_pool(x.float(), rois.float(), (3, 2), 0.5)
    torch.testing.assert_close(out.cpu().float(), ref32, rtol=0, atol=0)
    expected, _ = _reference(x.float(), rois.float(), (3, 2), 0.5, real=np.float32)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradient(device, dtype):
    gen = torch.Generator().manual_seed(43)
    # Distinct integers in [-80, 80): exact in float16 and bfloat16, so no ties.
    shape = (1, 2, 8, 10)
    x = (torch.randperm(160, generator=gen) - 80).reshape(shape).to(dtype)
    rois = random_rois(gen, batch=1, height=8, width=10).float()
    weights = torch.randn(rois.shape[0], 2, 2, 3, generator=gen)
    xd = x.to(device).requires_grad_(True)
    out = roi_pool(xd, rois.to(device), (2, 3))
    (out * weights.to(device, dtype)).sum().backward()
    assert xd.grad is not None and xd.grad.dtype == dtype
    _, expected = _reference(x.float(), rois, (2, 3), grad_out=weights.to(dtype).float())
    torch.testing.assert_close(xd.grad.cpu().double(), expected, rtol=1e-2, atol=1e-2)
    assert (expected != 0).sum() > 5


@pytest.mark.parametrize("boxes_form", ["tensor", "list", "empty_list"])
def test_empty_rois(boxes_form):
    x = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    if boxes_form == "tensor":
        boxes = torch.zeros(0, 5, dtype=torch.float64)
    elif boxes_form == "list":
        boxes = [torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64)]
    else:
        boxes = []
    out = roi_pool(x, boxes, (3, 5), 0.5)
    assert out.shape == (0, C, 3, 5)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert x.grad is None or not x.grad.any()


def test_module_matches_function():
    gen = torch.Generator().manual_seed(53)
    x = random_map(gen)
    rois = random_rois(gen, 0.25)
    module = RoIPool((2, 3), spatial_scale=0.25)
    expected = roi_pool(x, rois, (2, 3), 0.25)
    torch.testing.assert_close(module(x, rois), expected, rtol=0, atol=0)
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(B)]
    order = torch.argsort(rois[:, 0], stable=True)
    torch.testing.assert_close(module(x, boxes), expected[order], rtol=0, atol=0)
    assert RoIPool(4, 1.0)(x, rois).shape == (rois.shape[0], C, 4, 4)
    assert "spatial_scale" in repr(module)


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
        size = (-2, 2)
    elif case == "int_input":
        x = torch.ones(B, C, H, W, dtype=torch.int64)
    elif case == "rois_float64":
        boxes = rois.double()
    elif case == "rois_half_for_float_input":
        boxes = rois.bfloat16()
    elif case == "rois_float64_for_half_input":
        x, boxes = x.bfloat16(), rois.double()
    elif case == "nan":
        boxes = rois.clone()
        boxes[0, 1] = float("nan")
    elif case == "inf":
        boxes = rois.clone()
        boxes[1, 4] = float("inf")
    with pytest.raises(ValueError, match=match):
        roi_pool(x, boxes, size, 1.0)


def test_invalid_output_size_in_module():
    with pytest.raises(ValueError, match="positive"):
        RoIPool((3, 0), 1.0)


def test_float32_rois_allowed_with_low_precision_input():
    x, rois = _valid()
    for dtype in (torch.float16, torch.bfloat16):
        out = roi_pool(x.to(dtype), rois.float(), 2, 1.0)
        assert out.dtype == dtype and out.shape == (2, C, 2, 2)


@pytest.mark.parametrize("rois_device", ["meta", CUDA])
def test_device_mismatch(rois_device):
    x, rois = _valid()
    with pytest.raises(ValueError, match="feature map is on"):
        roi_pool(x, rois.to(rois_device), 2, 1.0)
    if rois_device == "cuda":
        with pytest.raises(ValueError, match="feature map is on"):
            roi_pool(x.cuda(), rois, 2, 1.0)


# --------------------------------------------------------------------------------------------
# torchvision (only where it can be imported and run)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tv_ops():
    try:
        import torchvision

        x = torch.rand(1, 1, 4, 4)
        torchvision.ops.roi_pool(x, torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]]), 2)
    except Exception as exc:
        pytest.skip(f"torchvision.ops.roi_pool is not usable here: {exc!r}")
    return torchvision.ops


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("spatial_scale", "output_size"), GEOMETRIES)
def test_matches_torchvision(tv_ops, device, spatial_scale, output_size):
    gen = torch.Generator().manual_seed(61 + int(8 * spatial_scale))
    x = random_map(gen).to(device)
    rois = random_rois(gen, spatial_scale).to(device)
    for dtype in (torch.float64, torch.float32):
        xd, rd = x.to(dtype), rois.to(dtype)
        expected = tv_ops.roi_pool(xd, rd, output_size, spatial_scale)
        torch.testing.assert_close(roi_pool(xd, rd, output_size, spatial_scale), expected)
        torch.testing.assert_close(
            RoIPool(output_size, spatial_scale)(xd, rd),
            tv_ops.RoIPool(output_size, spatial_scale)(xd, rd),
        )
    x_ours = x.clone().requires_grad_(True)
    x_tv = x.clone().requires_grad_(True)
    weights = torch.randn(rois.shape[0], C, *_pair(output_size), generator=gen).to(x)
    (roi_pool(x_ours, rois, output_size, spatial_scale) * weights).sum().backward()
    (tv_ops.roi_pool(x_tv, rois, output_size, spatial_scale) * weights).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_tv.grad, rtol=1e-12, atol=1e-12)
