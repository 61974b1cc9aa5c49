"""Tests for ``paste_masks_in_image`` (mmdet ``_do_paste_mask`` semantics, GPU path).

Two independent references are written here: a float64 loop over every image pixel, and a
call of ``torch.nn.functional.grid_sample`` on the full image grid (the implementation does
not use ``grid_sample``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from instseg.ops import paste_masks_in_image

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
    ),
]


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def paste_loop_ref(
    masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Soft pasted masks ``(N, H, W)`` in float64, one pixel at a time.

    Pixel centre ``u = x + 0.5``; ``g = (u - x1) / (x2 - x1) * 2 - 1``; the source coordinate of
    ``grid_sample(align_corners=False)`` is ``s = ((g + 1) * M - 1) / 2``; bilinear with taps
    outside the mask reading 0.
    """
    masks = masks.reshape(masks.shape[0], masks.shape[-2], masks.shape[-1])
    out = torch.zeros(masks.shape[0], height, width, dtype=torch.float64)
    for n, (mask, box) in enumerate(zip(masks.tolist(), boxes.tolist(), strict=True)):
        mh, mw = len(mask), len(mask[0])
        x1, y1, x2, y2 = box

        def tap(r: int, c: int, mask=mask, mh=mh, mw=mw) -> float:
            return mask[r][c] if 0 <= r < mh and 0 <= c < mw else 0.0

        rows = []
        for y in range(height):
            gy = ((y + 0.5) - y1) / (y2 - y1) * 2 - 1
            sy = ((gy + 1) * mh - 1) / 2
            r0 = math.floor(sy)
            fy = sy - r0
            row = []
            for x in range(width):
                gx = ((x + 0.5) - x1) / (x2 - x1) * 2 - 1
                sx = ((gx + 1) * mw - 1) / 2
                c0 = math.floor(sx)
                fx = sx - c0
                row.append(
                    (1 - fy) * (1 - fx) * tap(r0, c0)
                    + (1 - fy) * fx * tap(r0, c0 + 1)
                    + fy * (1 - fx) * tap(r0 + 1, c0)
                    + fy * fx * tap(r0 + 1, c0 + 1)
                )
            rows.append(row)
        out[n] = torch.tensor(rows, dtype=torch.float64)
    return out


def paste_grid_sample_ref(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    height: int,
    width: int,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Soft pasted masks ``(N, H, W)`` via ``F.grid_sample`` over the whole image."""
    n = masks.shape[0]
    m = masks.reshape(n, 1, masks.shape[-2], masks.shape[-1]).to(dtype)
    b = boxes.to(dtype)
    if n == 0:
        return torch.zeros(0, height, width, dtype=dtype, device=masks.device)
    xs = torch.arange(width, dtype=dtype, device=masks.device) + 0.5
    ys = torch.arange(height, dtype=dtype, device=masks.device) + 0.5
    gx = (xs[None, :] - b[:, 0:1]) / (b[:, 2:3] - b[:, 0:1]) * 2 - 1  # (N, W)
    gy = (ys[None, :] - b[:, 1:2]) / (b[:, 3:4] - b[:, 1:2]) * 2 - 1  # (N, H)
    grid = torch.stack(
        [gx[:, None, :].expand(n, height, width), gy[:, :, None].expand(n, height, width)], dim=3
    )
    out = F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0]


def assert_bool_matches(
    result: torch.Tensor, soft_ref: torch.Tensor, threshold: float, band: float
):
    """``result`` equals ``soft_ref >= threshold`` wherever the reference is not within
    ``band`` of the threshold."""
    assert result.dtype == torch.bool
    assert result.shape == soft_ref.shape
    expected = soft_ref >= threshold
    decided = (soft_ref - threshold).abs() > band
    mismatch = (result.cpu() != expected.cpu()) & decided.cpu()
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} pixels differ, first at {mismatch.nonzero()[:5].tolist()}"
    )
    # The comparison is not vacuous.
    assert decided.float().mean() > 0.9


def make_masks(n: int, mh: int, mw: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Mask probabilities: half smooth blobs, half uniform noise."""
    noise = torch.rand(n, mh, mw, generator=gen, dtype=torch.float64)
    yy = (torch.arange(mh, dtype=torch.float64) + 0.5) / mh - 0.5
    xx = (torch.arange(mw, dtype=torch.float64) + 0.5) / mw - 0.5
    r2 = yy[:, None] ** 2 + xx[None, :] ** 2
    scale = 0.05 + 0.2 * torch.rand(n, 1, 1, generator=gen, dtype=torch.float64)
    blob = torch.exp(-r2[None] / scale)
    smooth = torch.arange(n)[:, None, None] % 2 == 0
    return torch.where(smooth, blob, noise).to(dtype)


def small_case_boxes() -> torch.Tensor:
    """Boxes for a 23 x 31 (H x W) image: inside, partly outside, larger than the image,
    thin, sub-pixel and fractional."""
    return torch.tensor(
        [
            [3.3, 4.1, 17.8, 15.6],  # inside
            [-6.2, 12.5, 9.4, 30.0],  # out on the left and bottom
            [-20.0, -15.0, 45.5, 40.0],  # larger than the image
            [25.0, -3.7, 36.2, 8.9],  # out on the right and top
            [10.25, 5.5, 12.0, 19.75],  # thin
            [14.6, 9.2, 15.3, 9.9],  # sub-pixel
        ],
        dtype=torch.float64,
    )


H, W = 23, 31


def float32_tol(mask_size: int) -> float:
    """Accuracy of a float32 paste: the grid coordinate g carries ~1e-7 rounding error, which
    the source coordinate s = ((g + 1) * M - 1) / 2 scales by M / 2."""
    return 1e-6 + 2e-7 * mask_size


# ---------------------------------------------------------------------------------------------
# References agree with each other (guards the references themselves)
# ---------------------------------------------------------------------------------------------


def test_references_agree():
    gen = torch.Generator().manual_seed(0)
    masks = make_masks(6, 7, 9, gen)
    boxes = small_case_boxes()
    loop = paste_loop_ref(masks, boxes, H, W)
    grid = paste_grid_sample_ref(masks, boxes, H, W)
    torch.testing.assert_close(loop, grid, rtol=0, atol=1e-12)
    assert (loop > 0.1).sum() > 100


# ---------------------------------------------------------------------------------------------
# Soft and bool results against the references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_size", [(7, 7), (28, 28), (7, 12), (16, 5)])
def test_paste_float64_matches_references(device, mask_size):
    gen = torch.Generator().manual_seed(sum(mask_size))
    mh, mw = mask_size
    masks = make_masks(6, mh, mw, gen)
    boxes = small_case_boxes()
    loop = paste_loop_ref(masks, boxes, H, W)
    grid = paste_grid_sample_ref(masks, boxes, H, W)

    soft = paste_masks_in_image(masks[:, None].to(device), boxes.to(device), (H, W), threshold=None)
    assert soft.shape == (6, H, W)
    assert soft.dtype == torch.float64
    assert soft.device.type == device
    torch.testing.assert_close(soft.cpu(), loop, rtol=0, atol=1e-12)
    torch.testing.assert_close(soft.cpu(), grid, rtol=0, atol=1e-12)

    for threshold in (0.5, 0.3, 0.8):
        hard = paste_masks_in_image(masks[:, None].to(device), boxes.to(device), (H, W), threshold)
        assert_bool_matches(hard, loop, threshold, band=1e-9)
        assert hard.any() and not hard.all()
    # Default threshold is 0.5.
    default = paste_masks_in_image(masks.to(device), boxes.to(device), (H, W))
    assert_bool_matches(default, loop, 0.5, band=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_size", [(7, 7), (28, 28), (12, 7)])
def test_paste_float32_matches_references(device, mask_size):
    gen = torch.Generator().manual_seed(100 + sum(mask_size))
    mh, mw = mask_size
    masks = make_masks(6, mh, mw, gen, dtype=torch.float32)
    boxes = small_case_boxes().float()
    # References in float64 from the very same float32 inputs.
    loop = paste_loop_ref(masks.double(), boxes.double(), H, W)
    grid = paste_grid_sample_ref(masks, boxes, H, W)
    torch.testing.assert_close(loop, grid, rtol=0, atol=1e-12)

    soft = paste_masks_in_image(masks[:, None].to(device), boxes.to(device), (H, W), threshold=None)
    assert soft.dtype == torch.float32
    tol = float32_tol(max(mh, mw))
    torch.testing.assert_close(soft.cpu().double(), loop, rtol=0, atol=tol)
    hard = paste_masks_in_image(masks[:, None].to(device), boxes.to(device), (H, W), 0.5)
    assert_bool_matches(hard, loop, 0.5, band=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_paste_random_boxes_many_masks(device):
    # Random boxes of every size and position, including far outside the image.
    gen = torch.Generator().manual_seed(7)
    n = 40
    xy = (
        torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([W + 20.0, H + 20]) - 10
    )
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) ** 2 * 40 + 0.2
    boxes = torch.cat([xy, xy + wh], 1)
    masks = make_masks(n, 14, 14, gen)
    grid = paste_grid_sample_ref(masks, boxes, H, W)
    soft = paste_masks_in_image(masks.to(device), boxes.to(device), (H, W), threshold=None)
    torch.testing.assert_close(soft.cpu(), grid, rtol=0, atol=1e-12)
    hard = paste_masks_in_image(masks.to(device), boxes.to(device), (H, W))
    assert_bool_matches(hard, grid, 0.5, band=1e-9)


def test_paste_identity_is_exact_and_threshold_inclusive():
    # A box covering a power-of-two image with a mask of the same size maps every pixel centre
    # onto a mask cell centre exactly, so the pasted soft mask equals the mask bit for bit.
    masks = torch.tensor(
        [[[0.5, 0.25, 0.75, 1.0], [0.0, 0.5, 0.125, 0.5]] * 4], dtype=torch.float64
    )  # (1, 8, 4)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 8.0]], dtype=torch.float64)
    soft = paste_masks_in_image(masks, boxes, (8, 4), threshold=None)
    assert torch.equal(soft, masks)
    # Exactly 0.5 is foreground (>= threshold).
    assert torch.equal(paste_masks_in_image(masks, boxes, (8, 4), 0.5), masks >= 0.5)
    assert torch.equal(paste_masks_in_image(masks, boxes, (8, 4), 0.5 + 1e-12), masks > 0.5)
    # Shifted by an integer: the same mask one pixel right and two down, zeros elsewhere.
    shifted = paste_masks_in_image(masks, boxes + torch.tensor([1.0, 2.0, 1.0, 2.0]), (12, 6), None)
    expected = torch.zeros(1, 12, 6, dtype=torch.float64)
    expected[:, 2:10, 1:5] = masks
    assert torch.equal(shifted, expected)


def test_paste_support_ends_half_a_cell_outside_the_box():
    # A constant mask pasted into [10, 20) x [10, 20) with M = 5 cells of 2 pixels: the source
    # coordinate is s = (u - 10) / 2 - 0.5, non-zero for s in (-1, 5), i.e. half a cell
    # (1 pixel) beyond the box: pixel 9 (s = -0.75) sees 1/4, pixel 10 (s = -0.25) 3/4.
    masks = torch.ones(1, 5, 5, dtype=torch.float64)
    boxes = torch.tensor([[10.0, 10.0, 20.0, 20.0]], dtype=torch.float64)
    soft = paste_masks_in_image(masks, boxes, (30, 30), threshold=None)[0]
    assert torch.equal(soft, paste_loop_ref(masks, boxes, 30, 30)[0])
    row = soft[15]
    assert row[:9].eq(0).all() and row[21:].eq(0).all()
    assert row[9].item() == pytest.approx(0.25) and row[20].item() == pytest.approx(0.25)
    assert row[10].item() == pytest.approx(0.75) and row[19].item() == pytest.approx(0.75)
    assert row[11:19].eq(1).all()
    # Separable: the 2-D result is the outer product of the 1-D profiles.
    torch.testing.assert_close(soft, row[:, None] * row[None, :], rtol=0, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_paste_boxes_fully_outside_give_empty_masks(device):
    masks = torch.ones(3, 1, 7, 7, device=device)
    boxes = torch.tensor(
        [[-30.0, 2.0, -10.0, 9.0], [40.0, 2.0, 50.0, 9.0], [2.0, 30.0, 9.0, 40.0]], device=device
    )
    soft = paste_masks_in_image(masks, boxes, (H, W), threshold=None)
    assert soft.shape == (3, H, W)
    assert soft.eq(0).all()
    assert not paste_masks_in_image(masks, boxes, (H, W)).any()


@pytest.mark.parametrize("device", DEVICES)
def test_paste_half_precision(device):
    gen = torch.Generator().manual_seed(3)
    masks = make_masks(6, 7, 7, gen)
    boxes = small_case_boxes()
    ref = paste_loop_ref(masks.half().double(), boxes.float().double(), H, W)
    soft = paste_masks_in_image(
        masks.half().to(device), boxes.float().to(device), (H, W), threshold=None
    )
    assert soft.dtype == torch.float16
    torch.testing.assert_close(soft.cpu().double(), ref, rtol=0, atol=2e-3)
    hard = paste_masks_in_image(masks.half().to(device), boxes.float().to(device), (H, W))
    assert_bool_matches(hard, ref, 0.5, band=1e-5)


# ---------------------------------------------------------------------------------------------
# Chunking
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_paste_chunking_does_not_change_the_result(device, dtype):
    gen = torch.Generator().manual_seed(21)
    n, height, width = 24, 60, 90
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([100.0, 70]) - 10
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 50 + 0.5
    boxes = torch.cat([xy, xy + wh], 1).to(dtype).to(device)
    masks = make_masks(n, 28, 28, gen, dtype=dtype)[:, None].to(device)
    ref = paste_grid_sample_ref(masks.cpu(), boxes.cpu(), height, width)
    default_soft = paste_masks_in_image(masks, boxes, (height, width), threshold=None)
    tol = float32_tol(28) if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(default_soft.cpu().double(), ref, rtol=0, atol=tol)
    for max_chunk_bytes in (4096, 64 * 1024, 1):
        soft = paste_masks_in_image(
            masks, boxes, (height, width), threshold=None, max_chunk_bytes=max_chunk_bytes
        )
        torch.testing.assert_close(soft, default_soft, rtol=0, atol=tol)
        hard = paste_masks_in_image(masks, boxes, (height, width), max_chunk_bytes=max_chunk_bytes)
        assert_bool_matches(hard, ref, 0.5, band=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_paste_300_masks_on_a_large_image(device):
    gen = torch.Generator().manual_seed(300)
    n, height, width = 300, 800, 1333
    centre = torch.rand(n, 2, generator=gen) * torch.tensor([width + 100.0, height + 100]) - 50
    size = torch.rand(n, 2, generator=gen) ** 2 * torch.tensor([500.0, 400]) + 2
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1).to(device)
    masks = make_masks(n, 28, 28, gen, dtype=torch.float32)[:, None].to(device)

    default = paste_masks_in_image(masks, boxes, (height, width))
    assert default.shape == (n, height, width)
    assert default.dtype == torch.bool
    assert default.device.type == device
    chunked = paste_masks_in_image(masks, boxes, (height, width), max_chunk_bytes=2**20)
    # Float32 rounding may differ between chunkings, so results may differ only at pixels
    # whose value is right on the threshold.
    differ = default != chunked
    if differ.any():
        which = differ.any(dim=(1, 2)).nonzero()[:, 0]
        soft = paste_masks_in_image(masks[which], boxes[which], (height, width), threshold=None)
        assert ((soft[differ[which]] - 0.5).abs() < 1e-5).all()

    # A handful of masks against grid_sample, evaluated over a crop around each box.
    chosen = torch.randperm(n, generator=gen)[:6].tolist()
    for i in chosen:
        x1, y1, x2, y2 = boxes[i].tolist()
        cx0 = max(0, math.floor(x1) - 30)
        cy0 = max(0, math.floor(y1) - 30)
        cx1 = min(width, math.ceil(x2) + 30)
        cy1 = min(height, math.ceil(y2) + 30)
        if cx1 <= cx0 or cy1 <= cy0:
            assert not default[i].any() and not chunked[i].any()
            continue
        shifted = boxes[i : i + 1].cpu().double() - torch.tensor([cx0, cy0, cx0, cy0])
        ref = paste_grid_sample_ref(masks[i : i + 1].cpu(), shifted, cy1 - cy0, cx1 - cx0)[0]
        # Nothing is pasted outside the crop.
        outside = default[i].clone()
        outside[cy0:cy1, cx0:cx1] = False
        assert not outside.any()
        for result in (default, chunked):
            assert_bool_matches(result[i, cy0:cy1, cx0:cx1][None], ref[None], 0.5, band=1e-5)
    assert default.any(dim=(1, 2)).sum() > n // 2

    # Soft results for a few masks over the full image, against the full grid_sample.
    few = chosen[:3]
    soft = paste_masks_in_image(masks[few], boxes[few], (height, width), threshold=None)
    ref = paste_grid_sample_ref(masks[few].cpu(), boxes[few].cpu(), height, width)
    torch.testing.assert_close(soft.cpu().double(), ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Shapes, forms and argument checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_paste_empty(device):
    masks = torch.zeros(0, 1, 28, 28, device=device)
    boxes = torch.zeros(0, 4, device=device)
    hard = paste_masks_in_image(masks, boxes, (H, W))
    assert hard.shape == (0, H, W)
    assert hard.dtype == torch.bool
    soft = paste_masks_in_image(masks[:, 0], boxes, (H, W), threshold=None)
    assert soft.shape == (0, H, W)
    assert soft.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_paste_mask_forms_agree(device):
    gen = torch.Generator().manual_seed(5)
    masks = make_masks(6, 9, 13, gen, dtype=torch.float32).to(device)
    boxes = small_case_boxes().float().to(device)
    for threshold in (None, 0.5):
        a = paste_masks_in_image(masks[:, None], boxes, (H, W), threshold)
        b = paste_masks_in_image(masks, boxes, (H, W), threshold)
        assert torch.equal(a, b)
    # image_shape as a tuple, a list or a torch.Size.
    c = paste_masks_in_image(masks, boxes, torch.Size([H, W]))
    d = paste_masks_in_image(masks, boxes, [H, W])
    assert torch.equal(c, d) and c.shape == (6, H, W)


def test_paste_rejects_bad_arguments():
    masks = torch.rand(3, 1, 7, 7)
    boxes = torch.rand(3, 4) * 5 + torch.tensor([0.0, 0.0, 6.0, 6.0])
    with pytest.raises(ValueError, match="channel"):
        paste_masks_in_image(torch.rand(3, 2, 7, 7), boxes, (H, W))
    with pytest.raises(ValueError, match="masks"):
        paste_masks_in_image(torch.rand(7, 7), boxes, (H, W))
    with pytest.raises(ValueError, match="masks"):
        paste_masks_in_image(torch.rand(3, 1, 1, 7, 7), boxes, (H, W))
    with pytest.raises(ValueError, match="floating"):
        paste_masks_in_image(torch.ones(3, 1, 7, 7, dtype=torch.uint8), boxes, (H, W))
    with pytest.raises(ValueError, match="boxes"):
        paste_masks_in_image(masks, boxes[:2], (H, W))
    with pytest.raises(ValueError, match="boxes"):
        paste_masks_in_image(masks, torch.rand(3, 5), (H, W))
    with pytest.raises(ValueError, match="boxes"):
        paste_masks_in_image(masks, boxes.reshape(12), (H, W))
    with pytest.raises(ValueError, match="image_shape"):
        paste_masks_in_image(masks, boxes, (0, W))
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        paste_masks_in_image(masks, boxes, (H, W), max_chunk_bytes=0)


# ---------------------------------------------------------------------------------------------
# mode="torchvision": torchvision's paste (one-cell padding, grown integer boxes)
# ---------------------------------------------------------------------------------------------


def paste_torchvision_loop_ref(
    masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """torchvision's ``paste_masks_in_image`` semantics, one box at a time: pad the mask by a
    zero cell, grow the box by ``(M + 2) / M``, truncate it to integers, resize the padded
    mask with ``F.interpolate`` to the integer box and copy the part inside the image."""
    out = torch.zeros(masks.shape[0], height, width, dtype=masks.dtype)
    m = masks.shape[-1]
    grow = (m + 2) / m
    for n in range(masks.shape[0]):
        x1, y1, x2, y2 = boxes[n]
        half_w, half_h = (x2 - x1) * 0.5 * grow, (y2 - y1) * 0.5 * grow
        cx, cy = (x2 + x1) * 0.5, (y2 + y1) * 0.5
        bx0, by0, bx1, by1 = (int(v) for v in (cx - half_w, cy - half_h, cx + half_w, cy + half_h))
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        padded = F.pad(masks[n], (1, 1, 1, 1))
        resized = F.interpolate(padded[None, None], size=(h, w), mode="bilinear")[0, 0]
        x0, xe = max(bx0, 0), min(bx1 + 1, width)
        y0, ye = max(by0, 0), min(by1 + 1, height)
        if x0 < xe and y0 < ye:
            out[n, y0:ye, x0:xe] = resized[y0 - by0 : ye - by0, x0 - bx0 : xe - bx0]
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paste_torchvision_mode_matches_its_loop(dtype):
    gen = torch.Generator().manual_seed(3)
    n, height, width = 40, 61, 83
    masks = torch.rand(n, 28, 28, generator=gen, dtype=dtype)
    xy = torch.rand(n, 2, generator=gen, dtype=dtype) * torch.tensor([100.0, 80.0], dtype=dtype)
    wh = torch.rand(n, 2, generator=gen, dtype=dtype) * 50
    boxes = torch.cat([xy - 15, xy - 15 + wh], 1)
    boxes[0] = torch.tensor([5.0, 6.0, 5.2, 6.1])  # nearly empty: a one-pixel resize
    boxes[1] = torch.tensor([-40.0, -30.0, -20.0, -10.0])  # outside the image
    want = paste_torchvision_loop_ref(masks, boxes, height, width)
    got = paste_masks_in_image(masks, boxes, (height, width), None, mode="torchvision")
    # float32: source coordinates near 28 carry 2e-6 of rounding (the compiled kernel's
    # operation order is not ours), so the weights differ at that level.
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (got - want).abs().max() <= tol
    binary = paste_masks_in_image(
        masks, boxes, (height, width), 0.5, max_chunk_bytes=4096, mode="torchvision"
    )
    decided = (want - 0.5).abs() > 1e-5
    assert torch.equal(binary[decided], (want >= 0.5)[decided])
    with pytest.raises(ValueError, match="mode must be one of"):
        paste_masks_in_image(masks, boxes, (height, width), mode="nearest")
