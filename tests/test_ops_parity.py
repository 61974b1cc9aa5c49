"""torchvision parity of ``instseg.ops`` (all public ops but NMS): dtypes, errors, empty inputs
and the argument forms torchvision accepts.

Every expectation is a literal: torchvision 0.28's documented behaviour or its observed output
for the same call (values hand-checked where small), so the file runs without torchvision.
Errors must be both our ``ValueError`` and the class torchvision raises for the same mistake.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from instseg.ops import (
    PrRoIPool2D,
    RoIAlign,
    RoIPool,
    box_area,
    box_convert,
    box_iou,
    clip_boxes_to_image,
    prroi_pool2d,
    remove_small_boxes,
    roi_align,
    roi_pool,
)
from instseg.ops._common import (
    ArgumentAssertionError,
    ArgumentAttributeError,
    ArgumentIndexError,
    ArgumentNotImplementedError,
    ArgumentRuntimeError,
    ArgumentTypeError,
)

# torchvision's own box fixtures (test/test_ops.py).
INT_BOXES = [[0, 0, 100, 100], [0, 0, 50, 50], [200, 200, 300, 300], [0, 0, 25, 25]]
INT_BOXES2 = [[0, 0, 100, 100], [0, 0, 50, 50], [200, 200, 300, 300]]
INT_IOU = [[1.0, 0.25, 0.0], [0.25, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0625, 0.25, 0.0]]
FLOAT_BOXES = [
    [285.3538, 185.5758, 1193.5110, 851.4551],
    [285.1472, 188.7374, 1192.4984, 851.0669],
    [279.2440, 197.9812, 1189.4746, 849.2019],
]
FLOAT_IOU = [[1.0, 0.9933, 0.9673], [0.9933, 1.0, 0.9737], [0.9673, 0.9737, 1.0]]

# A 2-image map whose value at (y, x) is 36 * b + 6 * y + x: bilinear sampling is exact.
X = torch.arange(72, dtype=torch.float32).reshape(2, 1, 6, 6)
ROIS = torch.tensor([[0, 0, 0, 3, 3], [1, 1, 1, 4, 5.0]])
# roi_align(X, ROIS, 2, sampling_ratio=2): bin centres of RoI 0 average to y, x in {0.75, 2.25}.
ALIGN_2x2 = [[5.25, 6.75], [14.25, 15.75]]
# roi_pool(X, ROIS, 2): RoI 0 covers pixels 0..3, bins are 2x2 pixels, maxima at odd (y, x).
POOL_2x2 = [[7.0, 9.0], [19.0, 21.0]]


def assert_error(call, *classes: type[BaseException], match: str | None = None) -> None:
    """``call()`` raises an error that is an instance of ``ValueError`` and every class."""
    with pytest.raises(ValueError, match=match) as info:
        call()
    for cls in classes:
        assert isinstance(info.value, cls), (type(info.value).__mro__, cls)


# --------------------------------------------------------------------------------------------
# Error classes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (ArgumentAssertionError, (ValueError, AssertionError)),
        (ArgumentRuntimeError, (ValueError, RuntimeError)),
        (ArgumentNotImplementedError, (ValueError, NotImplementedError, RuntimeError)),
        (ArgumentIndexError, (ValueError, IndexError)),
        (ArgumentTypeError, (ValueError, TypeError)),
        (ArgumentAttributeError, (ValueError, AttributeError)),
    ],
)
def test_error_classes_are_value_errors_and_torchvision_classes(cls, bases):
    assert all(issubclass(cls, base) for base in bases)


def test_signatures_match_torchvision():
    expected = {
        box_area: "(boxes, fmt='xyxy')",
        box_iou: "(boxes1, boxes2, fmt='xyxy')",
        box_convert: "(boxes, in_fmt, out_fmt)",
        clip_boxes_to_image: "(boxes, size)",
        remove_small_boxes: "(boxes, min_size)",
        roi_align: "(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, "
        "aligned=False)",
        roi_pool: "(input, boxes, output_size, spatial_scale=1.0)",
        RoIAlign: "(output_size, spatial_scale, sampling_ratio, aligned=False)",
        RoIPool: "(output_size, spatial_scale)",
    }
    for fn, text in expected.items():
        params = inspect.signature(fn).parameters.values()
        got = ", ".join(
            p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params
        )
        assert f"({got})" == text, fn


# --------------------------------------------------------------------------------------------
# box_area / box_iou: computed in the upcast dtype
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.bool])
def test_box_area_small_ints_upcast_to_int32(dtype):
    boxes = torch.tensor([[0, 0, 100, 100], [0, 0, 0, 0]]).to(dtype)
    area = box_area(boxes)
    assert area.dtype == torch.int32
    expected = [1, 0] if dtype == torch.bool else [10000, 0]  # True - False = 1
    assert area.tolist() == expected


def test_box_area_int64_stays_int64():
    area = box_area(torch.tensor([[0, 0, 100, 100]]))
    assert area.dtype == torch.int64 and area.tolist() == [10000]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_area_low_precision_floats_in_float32(dtype):
    # 300 * 300 = 90000 overflows float16 (max 65504).
    area = box_area(torch.tensor([[0, 0, 300, 300], [2, 4, 3, 6]], dtype=dtype))
    assert area.dtype == torch.float32
    assert area.tolist() == [90000.0, 2.0]


def test_box_area_float16_torchvision_fixture():
    boxes = torch.tensor(
        [[2.825, 1.8625, 3.90, 4.85], [2.825, 4.875, 19.20, 5.10], [2.925, 1.80, 8.90, 4.90]],
        dtype=torch.float16,
    )
    expected = torch.tensor([3.2170, 3.7108, 18.5071])
    torch.testing.assert_close(box_area(boxes), expected, rtol=0, atol=0.01)


def test_box_area_formats_and_shapes():
    assert box_area(torch.tensor([[1.0, 2, 3, 4]]), fmt="xywh").tolist() == [12.0]
    assert box_area(torch.tensor([[1.0, 2, 3, 4]]), fmt="cxcywh").tolist() == [12.0]
    # Leading batch dimensions, a single box, and extra columns (torchvision reads 0-3).
    assert box_area(torch.ones(2, 3, 4)).shape == (2, 3)
    single = box_area(torch.tensor([0.0, 0, 2, 3]))
    assert single.shape == () and single.item() == 6.0
    assert box_area(torch.tensor([[0.0, 0, 2, 3, 0.9]])).tolist() == [6.0]


def test_box_area_empty():
    area = box_area(torch.zeros(0, 4))
    assert area.shape == (0,) and area.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64])
def test_box_iou_int_boxes_give_float32(dtype):
    iou = box_iou(torch.tensor(INT_BOXES, dtype=dtype), torch.tensor(INT_BOXES2, dtype=dtype))
    assert iou.dtype == torch.float32
    torch.testing.assert_close(iou, torch.tensor(INT_IOU), rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_iou_low_precision_no_overflow(dtype):
    # The areas (~600000) overflow float16: computed in float16 they give inf / inf = NaN.
    boxes = torch.tensor(FLOAT_BOXES, dtype=dtype)
    iou = box_iou(boxes, boxes)
    assert iou.dtype == torch.float32
    # torchvision's tolerance for float16; bfloat16 rounds these corners by up to 4 pixels.
    atol = 0.002 if dtype == torch.float16 else 0.005
    torch.testing.assert_close(iou, torch.tensor(FLOAT_IOU), rtol=0, atol=atol)
    # Ours, not torchvision's: corners are upcast before subtracting, so a box's IoU with
    # itself is exactly 1 (torchvision subtracts them in float16 and gets 1.0009).
    assert iou.diagonal().tolist() == [1.0, 1.0, 1.0]
    small = box_iou(
        torch.tensor([[0, 0, 300, 300]], dtype=dtype),
        torch.tensor([[100, 100, 400, 400]], dtype=dtype),
    )
    torch.testing.assert_close(small, torch.tensor([[2 / 7]]))


def test_box_iou_dtype_promotion_and_nan():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3]])
    assert box_iou(a, b.double()).dtype == torch.float64
    assert box_iou(a.long(), b).dtype == torch.float32
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7]]))
    # Two zero-area boxes: 0 / 0.
    assert math.isnan(box_iou(torch.zeros(1, 4), torch.zeros(1, 4)).item())
    assert math.isnan(box_iou(torch.zeros(1, 4).long(), torch.zeros(1, 4).long()).item())


def test_box_iou_formats_and_batches():
    a = torch.tensor([[0.0, 0, 4, 4]])
    b = torch.tensor([[2.0, 2, 4, 4]])
    torch.testing.assert_close(box_iou(a, b, fmt="xywh"), torch.tensor([[1 / 7]]))
    ca = torch.tensor([[2, 2, 4, 4]])
    cb = torch.tensor([[4, 4, 4, 4]])
    torch.testing.assert_close(box_iou(ca, cb, fmt="cxcywh"), torch.tensor([[1 / 7]]))
    assert box_iou(torch.rand(2, 3, 4), torch.rand(2, 5, 4)).shape == (2, 3, 5)
    assert box_iou(torch.rand(2, 3, 4), torch.rand(5, 4)).shape == (2, 3, 5)
    assert box_iou(torch.rand(4), torch.rand(2, 4)).shape == (1, 2)


def test_box_iou_empty():
    for n, m in [(0, 3), (3, 0), (0, 0)]:
        iou = box_iou(torch.rand(n, 4), torch.rand(m, 4))
        assert iou.shape == (n, m) and iou.dtype == torch.float32


def test_unsigned_boxes_do_not_wrap():
    # Ours, not torchvision's: torchvision subtracts uint8 corners before upcasting, so a
    # negative width wraps around (IoU -1.003 for these disjoint boxes, inverted boxes kept).
    a = torch.tensor([[0, 0, 10, 10]], dtype=torch.uint8)
    b = torch.tensor([[20, 20, 30, 30]], dtype=torch.uint8)
    assert box_iou(a, b).tolist() == [[0.0]]
    inverted = torch.tensor([[5, 5, 0, 0], [0, 0, 5, 5]], dtype=torch.uint8)
    assert remove_small_boxes(inverted, 1).tolist() == [1]
    assert box_area(inverted).tolist() == [25, 25]  # as torchvision: upcast, then subtract


def test_box_area_iou_errors():
    assert_error(lambda: box_area(torch.rand(3, 2)), IndexError, match="boxes")
    assert_error(lambda: box_area(torch.tensor(1.0)), IndexError, match="boxes")
    assert_error(lambda: box_area([[0, 0, 1, 1]]), AttributeError, match="boxes")
    assert_error(lambda: box_area(torch.rand(3, 4), fmt="foo"), match="fmt")
    assert_error(lambda: box_iou(torch.rand(3, 5), torch.rand(2, 5)), RuntimeError, match="boxes1")
    assert_error(lambda: box_iou(torch.rand(3, 4), torch.rand(2, 6)), RuntimeError, match="boxes2")
    assert_error(lambda: box_iou(torch.rand(3, 2), torch.rand(2, 4)), IndexError, match="boxes1")
    assert_error(lambda: box_iou(torch.rand(4), torch.rand(4)), IndexError, match="boxes2")
    assert_error(lambda: box_iou([[0, 0, 1, 1]], torch.rand(2, 4)), AttributeError, match="boxes1")
    assert_error(
        lambda: box_iou(torch.rand(2, 3, 4), torch.rand(3, 5, 4)), RuntimeError, match="broadcast"
    )
    assert_error(lambda: box_iou(torch.rand(1, 4), torch.rand(1, 4), fmt="foo"), match="fmt")
    bools = torch.ones(2, 4, dtype=torch.bool)
    assert_error(lambda: box_iou(bools, bools), RuntimeError, match="bool")


# --------------------------------------------------------------------------------------------
# box_convert, clip_boxes_to_image, remove_small_boxes
# --------------------------------------------------------------------------------------------


def test_box_convert_torchvision_fixture():
    xyxy = torch.tensor([[0, 0, 100, 100], [0, 0, 0, 0], [10, 15, 30, 35], [23, 35, 93, 95.0]])
    xywh = torch.tensor([[0, 0, 100, 100], [0, 0, 0, 0], [10, 15, 20, 20], [23, 35, 70, 60.0]])
    cxcywh = torch.tensor([[50, 50, 100, 100], [0, 0, 0, 0], [20, 25, 20, 20], [58, 65, 70, 60.0]])
    forms = {"xyxy": xyxy, "xywh": xywh, "cxcywh": cxcywh}
    for src, a in forms.items():
        for dst, b in forms.items():
            torch.testing.assert_close(box_convert(a, src, dst), b, rtol=0, atol=0)


def test_box_convert_dtypes():
    ints = torch.tensor([[0, 0, 10, 20]])
    assert box_convert(ints, "xyxy", "xywh").dtype == torch.int64
    assert box_convert(ints, "xywh", "xyxy").dtype == torch.int64
    assert box_convert(ints, "xyxy", "cxcywh").dtype == torch.float32  # the halving
    assert box_convert(ints, "cxcywh", "xyxy").tolist() == [[-5.0, -10.0, 5.0, 10.0]]
    half = torch.tensor([[0, 0, 10, 20]], dtype=torch.float16)
    for dst in ("xywh", "cxcywh"):
        assert box_convert(half, "xyxy", dst).dtype == torch.float16
    same = box_convert(ints, "cxcywh", "cxcywh")  # a copy, no conversion
    assert same.dtype == torch.int64 and same.tolist() == ints.tolist()
    assert same.data_ptr() != ints.data_ptr()


def test_box_convert_shapes_and_empty():
    assert box_convert(torch.zeros(0, 4), "xyxy", "cxcywh").shape == (0, 4)
    assert box_convert(torch.tensor([0.0, 0, 4, 2]), "xyxy", "cxcywh").tolist() == [2, 1, 4, 2]
    assert box_convert(torch.zeros(2, 3, 4), "xywh", "xyxy").shape == (2, 3, 4)
    # The same format copies whatever it gets.
    assert box_convert(torch.zeros(3, 5), "xyxy", "xyxy").shape == (3, 5)


def test_box_convert_rotated():
    # cx, cy, w, h = 2, 1, 4, 2 rotated by 30 degrees counter-clockwise.
    c, s = math.cos(math.pi / 6), 0.5
    x1, y1 = 2 - 2 * c - 1 * s, 1 - 1 * c + 2 * s
    x2, y2 = x1 + 4 * c, y1 - 4 * s
    x3, y3 = x2 + 2 * s, y2 + 2 * c
    x4, y4 = x1 + 2 * s, y1 + 2 * c
    corners = box_convert(torch.tensor([[2.0, 1, 4, 2, 30]]), "cxcywhr", "xyxyxyxy")
    torch.testing.assert_close(corners, torch.tensor([[x1, y1, x2, y2, x3, y3, x4, y4]]))
    back = box_convert(corners, "xyxyxyxy", "cxcywhr")
    torch.testing.assert_close(back, torch.tensor([[2.0, 1, 4, 2, 30]]), rtol=0, atol=1e-4)
    ints = box_convert(torch.tensor([[0, 0, 4, 0, 4, 2, 0, 2]]), "xyxyxyxy", "cxcywhr")
    assert ints.dtype == torch.int64 and ints.tolist() == [[2, 1, 4, 2, 0]]
    xywhr = box_convert(torch.tensor([[0.0, 0, 4, 2, 0]]), "cxcywhr", "xywhr")
    assert xywhr.tolist() == [[-2.0, -1.0, 4.0, 2.0, 0.0]]


def test_box_convert_errors():
    assert_error(lambda: box_convert(torch.rand(3, 4), "xyxy", "yxyx"), match="format")
    assert_error(lambda: box_convert(torch.rand(3, 4), "xywhr", "xyxy"), NotImplementedError)
    assert_error(lambda: box_convert(torch.rand(3, 5), "xyxy", "cxcywh"), match=r"\[\.\.\., 4\]")
    assert_error(lambda: box_convert(torch.rand(3, 4), "xywhr", "cxcywhr"), match="5")
    assert_error(lambda: box_convert(torch.tensor(1.0), "xyxy", "xywh"), IndexError)
    assert_error(lambda: box_convert([[0.0, 0, 1, 1]], "xyxy", "xywh"), AttributeError)


def test_clip_boxes_to_image_dtypes_and_shapes():
    boxes = torch.tensor([[-1, 2, 30, 4]])
    assert clip_boxes_to_image(boxes, (3, 10)).tolist() == [[0, 2, 10, 3]]
    assert clip_boxes_to_image(boxes, (3, 10)).dtype == torch.int64
    as_float = clip_boxes_to_image(boxes, (3.5, 10.5))  # torch's promotion
    assert as_float.dtype == torch.float32 and as_float.tolist() == [[0.0, 2.0, 10.5, 3.5]]
    half = clip_boxes_to_image(boxes.half(), (3, 10))
    assert half.dtype == torch.float16 and half.tolist() == [[0.0, 2.0, 10.0, 3.0]]
    u8 = clip_boxes_to_image(torch.tensor([[1, 2, 30, 4]], dtype=torch.uint8), (3, 10))
    assert u8.dtype == torch.uint8 and u8.tolist() == [[1, 2, 10, 3]]
    assert clip_boxes_to_image(torch.tensor([-1.0, 2, 30, 4]), (3, 10)).tolist() == [0, 2, 10, 3]
    assert clip_boxes_to_image(
        torch.tensor([[-1.0, 2, 30, 4]]), torch.tensor([3, 10])
    ).tolist() == [[0, 2, 10, 3]]
    points = torch.tensor([[-1.0, 5, 9, 9, 1, 1, 2, 2]])  # xyxyxyxy corners clip too
    assert clip_boxes_to_image(points, (3, 4)).tolist() == [[0, 3, 4, 3, 1, 1, 2, 2]]
    assert clip_boxes_to_image(torch.zeros(0, 4), (3, 3)).shape == (0, 4)
    assert clip_boxes_to_image(torch.zeros(2, 5, 4), (3, 3)).shape == (2, 5, 4)


def test_clip_boxes_to_image_errors():
    assert_error(lambda: clip_boxes_to_image(torch.rand(3, 5), (3, 3)), RuntimeError)
    assert_error(lambda: clip_boxes_to_image(torch.tensor(1.0), (3, 3)), IndexError)
    assert_error(lambda: clip_boxes_to_image(torch.rand(3, 4), 3), TypeError, match="size")
    assert_error(lambda: clip_boxes_to_image(torch.rand(3, 4), None), TypeError, match="size")
    assert_error(lambda: clip_boxes_to_image(torch.rand(3, 4), (3, 4, 5)), match="size")
    assert_error(lambda: clip_boxes_to_image([[1.0, 2, 3, 4]], (3, 3)), AttributeError)


def test_remove_small_boxes_dtypes_and_shapes():
    boxes = torch.tensor([[0, 0, 10, 20], [5, 5, 15, 15]])
    for dtype in (torch.int8, torch.int64, torch.float16, torch.bfloat16, torch.float64):
        keep = remove_small_boxes(boxes.to(dtype), 10)
        assert keep.dtype == torch.int64 and keep.tolist() == [0, 1]
        assert remove_small_boxes(boxes.to(dtype), 10.5).tolist() == []
    assert remove_small_boxes(boxes, torch.tensor(10.0)).tolist() == [0, 1]
    empty = remove_small_boxes(torch.zeros(0, 4), 1.0)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    assert remove_small_boxes(torch.zeros(0, 4, dtype=torch.int64), 1).shape == (0,)
    assert remove_small_boxes(torch.tensor([0.0, 0, 4, 2]), 1).tolist() == [0]
    assert remove_small_boxes(torch.tensor([[0.0, 0, 4, 2, 0.3]]), 1).tolist() == [0]
    # Batched: indices along the first dimension, one per kept box.
    assert remove_small_boxes(torch.ones(2, 3, 4), -1).tolist() == [0, 0, 0, 1, 1, 1]


def test_remove_small_boxes_errors():
    assert_error(lambda: remove_small_boxes(torch.rand(3, 3), 1.0), IndexError, match="boxes")
    assert_error(lambda: remove_small_boxes([[0, 0, 1, 1]], 1.0), TypeError, match="boxes")
    assert_error(lambda: remove_small_boxes(torch.rand(3, 4), None), TypeError, match="min_size")
    assert_error(lambda: remove_small_boxes(torch.rand(3, 4), "a"), TypeError, match="min_size")


# --------------------------------------------------------------------------------------------
# roi_align / roi_pool: dtypes
# --------------------------------------------------------------------------------------------

OPS = {
    "roi_align": lambda x, b, size=2, **kw: roi_align(x, b, size, sampling_ratio=2, **kw),
    "roi_pool": lambda x, b, size=2, **kw: roi_pool(x, b, size, **kw),
}
EXPECTED = {"roi_align": ALIGN_2x2, "roi_pool": POOL_2x2}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_roi_ops_output_in_input_dtype(op, dtype):
    # torchvision's CPU kernels have no bfloat16 (NotImplementedError); ours computes it in
    # float32 like float16, as the README promises.
    out = OPS[op](X.to(dtype), ROIS.to(dtype))
    assert out.dtype == dtype and out.shape == (2, 1, 2, 2)
    assert out[0, 0].tolist() == EXPECTED[op]  # exact in every dtype
    listed = OPS[op](X.to(dtype), [ROIS[:1, 1:].to(dtype), ROIS[1:, 1:].to(dtype)])
    assert torch.equal(listed, out)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_roi_align_mixed_dtypes_under_autocast(amp):
    # torchvision's autocast wrapper casts both to float32 and returns the input dtype.
    with torch.autocast("cpu", dtype=amp):
        for x_dtype, rois_dtype in [
            (torch.float32, amp),
            (amp, torch.float32),
            (torch.float16, torch.bfloat16),
        ]:
            out = roi_align(X.to(x_dtype), ROIS.to(rois_dtype), 2, sampling_ratio=2)
            assert out.dtype == x_dtype and out[0, 0].tolist() == ALIGN_2x2


@pytest.mark.parametrize("op", OPS)
def test_roi_ops_dtype_errors(op):
    call = OPS[op]
    for rois_dtype in (torch.int64, torch.int32):  # torchvision: input/rois type mismatch
        assert_error(lambda d=rois_dtype: call(X, ROIS.to(d)), RuntimeError, match="floating point")
    assert_error(lambda: call(X, ROIS.double()), RuntimeError, match="dtype")
    assert_error(lambda: call(X.double(), ROIS), RuntimeError, match="dtype")
    assert_error(lambda: call(X, ROIS.half()), RuntimeError, match="dtype")
    # (float32 RoIs with float16/bfloat16 input are accepted, as under autocast.)
    assert_error(lambda: call(X.half(), ROIS.bfloat16()), RuntimeError, match="dtype")
    assert_error(lambda: call(X.long(), ROIS.long()), NotImplementedError, match="floating point")
    assert_error(lambda: call(X, [ROIS[:1, 1:], ROIS[1:, 1:].double()]), RuntimeError)
    # torchvision's CUDA kernels TORCH_CHECK the device; ours checks it on every device.
    assert_error(lambda: call(X, ROIS.to("meta")), RuntimeError, match="feature map is on")


# --------------------------------------------------------------------------------------------
# roi_align / roi_pool: empty inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_roi_ops_no_rois(op, dtype):
    x = X.to(dtype).clone().requires_grad_(True)  # X itself is float32
    for boxes in (
        torch.zeros(0, 5, dtype=dtype),
        [torch.zeros(0, 4, dtype=dtype), torch.zeros(0, 4, dtype=dtype)],
        [torch.zeros(0, 4, dtype=dtype)],
    ):
        out = OPS[op](x, boxes, (3, 4))
        assert out.shape == (0, 1, 3, 4) and out.dtype == dtype
        out.sum().backward()  # still part of the graph, as torchvision's output
    mixed = OPS[op](X, [torch.zeros(0, 4), ROIS[1:, 1:]])
    assert mixed.shape == (1, 1, 2, 2)
    assert torch.equal(mixed, OPS[op](X, ROIS[1:]))


@pytest.mark.parametrize("op", OPS)
def test_roi_ops_empty_maps(op):
    assert OPS[op](X[:0], torch.zeros(0, 5)).shape == (0, 1, 2, 2)
    no_channels = OPS[op](X[:, :0], ROIS)
    assert no_channels.shape == (2, 0, 2, 2) and no_channels.dtype == torch.float32
    for empty in (X[:, :, :0], X[:, :, :, :0]):  # sampling outside the map reads 0
        assert OPS[op](empty, ROIS).tolist() == torch.zeros(2, 1, 2, 2).tolist()


# --------------------------------------------------------------------------------------------
# roi_align / roi_pool: argument forms torchvision accepts
# --------------------------------------------------------------------------------------------


def test_roi_align_accepts_torchvision_argument_forms():
    ref = roi_align(X, ROIS, (2, 2), 1.0, 2, False)
    list_boxes = [ROIS[:1, 1:], ROIS[1:, 1:]]
    same = [
        roi_align(X, list_boxes, 2, 1.0, 2),
        roi_align(X, tuple(list_boxes), 2, 1.0, 2),
        roi_align(X, ROIS, [2, 2], 1, 2),
        roi_align(X, ROIS, np.int64(2), np.float32(1.0), np.int64(2)),
        roi_align(X, ROIS, 2, torch.tensor(1.0), 2, None),
        roi_align(X, ROIS, torch.tensor([2, 2]), torch.tensor([1.0]), torch.tensor(2), np.False_),
        roi_align(X, ROIS, (torch.tensor(2), 2), 1.0, 2, 0),
        roi_align(input=X, boxes=ROIS, output_size=2, spatial_scale=1.0, sampling_ratio=2),
        roi_align(X.to(memory_format=torch.channels_last), ROIS, 2, 1.0, 2),
        RoIAlign(2, 1.0, 2)(X, ROIS),
        RoIAlign(output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2)(X, list_boxes),
    ]
    for out in same:
        assert torch.equal(out, ref)
    assert roi_align(X, ROIS, True, 1.0, 2).shape == (2, 1, 1, 1)  # bool is an int
    assert roi_align(X, ROIS, (2, 3), 1.0, 2).shape == (2, 1, 2, 3)
    for ratio in (0, -5, True):
        assert roi_align(X, ROIS, 2, 1.0, ratio).shape == (2, 1, 2, 2)
    aligned = roi_align(X, ROIS, 2, 1.0, 2, 1)
    assert torch.equal(aligned, roi_align(X, ROIS, 2, 1.0, 2, True))
    half_scale = roi_align(X, ROIS, 2, torch.tensor(0.5), 2)
    assert torch.equal(half_scale, roi_align(X, ROIS, 2, 0.5, 2))
    # torchvision's jit test: per-image lists of (5, 4) boxes give 10 RoIs.
    boxes = torch.tensor([[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9], [1, 0, 0, 9, 9.0]]).t()
    assert RoIAlign([3, 3], 1.0, -1)(X, [boxes, boxes]).shape == (10, 1, 3, 3)


def test_roi_pool_accepts_torchvision_argument_forms():
    ref = roi_pool(X, ROIS, (2, 2), 1.0)
    list_boxes = [ROIS[:1, 1:], ROIS[1:, 1:]]
    same = [
        roi_pool(X, list_boxes, 2),
        roi_pool(X, tuple(list_boxes), [2, 2], 1),
        roi_pool(X, ROIS, np.int64(2), torch.tensor(1.0)),
        roi_pool(input=X, boxes=ROIS, output_size=2, spatial_scale=1.0),
        RoIPool(2, 1.0)(X, ROIS),
        RoIPool(output_size=[2, 2], spatial_scale=1.0)(X, list_boxes),
    ]
    for out in same:
        assert torch.equal(out, ref)
    assert roi_pool(X, ROIS, (2, 3)).shape == (2, 1, 2, 3)


def test_module_attributes_and_repr_as_torchvision():
    assert repr(RoIAlign(2, 1.0, 2)) == (
        "RoIAlign(output_size=2, spatial_scale=1.0, sampling_ratio=2, aligned=False)"
    )
    assert repr(RoIAlign([2, 3], 0.5, -1, True)) == (
        "RoIAlign(output_size=[2, 3], spatial_scale=0.5, sampling_ratio=-1, aligned=True)"
    )
    assert repr(RoIPool((2, 3), 0.5)) == "RoIPool(output_size=(2, 3), spatial_scale=0.5)"
    module = RoIPool(7, 0.25)
    assert (module.output_size, module.spatial_scale) == (7, 0.25)


# --------------------------------------------------------------------------------------------
# roi_align / roi_pool: errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_roi_ops_box_shape_errors(op):
    call = OPS[op]
    # torch._assert in torchvision's check_roi_boxes_shape.
    assert_error(lambda: call(X, ROIS[:, 1:]), AssertionError, match=r"\[K, 5\]")
    assert_error(lambda: call(X, torch.cat([ROIS, ROIS[:, :1]], 1)), AssertionError)
    assert_error(lambda: call(X, [ROIS[:1]]), AssertionError, match=r"Tensor\[L, 4\]")
    assert_error(lambda: call(X, [ROIS[:1, :3]]), AssertionError, match=r"Tensor\[L, 4\]")
    assert_error(lambda: call(X, ROIS.numpy()), AssertionError)
    assert_error(lambda: call(X, None), AssertionError)
    # boxes.size(1) of a tensor without that dimension.
    assert_error(lambda: call(X, ROIS[0]), IndexError, match=r"\[K, 5\]")
    assert_error(lambda: call(X, torch.tensor(1.0)), IndexError)
    assert_error(lambda: call(X, [ROIS[0, 1:]]), IndexError, match=r"Tensor\[L, 4\]")
    assert_error(lambda: call(X, [[0.0, 0, 3, 3]]), AttributeError, match=r"boxes\[0\]")


@pytest.mark.parametrize("op", OPS)
def test_roi_ops_input_and_size_errors(op):
    call = OPS[op]
    assert_error(lambda: call(X[0], ROIS), IndexError, match=r"\[B, C, H, W\]")
    assert_error(lambda: call(X[0, 0], ROIS), IndexError, match=r"\[B, C, H, W\]")
    # The operator schema rejects sizes that are not ints (or negative).
    for size in (2.0, None, (2.0, 2), "22"):
        assert_error(lambda s=size: call(X, ROIS, s), RuntimeError, match="output_size")
    assert_error(lambda: call(X, ROIS, -1), RuntimeError, match="output_size")
    # _pair passes sequences through and the op reads output_size[1].
    for size in ((2,), "2"):
        assert_error(lambda s=size: call(X, ROIS, s), IndexError, match="output_size")
    assert_error(lambda: call(X, ROIS, torch.tensor(2)), TypeError, match="output_size")
    assert_error(lambda: call(X, ROIS, spatial_scale="a"), RuntimeError, match="spatial_scale")


def test_roi_ops_non_tensor_input():
    # roi_align looks up input.is_quantized; roi_pool goes straight to the operator schema.
    assert_error(lambda: roi_align(X.numpy(), ROIS, 2), AttributeError, match="input")
    assert_error(lambda: roi_pool(X.numpy(), ROIS, 2), RuntimeError, match="input")


def test_roi_align_scalar_argument_errors():
    for ratio in (2.0, None, "2"):
        assert_error(lambda r=ratio: roi_align(X, ROIS, 2, 1.0, r), RuntimeError, match="sampling")
    assert_error(lambda: roi_align(X, ROIS, 2, 1.0, 2, "yes"), RuntimeError, match="aligned")


# --------------------------------------------------------------------------------------------
# prroi_pool2d: argument checks (official Precise RoI Pooling API)
# --------------------------------------------------------------------------------------------


def test_prroi_pool_argument_checks():
    rois = ROIS.clone()
    # The official code asserts float inputs.
    assert_error(lambda: prroi_pool2d(X.long(), rois, 2, 2, 1.0), AssertionError, match="floating")
    assert_error(lambda: prroi_pool2d(X, rois.long(), 2, 2, 1.0), AssertionError, match="floating")
    assert_error(lambda: prroi_pool2d(X, rois[:, 1:], 2, 2, 1.0), AssertionError, match=r"\[K, 5\]")
    assert_error(lambda: PrRoIPool2D(0, 2, 1.0), match="positive")
    assert prroi_pool2d(X, torch.zeros(0, 5), 2, 3, 1.0).shape == (0, 1, 2, 3)
    assert prroi_pool2d(X[:, :0], rois, 2, 3, 1.0).shape == (2, 0, 2, 3)
    assert prroi_pool2d(X, rois, 2, 2, torch.tensor(1.0)).shape == (2, 1, 2, 2)
