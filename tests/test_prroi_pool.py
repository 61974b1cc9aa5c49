"""Tests for Precise RoI Pooling (``prroi_pool2d`` / ``PrRoIPool2D``).

The references are the float64 loops of ``prroi_reference.py``, written from the definition
(spec §6); the tests of section 2 check those references against Riemann sums, finite
differences and closed-form values. No instseg internals are imported: only the public
``prroi_pool2d`` / ``PrRoIPool2D``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instseg.ops import PrRoIPool2D, prroi_pool2d
from prroi_reference import (
    edge_integral_horizontal,
    edge_integral_vertical,
    make_features,
    make_rois,
    ref_bin_integral,
    ref_box_grad,
    ref_feature_grad,
    ref_prroi_pool,
    riemann_bin_integral,
    surface,
    to_numpy,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
    ),
]


# --------------------------------------------------------------------------------------------
# 1. Exact reference comparison
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("pooled", [(3, 2), (2, 3), (1, 1), (4, 4)])
def test_matches_exact_reference(device, scale, pooled):
    ph, pw = pooled
    feats = make_features(0)
    rois = make_rois(scale, seed=int(scale * 100) + ph * 10 + pw)
    expected = ref_prroi_pool(to_numpy(feats), to_numpy(rois), ph, pw, scale)

    out = prroi_pool2d(feats.to(device), rois.to(device), ph, pw, scale)
    assert out.shape == (rois.shape[0], feats.shape[1], ph, pw)
    assert out.dtype == torch.float64
    assert out.device.type == device
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-10, atol=1e-10)
    # Non-trivial: most bins are non-zero, the wholly outside RoIs are all zero.
    assert np.count_nonzero(expected) > expected.size // 2
    assert np.all(expected[4] == 0) and np.all(expected[5] == 0)
    if device != "cpu":
        cpu = prroi_pool2d(feats, rois, ph, pw, scale)
        torch.testing.assert_close(out.cpu(), cpu, rtol=1e-10, atol=1e-10)


def test_non_contiguous_features_match_reference():
    base = make_features(3, shape=(2, 2, 11, 9))
    feats = base.transpose(2, 3)  # (2, 2, 9, 11), non-contiguous
    assert not feats.is_contiguous()
    rois = make_rois(0.5, seed=3)
    expected = ref_prroi_pool(to_numpy(feats), to_numpy(rois), 3, 2, 0.5)
    out = prroi_pool2d(feats, rois, 3, 2, 0.5)
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-10, atol=1e-10)

    channels_last = feats.contiguous(memory_format=torch.channels_last)
    out_cl = prroi_pool2d(channels_last, rois, 3, 2, 0.5)
    np.testing.assert_allclose(to_numpy(out_cl), expected, rtol=1e-10, atol=1e-10)

    sliced = make_features(4, shape=(2, 4, 9, 22))[:, ::2, :, ::2]  # strided in C and W
    assert not sliced.is_contiguous()
    expected = ref_prroi_pool(to_numpy(sliced), to_numpy(rois), 2, 3, 0.5)
    out = prroi_pool2d(sliced, rois, 2, 3, 0.5)
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-10, atol=1e-10)


def test_batch_index_is_truncated():
    feats = make_features(5)
    rois = torch.tensor([[1.9, 1.0, 2.0, 6.5, 7.5], [0.7, 1.0, 2.0, 6.5, 7.5]], dtype=torch.float64)
    out = prroi_pool2d(feats, rois, 2, 2, 1.0)
    expected = ref_prroi_pool(
        to_numpy(feats), np.array([[1, 1.0, 2.0, 6.5, 7.5], [0, 1.0, 2.0, 6.5, 7.5]]), 2, 2, 1.0
    )
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out[0], out[1])


# --------------------------------------------------------------------------------------------
# 2. Validate the references themselves
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bin_",
    [
        (1.3, 3.9, 2.2, 4.05),  # inside
        (-1.7, 0.8, 6.4, 9.6),  # crosses the left and bottom borders
        (4.25, 4.75, 3.1, 3.3),  # sub-pixel
        (-2.0, 12.5, -1.5, 10.0),  # covers the whole map
    ],
)
def test_reference_matches_riemann_sum(bin_):
    fmap = to_numpy(make_features(7)[0, 1])
    a1, a2, b1, b2 = bin_
    exact = ref_bin_integral(fmap, a1, a2, b1, b2)
    approx = riemann_bin_integral(fmap, a1, a2, b1, b2, n=60)
    scale = np.abs(surface(fmap, np.linspace(a1, a2, 30), np.linspace(b1, b2, 30))).max()
    assert abs(exact) > 1e-3 * scale * (a2 - a1) * (b2 - b1)
    assert abs(exact - approx) <= 1e-3 * max(abs(exact), scale * (a2 - a1) * (b2 - b1))


def test_reference_integral_of_one_pixel_is_one():
    # The hat surface of a single unit pixel integrates to 1 (tent of base 2x2, height 1).
    fmap = np.zeros((5, 6))
    fmap[2, 3] = 1.0
    assert ref_bin_integral(fmap, -5, 10, -5, 10) == pytest.approx(1.0, abs=1e-14)
    assert ref_bin_integral(fmap, 3, 10, 2, 10) == pytest.approx(0.25, abs=1e-14)
    # A pixel in the corner: still 1 (the surface extends half a tent beyond the map edge).
    fmap = np.zeros((5, 6))
    fmap[0, 0] = 1.0
    assert ref_bin_integral(fmap, -5, 10, -5, 10) == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize("line", [(2.3, -0.6, 7.9), (-0.4, 1.2, 3.0), (10.5, -2.0, 9.5)])
def test_edge_integral_reference_matches_fine_rule(line):
    fmap = to_numpy(make_features(8)[1, 0])
    pos, p, q = line
    n = 20000
    ts = p + (np.arange(n) + 0.5) * (q - p) / n
    vertical = surface(fmap, [pos], ts)[:, 0].sum() * (q - p) / n
    horizontal = surface(fmap, ts, [pos * 0.7])[0, :].sum() * (q - p) / n
    assert edge_integral_vertical(fmap, pos, p, q) == pytest.approx(vertical, abs=1e-6)
    assert edge_integral_horizontal(fmap, pos * 0.7, p, q) == pytest.approx(horizontal, abs=1e-6)


def test_box_grad_reference_matches_finite_differences():
    feats = to_numpy(make_features(9))
    rois = np.array([[0, 1.3, 2.1, 7.6, 6.9], [1, -3.4, -2.2, 4.1, 5.5], [1, 4.3, 3.6, 4.9, 4.4]])
    gen = np.random.default_rng(9)
    grad_out = gen.standard_normal((3, 2, 3, 2))
    grad = ref_box_grad(feats, rois, 3, 2, 0.5, grad_out)
    eps = 1e-6
    for k in range(rois.shape[0]):
        for col in range(1, 5):
            plus, minus = rois.copy(), rois.copy()
            plus[k, col] += eps
            minus[k, col] -= eps
            fd = (
                (ref_prroi_pool(feats, plus, 3, 2, 0.5) - ref_prroi_pool(feats, minus, 3, 2, 0.5))
                * grad_out
            ).sum() / (2 * eps)
            assert grad[k, col] == pytest.approx(fd, abs=1e-6, rel=1e-6)


# --------------------------------------------------------------------------------------------
# 3. The avg-pool identity from the official test
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_avg_pool_identity(dtype):
    feats = make_features(11, shape=(2, 3, 24, 32), dtype=dtype)
    rois = torch.tensor([[0, 0, 0, 14, 14], [1, 0, 0, 14, 14]], dtype=dtype)
    out = prroi_pool2d(feats, rois, 7, 7, 0.5)
    expected = F.avg_pool2d(feats, kernel_size=2, stride=1)[:, :, :7, :7]
    assert out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    module = PrRoIPool2D(7, 7, 0.5)
    torch.testing.assert_close(module(feats, rois), expected, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------
# 4. gradcheck
# --------------------------------------------------------------------------------------------

GRAD_ROIS = [
    [0, 1.3, 2.1, 7.6, 6.9],
    [1, -1.4, -2.2, 4.1, 3.5],  # partly outside
    [1, 4.6, 3.7, 8.2, 8.9],  # partly outside on the far side
    [0, 2.35, 1.6, 3.05, 2.2],  # small
]


def test_gradcheck_features():
    feats = make_features(12, shape=(2, 2, 6, 7)).requires_grad_(True)
    rois = torch.tensor(GRAD_ROIS, dtype=torch.float64)
    rois[:, 1:] /= 0.5
    assert torch.autograd.gradcheck(
        lambda f: prroi_pool2d(f, rois, 3, 2, 0.5), (feats,), eps=1e-6, atol=1e-7
    )


def test_gradcheck_features_non_contiguous():
    feats = make_features(13, shape=(2, 2, 7, 6)).transpose(2, 3).detach().requires_grad_(True)
    rois = torch.tensor(GRAD_ROIS, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda f: prroi_pool2d(f, rois, 2, 2, 1.0), (feats,), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_gradcheck_rois(scale):
    feats = make_features(14, shape=(2, 2, 6, 7))
    rois = torch.tensor(GRAD_ROIS, dtype=torch.float64)
    rois[:, 1:] /= scale
    batch = rois[:, :1].clone()
    coords = rois[:, 1:].clone().requires_grad_(True)

    def fn(c):
        return prroi_pool2d(feats, torch.cat([batch, c], dim=1), 3, 2, scale)

    assert torch.autograd.gradcheck(fn, (coords,), eps=1e-6, atol=1e-6)


def test_gradcheck_features_and_rois_together():
    feats = make_features(15, shape=(1, 1, 5, 6)).requires_grad_(True)
    coords = torch.tensor([[0.4, -0.7, 4.3, 3.1], [1.2, 1.3, 5.9, 4.6]], dtype=torch.float64)
    coords.requires_grad_(True)
    batch = torch.zeros(2, 1, dtype=torch.float64)

    def fn(f, c):
        return prroi_pool2d(f, torch.cat([batch, c], dim=1), 2, 2, 1.0)

    assert torch.autograd.gradcheck(fn, (feats, coords), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 5./6. Analytic box gradient (§6.4) and the batch column
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("scale", "pooled"), [(1.0, (3, 2)), (0.5, (2, 3)), (0.25, (1, 1))])
def test_box_gradient_matches_spec(device, scale, pooled):
    ph, pw = pooled
    feats = make_features(16)
    rois_list = [
        [0, 1.3, 2.1, 7.6, 6.9],
        [1, 0.2, 0.7, 10.4, 8.3],
        [1, -3.4, -2.2, 4.1, 5.5],  # partly outside
        [0, 6.5, 4.25, 14.7, 12.3],  # partly outside
        [0, 4.37, 3.61, 4.52, 3.83],  # tiny
        [1, 2.0, 1.0, 8.0, 7.0],  # integer corners
        [0, -6.3, -5.1, 18.2, 16.9],  # larger than the map
    ]
    rois = torch.tensor(rois_list, dtype=torch.float64)
    rois[:, 1:] /= scale
    gen = torch.Generator().manual_seed(17)
    grad_out = torch.randn(
        rois.shape[0], feats.shape[1], ph, pw, generator=gen, dtype=torch.float64
    )

    feats_d = feats.detach().clone().to(device).requires_grad_(True)
    rois_d = rois.detach().clone().to(device).requires_grad_(True)
    out = prroi_pool2d(feats_d, rois_d, ph, pw, scale)
    (out * grad_out.to(device)).sum().backward()

    expected = ref_box_grad(to_numpy(feats), to_numpy(rois), ph, pw, scale, to_numpy(grad_out))
    np.testing.assert_allclose(to_numpy(rois_d.grad), expected, rtol=1e-8, atol=1e-9)
    assert torch.all(rois_d.grad[:, 0] == 0)
    assert np.abs(expected[:, 1:]).min() > 0  # every coordinate gets a gradient

    # Feature gradient: out is linear in F, so d out / d F[i, j] is the pooled unit map.
    ref_feat_grad = ref_feature_grad(
        to_numpy(feats), to_numpy(rois), ph, pw, scale, to_numpy(grad_out)
    )
    np.testing.assert_allclose(to_numpy(feats_d.grad), ref_feat_grad, rtol=1e-9, atol=1e-10)

    if device != "cpu":
        feats_c = feats.clone().requires_grad_(True)
        rois_c = rois.clone().requires_grad_(True)
        (prroi_pool2d(feats_c, rois_c, ph, pw, scale) * grad_out).sum().backward()
        torch.testing.assert_close(feats_d.grad.cpu(), feats_c.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(rois_d.grad.cpu(), rois_c.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_column_gradient_is_exactly_zero(dtype):
    feats = make_features(18, dtype=dtype).requires_grad_(True)
    rois = make_rois(0.5, seed=18).to(dtype).requires_grad_(True)
    out = prroi_pool2d(feats, rois, 3, 2, 0.5)
    (out * torch.linspace(-1, 2, out.numel(), dtype=dtype).view_as(out)).sum().backward()
    assert rois.grad is not None
    assert rois.grad.dtype == dtype
    assert torch.equal(rois.grad[:, 0], torch.zeros(rois.shape[0], dtype=dtype))
    assert rois.grad[:, 1:].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# 7. Edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "roi",
    [
        [0, 3.0, 2.0, 3.0, 6.5],  # x1 == x0
        [1, 1.5, 4.0, 7.5, 4.0],  # y1 == y0
        [0, 5.0, 5.0, 5.0, 5.0],  # a point
        [0, 7.0, 2.0, 2.5, 6.0],  # x1 < x0
        [1, 1.0, 6.0, 8.0, 1.5],  # y1 < y0
        [1, 8.0, 6.0, 1.0, 1.5],  # both inverted
    ],
)
def test_degenerate_boxes_give_zero_output_and_gradient(roi):
    feats = make_features(19).requires_grad_(True)
    rois = torch.tensor([roi], dtype=torch.float64, requires_grad=True)
    out = prroi_pool2d(feats, rois, 3, 2, 1.0)
    assert out.shape == (1, 2, 3, 2)
    assert torch.equal(out, torch.zeros_like(out))
    (out * torch.randn(out.shape, dtype=torch.float64)).sum().backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))
    assert torch.equal(rois.grad, torch.zeros_like(rois))
    assert torch.isfinite(rois.grad).all()


def test_degenerate_box_next_to_regular_box():
    feats = make_features(20).requires_grad_(True)
    rois = torch.tensor(
        [[0, 3.0, 2.0, 3.0, 6.5], [0, 1.5, 1.0, 6.5, 7.0]], dtype=torch.float64, requires_grad=True
    )
    out = prroi_pool2d(feats, rois, 2, 2, 1.0)
    out.sum().backward()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(rois.grad[0], torch.zeros(5, dtype=torch.float64))
    assert rois.grad[1, 1:].abs().min() > 0
    np.testing.assert_allclose(
        to_numpy(out), ref_prroi_pool(to_numpy(feats), to_numpy(rois), 2, 2, 1.0), atol=1e-10
    )


def test_bins_fully_outside_are_zero():
    feats = make_features(21) + 5.0  # strictly non-zero surface inside the map
    rois = torch.tensor(
        [
            [0, 12.5, 0.0, 20.0, 8.0],  # right of the map (f vanishes for x >= W = 11)
            [1, -9.0, -9.0, -1.0, -1.0],  # up-left (f vanishes for x, y <= -1)
            # 3 bins of width 12: [-13, -1] and [11, 23] outside, [-1, 11] over the map.
            [0, -13.0, 2.0, 23.0, 3.0],
        ],
        dtype=torch.float64,
    )
    out = prroi_pool2d(feats, rois, 1, 3, 1.0)
    # Beyond the far edges the value is a difference of (equal) full-map integrals, so allow
    # round-off there; before x, y = -1 nothing is integrated at all.
    torch.testing.assert_close(out[0], torch.zeros_like(out[0]), rtol=0, atol=1e-12)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.all(out[2, :, 0, 0] == 0)
    assert torch.all(out[2, :, 0, 1] > 1.0)
    torch.testing.assert_close(
        out[2, :, 0, 2], torch.zeros_like(out[2, :, 0, 2]), rtol=0, atol=1e-12
    )
    expected = ref_prroi_pool(to_numpy(feats), to_numpy(rois), 1, 3, 1.0)
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-10, atol=1e-10)


def test_dilution_outside_the_map():
    ones = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    # Along x the surface of a map of ones is 1 on [0, 7], 1 + x on [-1, 0], 0 below -1.
    # Box x in [-3, 2]: integral 0.5 + 2 = 2.5 over a width of 5 -> 0.5 (y wholly inside).
    rois = torch.tensor(
        [
            [0, -3.0, 1.0, 2.0, 5.0],
            [0, 5.0, 2.0, 10.0, 4.0],  # x in [5, 10]: 2 + 0.5 = 2.5 over 5 -> 0.5 (right edge)
            [0, -3.0, -3.0, 2.0, 2.0],  # both axes: 0.5 * 0.5
            [0, 1.0, 1.0, 6.0, 6.0],  # inside: exactly 1
        ],
        dtype=torch.float64,
    )
    out = prroi_pool2d(ones, rois, 1, 1, 1.0).flatten()
    torch.testing.assert_close(
        out, torch.tensor([0.5, 0.5, 0.25, 1.0], dtype=torch.float64), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("form", ["tensor", "empty_list", "list_of_empty"])
def test_empty_rois(form):
    feats = make_features(22).requires_grad_(True)
    if form == "tensor":
        rois = torch.zeros(0, 5, dtype=torch.float64)
    elif form == "empty_list":
        rois = []
    else:
        rois = [torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64)]
    out = prroi_pool2d(feats, rois, 3, 2, 0.5)
    assert out.shape == (0, 2, 3, 2)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert feats.grad is not None
    assert feats.grad.shape == feats.shape
    assert torch.equal(feats.grad, torch.zeros_like(feats))


# --------------------------------------------------------------------------------------------
# 8. dtypes and precision
# --------------------------------------------------------------------------------------------


def test_float32_matches_float64_on_a_large_map():
    gen = torch.Generator().manual_seed(23)
    feats32 = torch.rand(1, 1, 200, 272, generator=gen)  # positive: large prefix sums
    scale = 0.25
    rois32 = torch.tensor(
        [
            [0, 1070.25, 790.5, 1072.5, 792.75],  # tiny, far into the map (bottom-right)
            [0, 1081.0, 795.0, 1081.75, 795.5],  # tiny, at the far corner
            [0, 600.125, 400.375, 608.5, 410.0],  # small, in the middle
            [0, -40.0, -24.0, 1200.0, 900.0],  # larger than the map
            [0, 3.5, 7.25, 30.0, 61.0],  # near the origin
        ]
    )
    out32 = prroi_pool2d(feats32, rois32, 3, 2, scale)
    out64 = prroi_pool2d(feats32.double(), rois32.double(), 3, 2, scale)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=1e-6)
    # The float64 result itself matches the exact reference on the small RoIs (up to the
    # round-off of differencing integrals of the whole map over bins of ~0.004 px^2).
    small = [0, 1, 2, 4]
    expected = ref_prroi_pool(to_numpy(feats32), to_numpy(rois32[small]), 3, 2, scale)
    np.testing.assert_allclose(to_numpy(out64[small]), expected, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(to_numpy(out32[small]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)], ids=["fp16", "bf16"]
)
def test_low_precision_dtypes(dtype, tol):
    feats = make_features(24, shape=(2, 2, 9, 11), dtype=torch.float32)
    low = feats.to(dtype)
    rois32 = make_rois(0.5, seed=24).float()

    # float32 RoIs with a low-precision map.
    out = prroi_pool2d(low, rois32, 3, 2, 0.5)
    assert out.dtype == dtype
    expected = prroi_pool2d(low.float(), rois32, 3, 2, 0.5)
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    # ... and the quantisation of the map alone stays within the dtype's precision.
    torch.testing.assert_close(
        out.float(), prroi_pool2d(feats, rois32, 3, 2, 0.5), rtol=4 * tol, atol=4 * tol
    )

    # RoIs in the map's own dtype.
    rois_low = rois32.to(dtype)
    out_low = prroi_pool2d(low, rois_low, 3, 2, 0.5)
    assert out_low.dtype == dtype
    expected_low = prroi_pool2d(low.float(), rois_low.float(), 3, 2, 0.5)
    torch.testing.assert_close(out_low.float(), expected_low, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_backward(dtype):
    feats = make_features(25, shape=(1, 2, 9, 11), dtype=torch.float32)
    rois = torch.tensor([[0, 1.3, 2.1, 7.6, 6.9], [0, -2.0, 3.0, 5.5, 9.5]])
    low = feats.to(dtype).requires_grad_(True)
    rois_low = rois.clone().requires_grad_(True)
    prroi_pool2d(low, rois_low, 2, 2, 1.0).float().sum().backward()
    ref = feats.to(dtype).float().requires_grad_(True)
    rois_ref = rois.clone().requires_grad_(True)
    prroi_pool2d(ref, rois_ref, 2, 2, 1.0).sum().backward()
    assert low.grad.dtype == dtype
    assert rois_low.grad.dtype == torch.float32
    torch.testing.assert_close(low.grad.float(), ref.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(rois_low.grad, rois_ref.grad, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------------------------
# 9. Module and list-of-boxes form
# --------------------------------------------------------------------------------------------


def test_module_equals_function():
    feats = make_features(26)
    rois = make_rois(0.25, seed=26)
    module = PrRoIPool2D(3, 2, 0.25)
    assert module.pooled_height == 3 and module.pooled_width == 2
    assert module.spatial_scale == 0.25
    assert "pooled_height=3" in repr(module)
    assert torch.equal(module(feats, rois), prroi_pool2d(feats, rois, 3, 2, 0.25))
    assert len(list(module.parameters())) == 0


def test_list_of_boxes_equals_k5_form():
    feats = make_features(27)
    boxes0 = torch.tensor([[1.3, 2.1, 7.6, 6.9], [-3.0, -1.0, 4.5, 3.25]], dtype=torch.float64)
    boxes1 = torch.tensor(
        [[0.2, 0.7, 10.4, 8.3], [5.5, 4.0, 12.0, 9.5], [4.37, 3.61, 4.52, 3.83]],
        dtype=torch.float64,
    )
    rois = torch.cat(
        [
            torch.cat([torch.zeros(2, 1, dtype=torch.float64), boxes0], dim=1),
            torch.cat([torch.ones(3, 1, dtype=torch.float64), boxes1], dim=1),
        ]
    )
    from_list = prroi_pool2d(feats, [boxes0, boxes1], 2, 3, 1.0)
    from_k5 = prroi_pool2d(feats, rois, 2, 3, 1.0)
    assert torch.equal(from_list, from_k5)
    assert torch.equal(PrRoIPool2D(2, 3, 1.0)(feats, [boxes0, boxes1]), from_k5)
    np.testing.assert_allclose(
        to_numpy(from_k5), ref_prroi_pool(to_numpy(feats), to_numpy(rois), 2, 3, 1.0), atol=1e-10
    )
    # Gradients reach the per-image box tensors.
    b0 = boxes0.clone().requires_grad_(True)
    b1 = boxes1.clone().requires_grad_(True)
    prroi_pool2d(feats, [b0, b1], 2, 3, 1.0).sum().backward()
    r = rois.clone().requires_grad_(True)
    prroi_pool2d(feats, r, 2, 3, 1.0).sum().backward()
    torch.testing.assert_close(torch.cat([b0.grad, b1.grad]), r.grad[:, 1:])


# --------------------------------------------------------------------------------------------
# 10. Argument errors
# --------------------------------------------------------------------------------------------


def test_value_errors():
    feats = make_features(28)  # (2, 2, 9, 11) float64
    good = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]], dtype=torch.float64)

    with pytest.raises(ValueError, match=r"\[K, 5\]"):
        prroi_pool2d(feats, torch.zeros(3, 4, dtype=torch.float64), 2, 2, 1.0)
    with pytest.raises(ValueError, match=r"\[K, 5\]"):
        prroi_pool2d(feats, torch.zeros(5, dtype=torch.float64), 2, 2, 1.0)
    with pytest.raises(ValueError, match=r"\[K, 5\]"):
        prroi_pool2d(feats, torch.zeros(2, 5, 1, dtype=torch.float64), 2, 2, 1.0)
    with pytest.raises(ValueError, match=r"rois\[1\] must be a Tensor\[L, 4\]"):
        prroi_pool2d(feats, [good[:, 1:], good], 2, 2, 1.0)

    bad_batch = good.clone()
    bad_batch[0, 0] = 2.0
    with pytest.raises(ValueError, match="batch index out of range"):
        prroi_pool2d(feats, bad_batch, 2, 2, 1.0)
    bad_batch[0, 0] = -1.0
    with pytest.raises(ValueError, match="batch index out of range"):
        prroi_pool2d(feats, bad_batch, 2, 2, 1.0)
    with pytest.raises(ValueError, match="batch index out of range"):
        prroi_pool2d(feats, [good[:, 1:], good[:, 1:], good[:, 1:]], 2, 2, 1.0)

    for ph, pw in [(0, 2), (2, 0), (-1, 2), (2, -3)]:
        with pytest.raises(ValueError, match="must be positive"):
            prroi_pool2d(feats, good, ph, pw, 1.0)
        with pytest.raises(ValueError, match="must be positive"):
            PrRoIPool2D(ph, pw, 1.0)
    with pytest.raises(ValueError, match="must hold ints"):
        prroi_pool2d(feats, good, 2.0, 2, 1.0)

    with pytest.raises(ValueError, match="must be floating point"):
        prroi_pool2d(feats.long(), good, 2, 2, 1.0)
    with pytest.raises(ValueError, match="must be floating point"):
        prroi_pool2d(feats, good.long(), 2, 2, 1.0)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        prroi_pool2d(feats[0], good, 2, 2, 1.0)
    with pytest.raises(ValueError, match="must be a Tensor"):
        prroi_pool2d(feats.numpy(), good, 2, 2, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        prroi_pool2d(feats, good.float(), 2, 2, 1.0)

    for bad in (float("nan"), float("inf"), -float("inf")):
        for col in range(1, 5):
            r = good.clone()
            r[0, col] = bad
            with pytest.raises(ValueError, match="NaN or inf"):
                prroi_pool2d(feats, r, 2, 2, 1.0)

    # A device mismatch is caught without any GPU: the meta device differs from the CPU.
    with pytest.raises(ValueError, match="are on meta"):
        prroi_pool2d(feats, good.to("meta"), 2, 2, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_value_error_cuda_device_mismatch():
    feats = make_features(29)
    good = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="are on"):
        prroi_pool2d(feats, good.cuda(), 2, 2, 1.0)
    with pytest.raises(ValueError, match="are on"):
        prroi_pool2d(feats.cuda(), good, 2, 2, 1.0)
