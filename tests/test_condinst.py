"""FCOS and CondInst (spec §4) against loop-by-loop float64 references written here.

Every reference below follows the spec's words with plain Python loops over pixels,
points, GTs or instances; none calls the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from instseg.configs import apply_overrides, get_config
from instseg.modeling.condinst import CondInstMaskHead, CondInstMaskHeadConfig, aligned_bilinear
from instseg.modeling.dense_heads.fcos import centerness_target, fcos_targets, mask_centroids
from instseg.modeling.features import pyramid_specs
from instseg.modeling.losses import dice_loss, giou_loss, sigmoid_focal_loss
from instseg.modeling.neck import FPN, FPNConfig
from instseg.runner import build_model
from instseg.structures import ImageBatch, ImageInfo

# ------------------------------------------------------------------------- aligned_bilinear


def _aligned_bilinear_loop(x: torch.Tensor, f: int) -> torch.Tensor:
    """Spec §4.4 steps 1-4 on one (H, W) map: replicate-pad right/bottom by 1, bilinear with
    aligned corners to (f*h+1, f*w+1), replicate-pad left/top by f//2, crop to (f*h, f*w)."""
    h, w = x.shape
    padded = [[x[min(i, h - 1), min(j, w - 1)].item() for j in range(w + 1)] for i in range(h + 1)]
    oh, ow = f * h + 1, f * w + 1

    def sample(i: int, j: int) -> float:
        # align_corners=True: output index i maps to input i * (H_in - 1) / (H_out - 1).
        y = i * h / (oh - 1) if oh > 1 else 0.0
        xx = j * w / (ow - 1) if ow > 1 else 0.0
        y0, x0 = math.floor(y), math.floor(xx)
        y1, x1 = min(y0 + 1, h), min(x0 + 1, w)
        wy, wx = y - y0, xx - x0
        return (
            (1 - wy) * (1 - wx) * padded[y0][x0]
            + (1 - wy) * wx * padded[y0][x1]
            + wy * (1 - wx) * padded[y1][x0]
            + wy * wx * padded[y1][x1]
        )

    up = [[sample(i, j) for j in range(ow)] for i in range(oh)]
    p = f // 2
    out = torch.empty(f * h, f * w, dtype=torch.float64)
    for i in range(f * h):
        for j in range(f * w):
            out[i, j] = up[max(i - p, 0)][max(j - p, 0)]
    return out


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_aligned_bilinear_matches_loop_reference(factor):
    g = torch.Generator().manual_seed(factor)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    out = aligned_bilinear(x, factor)
    assert out.shape == (2, 3, 4 * factor, 5 * factor)
    for n in range(2):
        for c in range(3):
            ref = _aligned_bilinear_loop(x[n, c], factor)
            torch.testing.assert_close(out[n, c], ref, rtol=1e-12, atol=1e-12)
    # Input pixel i lands on output pixel f*i + f//2 (spec's closed form).
    idx = torch.arange(4) * factor + factor // 2
    jdx = torch.arange(5) * factor + factor // 2
    torch.testing.assert_close(out[:, :, idx][:, :, :, jdx], x, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- dynamic mask head


def _head(**kwargs) -> CondInstMaskHead:
    cfg = CondInstMaskHeadConfig(branch_channels=16, branch_convs=1, **kwargs)
    return CondInstMaskHead(cfg, pyramid_specs(16, (8, 16, 32, 64, 128)))


def test_controller_layout_is_weights_then_biases():
    head = _head()
    assert head.cfg.num_params == 169
    params = torch.arange(2 * 169, dtype=torch.float64).reshape(2, 169)
    weights, biases = head.split_params(params)
    assert [w.shape for w in weights] == [(2, 8, 10), (2, 8, 8), (2, 1, 8)]
    assert [b.shape for b in biases] == [(2, 8, 1), (2, 8, 1), (2, 1, 1)]
    p = params[1]
    # [W0 (80), W1 (64), W2 (8), b0 (8), b1 (8), b2 (1)], each W row-major (out, in).
    assert weights[0][1, 3, 7] == p[3 * 10 + 7]
    assert weights[1][1, 5, 2] == p[80 + 5 * 8 + 2]
    assert weights[2][1, 0, 6] == p[80 + 64 + 6]
    assert biases[0][1, 4, 0] == p[152 + 4]
    assert biases[1][1, 7, 0] == p[160 + 7]
    assert biases[2][1, 0, 0] == p[168]


def test_relative_coordinates_by_hand():
    head = _head()
    points = torch.tensor([[20.0, 36.0]], dtype=torch.float64)
    strides = torch.tensor([16.0], dtype=torch.float64)
    rel = head.relative_coords((3, 4), points, strides)  # locations ((j+.5)*8, (i+.5)*8)
    assert rel.shape == (1, 2, 12)
    # Location (row 2, col 1) = (12, 20): ((20 - 12) / 128, (36 - 20) / 128).
    k = 2 * 4 + 1
    assert rel[0, 0, k].item() == pytest.approx(8 / 128)
    assert rel[0, 1, k].item() == pytest.approx(16 / 128)


def test_dynamic_network_matches_per_instance_convolutions():
    head = _head().double()
    g = torch.Generator().manual_seed(3)
    mask_feats = torch.randn(2, 8, 5, 6, generator=g, dtype=torch.float64)
    n = 5
    params = torch.randn(n, 169, generator=g, dtype=torch.float64)
    points = torch.rand(n, 2, generator=g, dtype=torch.float64) * 40
    strides = torch.tensor([8.0, 16, 32, 8, 64], dtype=torch.float64)
    image = torch.tensor([0, 1, 1, 0, 1])
    out = head.dynamic_logits(mask_feats, image, params, points, strides)
    assert out.shape == (n, 10, 12)
    for k in range(n):
        # The spec's per-instance network: rel coords (x, y) first, then the image's
        # features, three 1x1 convs with this instance's weights, ReLU between.
        rel = torch.empty(2, 5, 6, dtype=torch.float64)
        for i in range(5):
            for j in range(6):
                rel[0, i, j] = (points[k, 0] - (j + 0.5) * 8) / (strides[k] * 8)
                rel[1, i, j] = (points[k, 1] - (i + 0.5) * 8) / (strides[k] * 8)
        x = torch.cat([rel, mask_feats[image[k]]])[None]
        p = params[k]
        w0, w1, w2 = p[:80].reshape(8, 10), p[80:144].reshape(8, 8), p[144:152].reshape(1, 8)
        b0, b1, b2 = p[152:160], p[160:168], p[168:169]
        x = F.relu(F.conv2d(x, w0[:, :, None, None], b0))
        x = F.relu(F.conv2d(x, w1[:, :, None, None], b1))
        x = F.conv2d(x, w2[:, :, None, None], b2)
        ref = _aligned_bilinear_loop(x[0, 0], 2)
        torch.testing.assert_close(out[k], ref, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------ FCOS assignment


def _assign_loop(points, strides, ranges, boxes, centres, radius):
    """Spec §4.3 point by point: candidates are GTs whose centre region (centre +- radius *
    stride, clipped to the box) strictly contains the point and whose largest distance lies
    in the point's range; the smallest box area wins, the first on ties."""
    assigned = []
    for (px, py), s, (lo, hi) in zip(
        points.tolist(), strides.tolist(), ranges.tolist(), strict=True
    ):
        best, best_area = -1, math.inf
        for gi, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            cx, cy = centres[gi].tolist()
            r = s * radius
            cx1, cy1 = max(cx - r, x1), max(cy - r, y1)
            cx2, cy2 = min(cx + r, x2), min(cy + r, y2)
            if min(px - cx1, py - cy1, cx2 - px, cy2 - py) <= 0:
                continue
            d = max(px - x1, py - y1, x2 - px, y2 - py)
            if not lo <= d <= hi:
                continue
            area = (x2 - x1) * (y2 - y1)
            if area < best_area:
                best, best_area = gi, area
        assigned.append(best)
    return assigned


def _points(sizes_strides):
    pts, strides, ranges = [], [], []
    rr = [(-1, 64), (64, 128), (128, 256), (256, 512), (512, 1e8)]
    for (h, w), s in sizes_strides:
        for i in range(h):
            for j in range(w):
                pts.append(((j + 0.5) * s, (i + 0.5) * s))
                strides.append(s)
                ranges.append(rr[int(math.log2(s)) - 3])
    t = torch.tensor
    return (
        t(pts, dtype=torch.float64),
        t(strides, dtype=torch.float64),
        t(ranges, dtype=torch.float64),
    )


def test_fcos_assignment_matches_loop_reference_with_mask_centroids():
    points, strides, ranges = _points([((16, 20), 8), ((8, 10), 16), ((4, 5), 32)])
    # Hand-made GT: nested boxes, two boxes of equal area overlapping (ties -> first), a
    # large box reaching the 64-128 range, and an L-shaped mask whose centroid is off-centre.
    boxes = torch.tensor(
        [
            [10.0, 10.0, 60.0, 70.0],
            [20.0, 20.0, 40.0, 40.0],
            [30.0, 25.0, 50.0, 45.0],
            [5.0, 30.0, 150.0, 125.0],
            [80.0, 8.0, 150.0, 40.0],
        ],
        dtype=torch.float64,
    )
    masks = torch.zeros(5, 128, 160, dtype=torch.bool)
    for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        masks[k, y1:y2, x1:x2] = True
    masks[4, 20:40, 100:150] = False  # an L: the centroid moves left and up
    centres = mask_centroids(masks, torch.float64)
    # Centroid by hand for the L.
    ys, xs = torch.nonzero(masks[4], as_tuple=True)
    assert centres[4, 0].item() == pytest.approx(xs.double().mean().item())
    assert centres[4, 1].item() == pytest.approx(ys.double().mean().item())
    assigned, distances = fcos_targets(points, strides, ranges, boxes, centres, True, 1.5)
    expected = _assign_loop(points, strides, ranges, boxes, centres, 1.5)
    assert assigned.tolist() == expected
    assert len(set(expected) - {-1}) == 5  # every GT got positives
    pos = assigned >= 0
    b = boxes[assigned[pos]]
    p = points[pos]
    ref = torch.stack(
        [p[:, 0] - b[:, 0], p[:, 1] - b[:, 1], b[:, 2] - p[:, 0], b[:, 3] - p[:, 1]], 1
    )
    torch.testing.assert_close(distances[pos], ref)
    # Without masks the box centre is used.
    box_centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assigned, _ = fcos_targets(points, strides, ranges, boxes, None, True, 1.5)
    assert assigned.tolist() == _assign_loop(points, strides, ranges, boxes, box_centres, 1.5)


def test_centerness_target_formula():
    d = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]], dtype=torch.float64)
    expected = [math.sqrt(1 / 3 * 2 / 4), 1.0]
    torch.testing.assert_close(centerness_target(d), torch.tensor(expected, dtype=torch.float64))


# ------------------------------------------------------------------------------ losses


def test_focal_loss_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 2, 1, 3, 0])  # 3 = background
    out = sigmoid_focal_loss(logits, labels, 0.25, 2.0)
    for i in range(6):
        for c in range(3):
            p = 1 / (1 + math.exp(-logits[i, c].item()))
            if labels[i] == c:
                ref = -0.25 * (1 - p) ** 2 * math.log(p)
            else:
                ref = -0.75 * p**2 * math.log(1 - p)
            assert out[i, c].item() == pytest.approx(ref, rel=1e-10)


def test_giou_loss_formula():
    pred = torch.tensor([[0.0, 0, 4, 4], [0, 0, 2, 2], [1, 1, 3, 5]], dtype=torch.float64)
    target = torch.tensor([[2.0, 2, 6, 6], [3, 3, 4, 4], [1, 1, 3, 5]], dtype=torch.float64)
    out = giou_loss(pred, target)
    # Overlap 4, union 28, hull 36 -> GIoU = 4/28 - 8/36. Disjoint: 0 - (16 - 5) / 16. Same: 1.
    expected = [1 - (4 / 28 - 8 / 36), 1 - (0 - 11 / 16), 0.0]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))


def test_dice_loss_formula():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    targets = torch.rand(3, 4, 5, generator=g) > 0.5
    out = dice_loss(logits, targets)
    for k in range(3):
        a = b = c = 0.0
        for i in range(4):
            for j in range(5):
                p = 1 / (1 + math.exp(-logits[k, i, j].item()))
                t = float(targets[k, i, j])
                a, b, c = a + p * t, b + p * p, c + t * t
        assert out[k].item() == pytest.approx(1 - 2 * a / ((b + 5e-6) + (c + 5e-6)), rel=1e-10)


# ------------------------------------------------------------------------------- the FPN


def test_fpn_extra_convs_on_output_with_relu_and_mmdet_names():
    g = torch.Generator().manual_seed(2)
    cfg = FPNConfig(
        out_channels=8,
        num_outs=5,
        start_level=1,
        add_extra_convs="on_output",
        relu_before_extra_convs=True,
    )
    fpn = FPN([4, 6, 10, 12], cfg, [4, 8, 16, 32]).double()
    names = {k for k in fpn.state_dict()}
    assert {"lateral_convs.2.conv.weight", "fpn_convs.4.conv.weight"} <= names
    assert "lateral_convs.3.conv.weight" not in names  # C2 is not used
    assert [s.name for s in fpn.output_specs] == ["p3", "p4", "p5", "p6", "p7"]
    feats = [
        torch.randn(1, c, 64 // s, 64 // s, generator=g, dtype=torch.float64)
        for c, s in zip([4, 6, 10, 12], [4, 8, 16, 32], strict=True)
    ]
    outs = fpn(feats)
    assert [tuple(o.shape[-2:]) for o in outs] == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    p6 = F.conv2d(outs[2], fpn.fpn_convs[3].conv.weight, fpn.fpn_convs[3].conv.bias, 2, 1)
    p7 = F.conv2d(F.relu(p6), fpn.fpn_convs[4].conv.weight, fpn.fpn_convs[4].conv.bias, 2, 1)
    torch.testing.assert_close(outs[3], p6)
    torch.testing.assert_close(outs[4], p7)


# ------------------------------------------------------------------- batch invariance


def _spread_model(seed: int = 0):
    cfg = apply_overrides(get_config("condinst_r18_fpn_small"), ["model.backbone.base_width=8"])
    torch.manual_seed(seed)
    model = build_model(cfg, 3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("bbox_head" in name or "mask_head" in name) and p.dim() > 0:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(max(p[0].numel(), 1))))
        model.bbox_head.conv_cls.bias.fill_(-1.0)
    return model.eval()


def test_same_image_alone_or_in_a_batch_gives_the_same_detections_and_masks():
    model = _spread_model()
    g = torch.Generator().manual_seed(5)
    images = torch.randn(3, 3, 128, 160, generator=g)
    sizes = [(128, 150), (120, 160), (128, 160)]
    for k, (h, w) in enumerate(sizes):
        images[k, :, h:], images[k, :, :, w:] = 0, 0
    infos = [
        ImageInfo(k, "", (h * 2 // 3, w * 2 // 3), (h, w), (1.5, 1.5))
        for k, (h, w) in enumerate(sizes)
    ]
    with torch.no_grad():
        batch = model.predict(ImageBatch(images, sizes), infos)
        alone = model.predict(ImageBatch(images[1:2].clone(), sizes[1:2]), infos[1:2])[0]
    assert len(batch[1]) > 5
    torch.testing.assert_close(alone.boxes, batch[1].boxes, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(alone.scores, batch[1].scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(alone.labels, batch[1].labels)
    assert alone.masks.shape == (len(alone), 80, 106)
    mismatch = (alone.masks != batch[1].masks).float().mean().item()
    assert mismatch < 1e-3


def test_mask_head_variant_switches_between_condinst_and_fcos():
    """The controller's width comes from the mask head, so one key turns either into the
    other (and the parameters follow: no controller without a mask head)."""
    fcos = apply_overrides(get_config("condinst_r18_fpn_small"), ["model.mask_head=none"])
    assert not fcos.model.with_masks and build_model(fcos, 3).bbox_head.controller is None
    condinst = apply_overrides(fcos, ["model.mask_head=condinst"])
    model = build_model(condinst, 3)
    assert condinst.model.with_masks and model.bbox_head.controller.out_channels == 169
    assert any(k.startswith("mask_head.mask_feature_head.") for k in model.state_dict())
