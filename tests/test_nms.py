"""NMS: both exact paths (sweep and blocked) against a plain-Python greedy loop, the choice
between them, and torchvision's behaviour on odd inputs (dtypes, errors, empty inputs).

The expected values for odd inputs are what torchvision 0.28's CPU kernel returns for the
same call (observed with it, written here as literals).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from instseg.ops import batched_nms, nms
from test_boxes import clustered_boxes, random_nms_inputs, ref_batched_nms, ref_nms

nms_module = importlib.import_module("instseg.ops.nms")


def log_uniform_boxes(n: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes 16-512 px wide and tall, centred anywhere on 1088x800 (the benchmark's case)."""
    g = torch.Generator().manual_seed(seed)
    size = torch.exp(
        torch.empty(n, 2, dtype=torch.float64).uniform_(math.log(16), math.log(512), generator=g)
    )
    centre = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([1088.0, 800.0])
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
    return boxes.to(dtype), torch.rand(n, generator=g, dtype=torch.float64).to(dtype)


def anchor_like_boxes(seed: int, stride: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Jittered anchors of one FPN level (3 aspect ratios, 8 strides wide) over 320x480:
    dense, similar boxes with long suppression chains, as the RPN gives NMS."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(
        torch.arange(0, 320, stride, dtype=torch.float64),
        torch.arange(0, 480, stride, dtype=torch.float64),
        indexing="ij",
    )
    centres = torch.stack([xs.flatten(), ys.flatten()], 1).repeat_interleave(3, 0)
    ratio = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64).repeat(centres.shape[0] // 3)
    half = 4 * stride * torch.stack([ratio.rsqrt(), ratio.sqrt()], 1)
    boxes = torch.cat([centres - half, centres + half], 1)
    boxes += torch.randn(boxes.shape, generator=g, dtype=torch.float64) * stride * 0.3
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2])
    return boxes, torch.rand(boxes.shape[0], generator=g, dtype=torch.float64)


@pytest.fixture(params=["sweep", "blocked"])
def path(request, monkeypatch):
    """Runs a test once with the sweep allowed and once with the blocked path forced."""
    if request.param == "blocked":
        monkeypatch.setattr(nms_module, "_SWEEP_PAIRS_PER_BOX", -1)
        monkeypatch.setattr(nms_module, "_SWEEP_MIN_PAIRS", -1)
    return request.param


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.3, 0.5, 0.7, 0.95])
@pytest.mark.parametrize("case", ["random", "log_uniform", "anchors", "clustered"])
def test_both_paths_match_brute_force(path, threshold, case):
    if case == "random":
        boxes, scores = random_nms_inputs(400, 3, integer=False, dtype=torch.float64)
    elif case == "log_uniform":
        boxes, scores = log_uniform_boxes(600, 4)
    elif case == "anchors":
        boxes, scores = anchor_like_boxes(5)
    else:
        gen = torch.Generator().manual_seed(6)
        boxes = clustered_boxes(600, gen, clusters=60)
        scores = torch.round(torch.rand(600, generator=gen, dtype=torch.float64), decimals=2)
    expected = ref_nms(boxes, scores, threshold)
    assert nms(boxes, scores, threshold).tolist() == expected
    groups = torch.arange(boxes.shape[0]) % 7
    keep = batched_nms(boxes, scores, groups, threshold)
    assert keep.tolist() == ref_batched_nms(boxes, scores, groups, threshold)


def test_anchor_like_boxes_suppress_in_long_chains():
    # The case above is only a test of the greedy order if suppression really chains.
    boxes, scores = anchor_like_boxes(5)
    kept = ref_nms(boxes, scores, 0.7)
    assert boxes.shape[0] // 8 < len(kept) < boxes.shape[0] // 2


def test_sweep_is_used_on_spread_boxes_and_blocked_on_crowded(monkeypatch):
    calls = []
    blocked = nms_module._blocked_keep
    monkeypatch.setattr(
        nms_module, "_blocked_keep", lambda *a: calls.append(a[0].shape[0]) or blocked(*a)
    )
    boxes, scores = log_uniform_boxes(3000, 8, dtype=torch.float32)
    nms(boxes, scores, 0.7)
    batched_nms(boxes, scores, torch.arange(3000) % 80, 0.5)
    assert calls == []
    # 3000 copies of one box: every window holds every box; the blocked path takes over
    # (per group for batched_nms) and keeps the first of each group.
    same = torch.tensor([[10.0, 10.0, 50.0, 60.0]]).repeat(3000, 1)
    assert nms(same, scores, 0.7).tolist() == [int(scores.argmax())]
    assert calls == [3000]
    groups = torch.arange(3000) % 2
    keep = batched_nms(same, scores, groups, 0.7)
    assert sorted(keep.tolist()) == sorted(
        int(torch.where(groups == g, scores, -1.0).argmax()) for g in (0, 1)
    )
    assert calls == [3000, 1500, 1500]


def test_long_chain_through_the_sweep():
    # Unit-shifted boxes: IoU of boxes k apart is (10 - k) / (10 + k), above 0.5 for k <= 3;
    # greedy keeps every 4th box, a chain as long as the input.
    n = 3000
    x = torch.arange(n, dtype=torch.float32)
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], 1)
    assert nms(boxes, torch.linspace(1, 0, n), 0.5).tolist() == list(range(0, n, 4))


# ---------------------------------------------------------------------------------------------
# torchvision's behaviour on odd inputs
# ---------------------------------------------------------------------------------------------

TWO_NEAR_ONE_FAR = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60.0]])
SCORES = torch.tensor([0.9, 0.8, 0.7])


def test_odd_thresholds_and_boxes_as_torchvision():
    assert nms(TWO_NEAR_ONE_FAR, SCORES, 0.5).tolist() == [0, 2]
    assert nms(TWO_NEAR_ONE_FAR, SCORES, torch.tensor(0.5)).tolist() == [0, 2]
    assert nms(TWO_NEAR_ONE_FAR, SCORES, 1).tolist() == [0, 1, 2]
    # A negative threshold: every IoU (0 included) is above it, the best box suppresses all.
    assert nms(TWO_NEAR_ONE_FAR, SCORES, -0.1).tolist() == [0]
    # A NaN coordinate makes every IoU with that box NaN, which suppresses nothing.
    nan_box = TWO_NEAR_ONE_FAR.clone()
    nan_box[0, 2] = math.nan
    assert nms(nan_box, SCORES, 0.5).tolist() == [0, 1, 2]
    # A NaN score sorts first.
    assert nms(TWO_NEAR_ONE_FAR, torch.tensor([math.nan, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    # Inverted boxes (x2 < x1): positive "area", no intersection, nothing suppressed.
    inverted = torch.tensor([[10, 10, 0, 0], [9, 9, 1, 1.0]])
    assert nms(inverted, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert nms(torch.zeros(2, 4), torch.tensor([0.9, 0.8]), 0.5).tolist() == [0, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_boxes_are_computed_in_float32(dtype):
    # 300x-scaled boxes have areas (up to 9e6) that overflow float16; in float32 they do not.
    boxes, scores = log_uniform_boxes(500, 9, dtype=torch.float32)
    boxes = boxes.to(dtype)
    expected = nms(boxes.float(), scores, 0.5)
    assert torch.equal(nms(boxes, scores.to(dtype), 0.5), nms(boxes, scores.to(dtype).float(), 0.5))
    assert torch.equal(nms(boxes, scores, 0.5), expected)
    assert len(expected) < 500
    idxs = torch.arange(500) % 3
    assert torch.equal(
        batched_nms(boxes, scores, idxs, 0.5), batched_nms(boxes.float(), scores, idxs, 0.5)
    )


def test_integer_boxes_and_mixed_score_dtype():
    # torchvision's CPU kernel rejects these (NotImplementedError / "same type"); ours
    # computes integer boxes exactly in float64 and orders by scores of any real dtype.
    boxes, scores = random_nms_inputs(300, 11, integer=True, dtype=torch.float64)
    expected = ref_nms(boxes, scores, 0.5)
    for dtype in (torch.int16, torch.int32, torch.int64):
        assert nms(boxes.to(dtype), scores, 0.5).tolist() == expected
    assert nms(boxes, scores.float(), 0.5).tolist() == ref_nms(boxes, scores.float(), 0.5)


def test_errors_are_value_and_runtime_errors_as_torchvision():
    boxes, scores = TWO_NEAR_ONE_FAR, SCORES
    cases = [
        (lambda: nms(boxes[:, :3], scores, 0.5), "boxes"),
        (lambda: nms(boxes, scores[:2], 0.5), "scores"),
        (lambda: nms(boxes, scores[None], 0.5), "scores"),
        (lambda: nms(boxes, scores, "high"), "iou_threshold"),
        (lambda: nms(boxes, scores, math.nan), "iou_threshold"),
        (lambda: batched_nms(boxes, scores, torch.tensor([0, 1]), 0.5), "idxs"),
        (lambda: batched_nms(boxes[:, :3], scores, torch.tensor([0, 1, 0]), 0.5), "boxes"),
        (lambda: batched_nms(boxes, scores, None, 0.5), "idxs"),
    ]
    for call, name in cases:
        with pytest.raises(RuntimeError, match=name) as info:
            call()
        assert isinstance(info.value, ValueError)


def test_batched_nms_empty_with_none_arguments():
    # torchvision returns early on empty boxes, whatever scores and idxs are.
    keep = batched_nms(torch.zeros(0, 4), None, None, 0.5)
    assert keep.dtype == torch.int64 and keep.shape == (0,)
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.tensor([0.0])[:0], 0.5).shape == (
        0,
    )
    # Float category ids are accepted, as by torchvision.
    assert batched_nms(TWO_NEAR_ONE_FAR, SCORES, torch.tensor([0.0, 1, 0]), 0.5).tolist() == [
        0,
        1,
        2,
    ]
