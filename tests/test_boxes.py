"""Tests for NMS and the box utilities in ``instseg.ops.boxes``.

References are written here in plain Python (lists and floats), never with instseg code.
"""

from __future__ import annotations

import math

import pytest
import torch

from instseg.ops import (
    batched_nms,
    box_area,
    box_convert,
    box_iou,
    clip_boxes_to_image,
    decode_deltas,
    encode_deltas,
    nms,
    remove_small_boxes,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
    ),
]
THRESHOLDS = [0.3, 0.5, 0.7]


# ---------------------------------------------------------------------------------------------
# Plain-Python references
# ---------------------------------------------------------------------------------------------


def iou_py(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy boxes (width = x2 - x1); NaN when both boxes have zero area."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union == 0:
        return math.nan
    return inter / union


def nms_py(boxes: list[list[float]], scores: list[float], threshold: float) -> list[int]:
    """Greedy NMS: decreasing score, ties by lower index, drop when IoU > threshold.

    The IoU arithmetic is that of :func:`iou_py`, inlined for speed. Pairs that do not
    overlap have IoU 0 (or NaN for two zero-area boxes) and never suppress, since the
    thresholds used here are >= 0; NaN > threshold is False as well.
    """
    assert threshold >= 0
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    kept_boxes: list[tuple[float, float, float, float, float]] = []
    for i in order:
        x1, y1, x2, y2 = boxes[i]
        area = (x2 - x1) * (y2 - y1)
        suppressed = False
        for kx1, ky1, kx2, ky2, karea in kept_boxes:
            iw = min(x2, kx2) - max(x1, kx1)
            if iw <= 0:
                continue
            ih = min(y2, ky2) - max(y1, ky1)
            if ih <= 0:
                continue
            inter = iw * ih
            if inter / (karea + area - inter) > threshold:
                suppressed = True
                break
        if not suppressed:
            kept.append(i)
            kept_boxes.append((x1, y1, x2, y2, area))
    return kept


def batched_nms_py(
    boxes: list[list[float]], scores: list[float], idxs: list[int], threshold: float
) -> list[int]:
    kept: list[int] = []
    for c in sorted(set(idxs)):
        members = [i for i in range(len(idxs)) if idxs[i] == c]
        sub = nms_py([boxes[i] for i in members], [scores[i] for i in members], threshold)
        kept.extend(members[k] for k in sub)
    return sorted(kept, key=lambda i: (-scores[i], i))


def ref_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    return nms_py(boxes.cpu().tolist(), scores.cpu().tolist(), threshold)


def ref_batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, threshold: float
) -> list[int]:
    return batched_nms_py(
        boxes.cpu().tolist(), scores.cpu().tolist(), idxs.cpu().tolist(), threshold
    )


# ---------------------------------------------------------------------------------------------
# Random inputs
# ---------------------------------------------------------------------------------------------


def random_boxes(
    n: int,
    gen: torch.Generator,
    extent: float = 100.0,
    max_size: float = 40.0,
    integer: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """xyxy boxes with top-left in [0, extent) and sides in [0, max_size)."""
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * extent
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * max_size
    if integer:
        xy, wh = xy.floor(), wh.floor()
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def random_nms_inputs(
    n: int, seed: int, integer: bool, dtype: torch.dtype, tie_decimals: int | None = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping boxes with exact score ties, duplicate boxes and zero-area boxes."""
    gen = torch.Generator().manual_seed(seed)
    boxes = random_boxes(n, gen, extent=60.0, max_size=30.0, integer=integer)
    if n >= 8:
        # Exact duplicates of earlier boxes.
        dup = torch.randint(0, n, (n // 8,), generator=gen)
        target = torch.randint(0, n, (n // 8,), generator=gen)
        boxes[target] = boxes[dup]
        # Zero-area boxes (zero width, zero height, or a point); some of them repeated.
        zero = torch.randperm(n, generator=gen)[: max(2, n // 10)]
        boxes[zero[0::3], 2] = boxes[zero[0::3], 0]
        boxes[zero[1::3], 3] = boxes[zero[1::3], 1]
        boxes[zero[2::3], 2:] = boxes[zero[2::3], :2]
        boxes[zero[-1]] = boxes[zero[0]]
    scores = torch.rand(n, generator=gen, dtype=torch.float64)
    if tie_decimals is not None:
        scores = torch.round(scores, decimals=tie_decimals)
    return boxes.to(dtype), scores.to(dtype)


def clustered_boxes(
    n: int,
    gen: torch.Generator,
    clusters: int,
    extent: float = 400.0,
    integer: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Boxes jittered around ``clusters`` base boxes: IoUs spread over the whole (0, 1) range,
    so every threshold suppresses plenty and suppression chains occur."""
    base = random_boxes(clusters, gen, extent=extent, max_size=50.0)
    base[:, 2:] += 4.0
    b = base[torch.randint(0, clusters, (n,), generator=gen)]
    size = (b[:, 2:] - b[:, :2]).repeat(1, 2)
    out = b + (torch.rand(n, 4, generator=gen, dtype=torch.float64) - 0.5) * 0.5 * size
    out[:, 2:] = torch.maximum(out[:, 2:], out[:, :2])
    if integer:
        out = out.round()
    return out.to(dtype)


# ---------------------------------------------------------------------------------------------
# nms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_brute_force(device, threshold, integer, seed):
    # float64 makes the implementation's IoU arithmetic identical to the Python reference.
    boxes, scores = random_nms_inputs(200, seed, integer=integer, dtype=torch.float64)
    boxes, scores = boxes.to(device), scores.to(device)
    keep = nms(boxes, scores, threshold)
    assert keep.dtype == torch.int64
    assert keep.device.type == device
    expected = ref_nms(boxes, scores, threshold)
    assert keep.cpu().tolist() == expected
    # Something was actually suppressed, and the score ties were exercised.
    assert 0 < len(expected) < boxes.shape[0]
    assert scores.unique().numel() < scores.numel()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_nms_float32_integer_boxes(device, threshold):
    # Integer coordinates keep float32 areas exact; any IoU p/q that differs from the threshold
    # does so by far more than float32 rounding, so the comparison is unambiguous.
    boxes, scores = random_nms_inputs(300, 7, integer=True, dtype=torch.float32)
    keep = nms(boxes.to(device), scores.to(device), threshold)
    assert keep.cpu().tolist() == ref_nms(boxes, scores, threshold)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_nms_many_blocks_matches_brute_force(device, threshold):
    # ~2500 boxes crowded into a small area: several 1024-box blocks, suppression across
    # blocks, long suppression chains within a block, ties and duplicates.
    n = 2500
    gen = torch.Generator().manual_seed(1234)
    boxes = clustered_boxes(n, gen, clusters=300)
    boxes[::50] = boxes[1::50]  # duplicates
    boxes[3::97, 2] = boxes[3::97, 0]  # zero-width boxes
    scores = torch.round(torch.rand(n, generator=gen, dtype=torch.float64), decimals=2)
    keep = nms(boxes.to(device), scores.to(device), threshold)
    expected = ref_nms(boxes, scores, threshold)
    assert keep.cpu().tolist() == expected
    assert 300 < len(expected) < n - 500
    # Kept boxes from later blocks survive and earlier-block boxes suppress later ones.
    order = sorted(range(n), key=lambda i: (-scores[i].item(), i))
    rank = {i: r for r, i in enumerate(order)}
    kept_ranks = [rank[i] for i in expected]
    assert max(kept_ranks) >= 2048
    dropped_late = set(order[1024:]) - set(expected)
    assert len(dropped_late) > 300


@pytest.mark.parametrize("device", DEVICES)
def test_nms_many_blocks_float32(device):
    n = 2600
    gen = torch.Generator().manual_seed(99)
    boxes = clustered_boxes(n, gen, clusters=400, integer=True, dtype=torch.float32)
    scores = torch.round(torch.rand(n, generator=gen), decimals=1)
    keep = nms(boxes.to(device), scores.to(device), 0.5)
    assert keep.cpu().tolist() == ref_nms(boxes, scores, 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("descending_x", [False, True])
def test_nms_long_suppression_chain_across_blocks(device, descending_x):
    # Unit-shifted boxes [i, 0, i + 10, 10]: IoU of boxes k apart is (10 - k) / (10 + k), above
    # 0.5 for k <= 3. Greedy keeps every 4th box in score order: a suppression chain as long
    # as the input, running through every block.
    n = 2500
    x = torch.arange(n, dtype=torch.float64)
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], dim=1).double()
    scores = torch.linspace(1.0, 0.0, n, dtype=torch.float64)
    if descending_x:
        scores = scores.flip(0)
    keep = nms(boxes.to(device), scores.to(device), 0.5).cpu().tolist()
    expected = list(range(0, n, 4)) if not descending_x else list(range(n - 1, -1, -4))
    assert keep == expected
    assert keep == ref_nms(boxes, scores, 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_nms_empty_and_single(device):
    empty = nms(torch.zeros(0, 4, device=device), torch.zeros(0, device=device), 0.5)
    assert empty.shape == (0,)
    assert empty.dtype == torch.int64
    one = nms(
        torch.tensor([[1.0, 2.0, 3.0, 5.0]], device=device), torch.tensor([0.3], device=device), 0.5
    )
    assert one.cpu().tolist() == [0]
    # A single zero-area box is kept as well.
    point = nms(
        torch.tensor([[1.0, 1.0, 1.0, 1.0]], device=device), torch.tensor([0.9], device=device), 0.5
    )
    assert point.cpu().tolist() == [0]


@pytest.mark.parametrize("device", DEVICES)
def test_nms_threshold_is_strict(device):
    # IoU of these two boxes is exactly 2 / 4 = 0.5.
    boxes = torch.tensor([[0.0, 0.0, 4.0, 1.0], [0.0, 0.0, 2.0, 1.0]], device=device)
    scores = torch.tensor([0.9, 0.8], device=device)
    assert nms(boxes, scores, 0.5).cpu().tolist() == [0, 1]
    assert nms(boxes, scores, 0.49).cpu().tolist() == [0]
    # IoU is never above 1: threshold 1 keeps everything, even exact duplicates.
    dup = torch.tensor([[0.0, 0.0, 2.0, 2.0]] * 3, device=device)
    assert nms(dup, torch.tensor([0.1, 0.2, 0.3], device=device), 1.0).cpu().tolist() == [2, 1, 0]
    assert nms(dup, torch.tensor([0.1, 0.2, 0.3], device=device), 0.99).cpu().tolist() == [2]


@pytest.mark.parametrize("device", DEVICES)
def test_nms_ties_keep_lower_index(device):
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [50, 50, 60, 60]],
        device=device,
    )
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5], device=device)
    assert nms(boxes, scores, 0.5).cpu().tolist() == [0, 3]
    scores = torch.tensor([0.4, 0.5, 0.5, 0.6], device=device)
    assert nms(boxes, scores, 0.5).cpu().tolist() == [3, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_nms_chain_suppressed_box_does_not_suppress(device):
    # A suppresses B; B would suppress C, but B is gone so C survives.
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [4.0, 0.0, 14.0, 10.0], [8.0, 0.0, 18.0, 10.0]], device=device
    )
    scores = torch.tensor([0.9, 0.8, 0.7], device=device)
    assert nms(boxes, scores, 0.3).cpu().tolist() == [0, 2]


@pytest.mark.parametrize("device", DEVICES)
def test_nms_zero_area_boxes_never_suppress(device):
    boxes = torch.tensor(
        [
            [5.0, 5.0, 5.0, 5.0],  # point
            [5.0, 5.0, 5.0, 5.0],  # identical point: IoU is 0/0 = NaN
            [2.0, 3.0, 2.0, 9.0],  # zero-width segment
            [2.0, 3.0, 2.0, 9.0],  # identical segment
            [0.0, 0.0, 10.0, 10.0],  # contains them all
        ],
        device=device,
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5], device=device)
    for threshold in (0.0, 0.5):
        assert nms(boxes, scores, threshold).cpu().tolist() == [0, 1, 2, 3, 4]
    iou = box_iou(boxes, boxes)
    assert torch.isnan(iou[0, 1]) and torch.isnan(iou[2, 3])
    assert iou[0, 4] == 0 and iou[4, 2] == 0


# ---------------------------------------------------------------------------------------------
# batched_nms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_nms_matches_per_class_brute_force(device, threshold, seed):
    boxes, scores = random_nms_inputs(300, 100 + seed, integer=bool(seed), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idxs = torch.randint(0, 5, (300,), generator=gen)
    keep = batched_nms(boxes.to(device), scores.to(device), idxs.to(device), threshold)
    assert keep.dtype == torch.int64
    expected = ref_batched_nms(boxes, scores, idxs, threshold)
    assert keep.cpu().tolist() == expected
    # Class separation matters here: plain NMS keeps fewer boxes.
    assert len(ref_nms(boxes, scores, threshold)) < len(expected)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_nms_many_blocks(device):
    n = 2500
    gen = torch.Generator().manual_seed(5)
    boxes = clustered_boxes(n, gen, clusters=300)
    scores = torch.round(torch.rand(n, generator=gen, dtype=torch.float64), decimals=2)
    idxs = torch.randint(0, 3, (n,), generator=gen)
    keep = batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5)
    assert keep.cpu().tolist() == ref_batched_nms(boxes, scores, idxs, 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_nms_classes_do_not_interact(device):
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 4, device=device)
    scores = torch.tensor([0.1, 0.4, 0.3, 0.2], device=device)
    idxs = torch.tensor([0, 1, 0, 2], device=device)
    assert batched_nms(boxes, scores, idxs, 0.5).cpu().tolist() == [1, 2, 3]
    # Huge coordinates: no coordinate-offset trick can leak between classes.
    big = torch.tensor([[1e6, 1e6, 1e6 + 10, 1e6 + 10], [0.0, 0.0, 10.0, 10.0]], device=device)
    sc = torch.tensor([0.9, 0.8], device=device)
    assert batched_nms(big, sc, torch.tensor([0, 1], device=device), 0.5).cpu().tolist() == [0, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_batched_nms_empty(device):
    keep = batched_nms(
        torch.zeros(0, 4, device=device),
        torch.zeros(0, device=device),
        torch.zeros(0, dtype=torch.int64, device=device),
        0.5,
    )
    assert keep.shape == (0,)
    assert keep.dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# Comparison with torchvision, where it is available
# ---------------------------------------------------------------------------------------------


def _torchvision_ops(device: str):
    try:
        import torchvision.ops as tv_ops

        b = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device)
        tv_ops.nms(b, torch.ones(1, device=device), 0.5)
        tv_ops.batched_nms(
            b, torch.ones(1, device=device), torch.zeros(1, dtype=torch.int64, device=device), 0.5
        )
    except Exception as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"torchvision.ops.nms not usable on {device}: {exc!r}")
    return tv_ops


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# Integer coordinates and dyadic thresholds: torchvision's kernels round the threshold
# differently (the CPU kernel compares a float32 IoU with the double threshold, the CUDA kernel
# tests inter > float(threshold) * union), which only matters when an IoU equals a threshold
# such as 7/10 that is not exactly representable. With these inputs every kernel is exact.
@pytest.mark.parametrize("threshold", [0.25, 0.5, 0.75])
def test_nms_matches_torchvision(device, dtype, threshold):
    tv_ops = _torchvision_ops(device)
    n = 2500
    gen = torch.Generator().manual_seed(2024)
    boxes = clustered_boxes(n, gen, clusters=300, integer=True, dtype=dtype)
    # Distinct scores: torchvision's sort is not stable, so ties may be ordered differently.
    scores = (torch.randperm(n, generator=gen).to(dtype) + 1) / n
    idxs = torch.randint(0, 4, (n,), generator=gen)
    boxes, scores, idxs = boxes.to(device), scores.to(device), idxs.to(device)
    assert torch.equal(nms(boxes, scores, threshold), tv_ops.nms(boxes, scores, threshold))
    assert torch.equal(
        batched_nms(boxes, scores, idxs, threshold),
        tv_ops.batched_nms(boxes, scores, idxs, threshold),
    )


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def test_nms_rejects_bad_shapes():
    boxes = torch.rand(5, 4)
    scores = torch.rand(5)
    with pytest.raises(ValueError, match="boxes"):
        nms(torch.rand(5, 5), scores, 0.5)
    with pytest.raises(ValueError, match="boxes"):
        nms(torch.rand(20), scores, 0.5)
    with pytest.raises(ValueError, match="boxes"):
        nms(torch.rand(1, 5, 4), scores, 0.5)
    with pytest.raises(ValueError, match="scores"):
        nms(boxes, torch.rand(4), 0.5)
    with pytest.raises(ValueError, match="scores"):
        nms(boxes, torch.rand(5, 1), 0.5)
    with pytest.raises(ValueError, match="boxes"):
        batched_nms(torch.rand(5, 3), scores, torch.zeros(5, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="scores"):
        batched_nms(boxes, torch.rand(6), torch.zeros(5, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="idxs"):
        batched_nms(boxes, scores, torch.zeros(4, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="idxs"):
        batched_nms(boxes, scores, torch.zeros(5, 1, dtype=torch.int64), 0.5)


def test_box_utilities_reject_bad_shapes():
    with pytest.raises(ValueError, match="boxes1"):
        box_iou(torch.rand(3, 5), torch.rand(2, 4))
    with pytest.raises(ValueError, match="boxes2"):
        box_iou(torch.rand(3, 4), torch.rand(4))
    with pytest.raises(ValueError, match="boxes"):
        box_area(torch.rand(3, 2))
    with pytest.raises(ValueError, match="boxes"):
        remove_small_boxes(torch.rand(3), 1.0)
    with pytest.raises(ValueError, match="format"):
        box_convert(torch.rand(3, 4), "xyxy", "yxyx")
    with pytest.raises(ValueError, match="format"):
        box_convert(torch.rand(3, 4), "cxcy", "xyxy")


# ---------------------------------------------------------------------------------------------
# box_iou, box_area
# ---------------------------------------------------------------------------------------------


def test_box_area_values():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.5, 1.0, 2.0, 5.0], [4.0, 4.0, 4.0, 9.0]])
    assert box_area(boxes).tolist() == [6.0, 2.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
def test_box_iou_matches_brute_force(device):
    gen = torch.Generator().manual_seed(3)
    a = random_boxes(37, gen, extent=50.0, max_size=30.0)
    b = random_boxes(23, gen, extent=50.0, max_size=30.0)
    iou = box_iou(a.to(device), b.to(device)).cpu()
    assert iou.shape == (37, 23)
    expected = torch.tensor([[iou_py(p, q) for q in b.tolist()] for p in a.tolist()], dtype=a.dtype)
    torch.testing.assert_close(iou, expected, rtol=1e-12, atol=1e-12)
    assert (iou > 0).any() and (iou == 0).any()
    # Symmetry.
    torch.testing.assert_close(box_iou(b, a), iou.T, rtol=1e-12, atol=1e-12)


def test_box_iou_identity_and_known_values():
    gen = torch.Generator().manual_seed(4)
    boxes = random_boxes(50, gen) + torch.tensor([0.0, 0.0, 0.5, 0.5], dtype=torch.float64)
    self_iou = box_iou(boxes, boxes)
    torch.testing.assert_close(self_iou.diagonal(), torch.ones(50, dtype=torch.float64))
    assert (self_iou <= 1 + 1e-12).all() and (self_iou >= 0).all()
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor(
        [[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 4.0, 2.0], [5.0, 5.0, 6.0, 6.0], [0, 0, 1, 1]]
    )
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7, 0.0, 0.0, 0.25]]))
    assert box_iou(torch.zeros(0, 4), b).shape == (0, 4)
    assert box_iou(a, torch.zeros(0, 4)).shape == (1, 0)


# ---------------------------------------------------------------------------------------------
# box_convert
# ---------------------------------------------------------------------------------------------


def test_box_convert_known_values():
    xyxy = torch.tensor([[1.0, 2.0, 5.0, 10.0]])
    xywh = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    cxcywh = torch.tensor([[3.0, 6.0, 4.0, 8.0]])
    forms = {"xyxy": xyxy, "xywh": xywh, "cxcywh": cxcywh}
    for src, a in forms.items():
        for dst, b in forms.items():
            torch.testing.assert_close(box_convert(a, src, dst), b)


@pytest.mark.parametrize("fmt", ["xywh", "cxcywh"])
def test_box_convert_round_trip(fmt):
    gen = torch.Generator().manual_seed(8)
    boxes = random_boxes(64, gen).reshape(4, 16, 4)  # any leading shape
    there = box_convert(boxes, "xyxy", fmt)
    assert there.shape == boxes.shape
    torch.testing.assert_close(box_convert(there, fmt, "xyxy"), boxes, rtol=0, atol=1e-12)
    other = "xywh" if fmt == "cxcywh" else "cxcywh"
    via = box_convert(box_convert(there, fmt, other), other, "xyxy")
    torch.testing.assert_close(via, boxes, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# encode_deltas / decode_deltas
# ---------------------------------------------------------------------------------------------

MEANS = (0.1, -0.2, 0.05, -0.3)
STDS = (0.1, 0.2, 0.3, 0.4)


def test_encode_known_values():
    proposals = torch.tensor([[0.0, 0.0, 10.0, 20.0]], dtype=torch.float64)
    targets = torch.tensor([[2.0, 4.0, 22.0, 24.0]], dtype=torch.float64)
    # centres (5, 10) -> (12, 14); sizes (10, 20) -> (20, 20).
    raw = [0.7, 0.2, math.log(2.0), 0.0]
    expected = torch.tensor(
        [[(r - m) / s for r, m, s in zip(raw, MEANS, STDS, strict=True)]], dtype=torch.float64
    )
    got = encode_deltas(proposals, targets, MEANS, STDS)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        encode_deltas(proposals, targets), torch.tensor([raw], dtype=torch.float64)
    )
    torch.testing.assert_close(decode_deltas(proposals, got, MEANS, STDS), targets)


def test_encode_decode_round_trip():
    gen = torch.Generator().manual_seed(11)
    n = 200
    p_xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 100
    p_wh = 5 + torch.rand(n, 2, generator=gen, dtype=torch.float64) * 95
    g_xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 100
    g_wh = 5 + torch.rand(n, 2, generator=gen, dtype=torch.float64) * 95
    proposals = torch.cat([p_xy, p_xy + p_wh], 1)
    targets = torch.cat([g_xy, g_xy + g_wh], 1)
    deltas = encode_deltas(proposals, targets, MEANS, STDS)
    # Hand-written check of the encoding for every box.
    for p, g, d in zip(proposals.tolist(), targets.tolist(), deltas.tolist(), strict=True):
        pw, ph, gw, gh = p[2] - p[0], p[3] - p[1], g[2] - g[0], g[3] - g[1]
        raw = [
            ((g[0] + g[2]) / 2 - (p[0] + p[2]) / 2) / pw,
            ((g[1] + g[3]) / 2 - (p[1] + p[3]) / 2) / ph,
            math.log(gw / pw),
            math.log(gh / ph),
        ]
        for r, m, s, v in zip(raw, MEANS, STDS, d, strict=True):
            assert v == pytest.approx((r - m) / s, rel=1e-10, abs=1e-10)
    decoded = decode_deltas(proposals, deltas, MEANS, STDS)
    torch.testing.assert_close(decoded, targets, rtol=0, atol=1e-9)
    # float32 as well.
    decoded32 = decode_deltas(
        proposals.float(),
        encode_deltas(proposals.float(), targets.float(), MEANS, STDS),
        MEANS,
        STDS,
    )
    torch.testing.assert_close(decoded32, targets.float(), rtol=0, atol=1e-3)


def test_decode_clamps_log_scale_deltas():
    proposals = torch.tensor([[10.0, 20.0, 30.0, 60.0]] * 3, dtype=torch.float64)  # 20 x 40
    clip = math.log(1000.0 / 16)
    # Raw (normalised) deltas; denormalised dw = 0.2 * raw, dh = 0.4 * raw.
    stds = (1.0, 1.0, 0.2, 0.4)
    deltas = torch.tensor(
        [[0.0, 0.0, 50.0, -50.0], [0.0, 0.0, -1000.0, 1000.0], [0.0, 0.0, 5.0, 2.5]],
        dtype=torch.float64,
    )
    out = decode_deltas(proposals, deltas, stds=stds)
    w = out[:, 2] - out[:, 0]
    h = out[:, 3] - out[:, 1]
    # Denormalised (10, -20) and (-200, 400) exceed the clip; (1, 1) does not.
    f64 = torch.float64
    expected_w = torch.tensor([20 * math.exp(clip), 20 * math.exp(-clip), 20 * math.e], dtype=f64)
    expected_h = torch.tensor([40 * math.exp(-clip), 40 * math.exp(clip), 40 * math.e], dtype=f64)
    torch.testing.assert_close(w, expected_w, rtol=1e-12, atol=0)
    torch.testing.assert_close(h, expected_h, rtol=1e-12, atol=0)
    # Centres are unchanged with zero dx, dy.
    torch.testing.assert_close((out[:, 0] + out[:, 2]) / 2, torch.full((3,), 20.0).double())
    torch.testing.assert_close((out[:, 1] + out[:, 3]) / 2, torch.full((3,), 40.0).double())
    # A custom clip.
    out = decode_deltas(proposals[:1], deltas[:1], stds=stds, wh_ratio_clip=1.0)
    torch.testing.assert_close(out[0, 2] - out[0, 0], torch.tensor(20 * math.e, dtype=f64))
    torch.testing.assert_close(out[0, 3] - out[0, 1], torch.tensor(40 / math.e, dtype=f64))
    # dx, dy are not clamped.
    out = decode_deltas(proposals[:1], torch.tensor([[100.0, -100.0, 0.0, 0.0]]).double())
    torch.testing.assert_close(out, torch.tensor([[2010.0, -3980.0, 2030.0, -3940.0]]).double())


def test_decode_clips_to_max_shape():
    proposals = torch.tensor([[10.0, 5.0, 30.0, 25.0], [0.0, 0.0, 4.0, 4.0]])
    deltas = torch.tensor([[-2.0, 3.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    free = decode_deltas(proposals, deltas)
    clipped = decode_deltas(proposals, deltas, max_shape=(50, 12))  # (height, width)
    # Unclipped: centre (20 - 40, 15 + 60) = (-20, 75), w = 20 e^0.5, h = 20.
    hw = 10 * math.exp(0.5)
    torch.testing.assert_close(free[0], torch.tensor([-20 - hw, 65.0, -20 + hw, 85.0]))
    torch.testing.assert_close(clipped[0], torch.tensor([0.0, 50.0, 0.0, 50.0]))
    torch.testing.assert_close(clipped[1], torch.tensor([0.0, 0.0, 4.0, 4.0]))
    torch.testing.assert_close(clipped, free.clamp(min=0).minimum(torch.tensor([12.0, 50, 12, 50])))


# ---------------------------------------------------------------------------------------------
# clip_boxes_to_image, remove_small_boxes
# ---------------------------------------------------------------------------------------------


def test_clip_boxes_to_image():
    boxes = torch.tensor(
        [[-5.0, -3.0, 10.0, 8.0], [2.0, 3.0, 40.0, 90.0], [1.5, 2.5, 3.5, 4.5], [50, 60, 70, 80]]
    )
    out = clip_boxes_to_image(boxes, (20, 30))  # height 20, width 30
    expected = torch.tensor(
        [[0.0, 0.0, 10.0, 8.0], [2.0, 3.0, 30.0, 20.0], [1.5, 2.5, 3.5, 4.5], [30, 20, 30, 20]]
    )
    assert torch.equal(out, expected)
    # Any leading shape, input untouched.
    batched = clip_boxes_to_image(boxes.reshape(2, 2, 4), (20, 30))
    assert torch.equal(batched, expected.reshape(2, 2, 4))
    assert boxes[0, 0] == -5.0


def test_remove_small_boxes():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 2.0, 2.0],  # exactly min_size: kept
            [0.0, 0.0, 1.9, 5.0],  # narrow
            [0.0, 0.0, 5.0, 1.9],  # short
            [1.0, 1.0, 10.0, 10.0],
            [3.0, 3.0, 3.0, 3.0],  # empty
        ]
    )
    keep = remove_small_boxes(boxes, 2.0)
    assert keep.dtype == torch.int64
    assert keep.tolist() == [0, 3]
    assert remove_small_boxes(boxes, 0.0).tolist() == [0, 1, 2, 3, 4]
    assert remove_small_boxes(torch.zeros(0, 4), 1.0).tolist() == []
    gen = torch.Generator().manual_seed(12)
    rnd = random_boxes(100, gen, max_size=10.0)
    expected = [
        i for i, (x1, y1, x2, y2) in enumerate(rnd.tolist()) if x2 - x1 >= 4 and y2 - y1 >= 4
    ]
    assert remove_small_boxes(rnd, 4.0).tolist() == expected
