"""Grid R-CNN (spec §11) against loop references: the fusion wiring of the spec's table, the
fusion itself, the heatmap targets, the point-to-box decode, the RoI jitter; perfect
heatmaps decode to the GT box."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instseg.modeling.features import FeatureSpec
from instseg.modeling.roi import BoxHeadConfig, GridHeadConfig, GridRoIHeadConfig
from instseg.modeling.roi.grid import GridHead, grid_neighbours, jitter_boxes, sub_regions
from instseg.structures import InstanceTargets

# Spec §11.2: point i = 3 * x_idx + y_idx; neighbours left, up, down, right.
SPEC_NEIGHBOURS = {
    0: (1, 3),
    1: (0, 2, 4),
    2: (1, 5),
    3: (0, 4, 6),
    4: (1, 3, 5, 7),
    5: (2, 4, 8),
    6: (3, 7),
    7: (4, 6, 8),
    8: (5, 7),
}


def _head(channels: int = 4, **overrides) -> GridHead:
    torch.manual_seed(0)
    cfg = GridHeadConfig(point_feat_channels=channels, num_groups=9, **overrides)
    head = GridHead(cfg, in_channels=6).double()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    return head


def test_neighbours_and_sub_regions_are_the_spec_tables():
    assert dict(enumerate(grid_neighbours())) == SPEC_NEIGHBOURS
    assert sum(len(n) for n in SPEC_NEIGHBOURS.values()) == 24
    # x from x_idx = i // 3, y from y_idx = i % 3: 0, 14, 28 in the 56x56 map.
    assert sub_regions(56) == [(x, y) for x in (0, 14, 28) for y in (0, 14, 28)]


def test_fusion_equals_a_loop_over_the_transition_modules():
    head = _head().eval()
    c = head.cfg.point_feat_channels
    x = torch.randn(3, 9 * c, 7, 7, dtype=torch.float64)
    block = [x[:, i * c : (i + 1) * c] for i in range(9)]
    first = []
    for i, nb in SPEC_NEIGHBOURS.items():
        v = block[i]
        for k, j in enumerate(nb):
            v = v + head.forder_trans[i][k](block[j])
        first.append(v)
    second = []
    for i, nb in SPEC_NEIGHBOURS.items():
        v = block[i]
        for k, j in enumerate(nb):
            v = v + head.sorder_trans[i][k](first[j])
        second.append(v)
    got_first = head._fuse(x, x, head.forder_trans)
    torch.testing.assert_close(got_first, torch.cat(first, 1), rtol=1e-12, atol=1e-12)
    got = head._fuse(x, got_first, head.sorder_trans)
    torch.testing.assert_close(got, torch.cat(second, 1), rtol=1e-12, atol=1e-12)


def _loop_targets(rois, gts, radius=1, size=56):
    """mmdet's get_targets loop, in float32 scalars as the official tensors compute."""
    f = np.float32
    out = np.zeros((len(rois), 9, size, size), dtype=np.float32)
    for n, (r, g) in enumerate(zip(rois, gts, strict=True)):
        r, g = [f(v) for v in r], [f(v) for v in g]
        w, h = f(r[2] - r[0]), f(r[3] - r[1])
        x1, y1 = f(r[0] - w / f(2)), f(r[1] - h / f(2))
        x2, y2 = f(r[2] + w / f(2)), f(r[3] + h / f(2))
        ew, eh = f(x2 - x1), f(y2 - y1)
        if ew <= 3 or eh <= 3:
            continue
        for j in range(9):
            fx, fy = f(1 - (j // 3) / 2), f(1 - (j % 3) / 2)
            gx = f(fx * g[0]) + f(f(1 - fx) * g[2])
            gy = f(fy * g[1]) + f(f(1 - fy) * g[3])
            cx = int(f(f(f(gx - x1) / ew) * f(size)))
            cy = int(f(f(f(gy - y1) / eh) * f(size)))
            for x in range(cx - radius, cx + radius + 1):
                for y in range(cy - radius, cy + radius + 1):
                    if (
                        0 <= x < size
                        and 0 <= y < size
                        and (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
                    ):
                        out[n, j, y, x] = 1
    crops = [out[:, j, y : y + 28, x : x + 28] for j, (x, y) in enumerate(sub_regions(size))]
    return torch.from_numpy(np.stack(crops, 1))


def test_targets_equal_the_loop_reference():
    head = _head().float()
    rois = torch.tensor(
        [
            [10.0, 20.0, 60.0, 50.0],
            [10.0, 20.0, 61.3, 50.7],
            [0.0, 0.0, 1.2, 1.0],  # expanded side <= 3: no target
            [30.5, 5.25, 90.0, 95.5],
            [5.0, 5.0, 25.0, 45.0],
        ]
    )
    gts = torch.tensor(
        [
            [12.0, 18.0, 58.0, 52.0],
            [0.0, 10.0, 80.0, 70.0],
            [0.0, 0.0, 2.0, 2.0],
            [25.0, 0.0, 99.0, 99.0],
            [-20.0, -5.0, 60.0, 90.0],  # points outside the expanded map
        ]
    )
    got = head.targets(rois, gts)
    want = _loop_targets(rois.tolist(), gts.tolist())
    assert got.shape == (5, 9, 28, 28)
    assert torch.equal(got, want)
    assert got[2].sum() == 0 and got[0].sum() > 9


def _loop_decode(heatmaps, boxes):
    probs = heatmaps.sigmoid()
    out = []
    for r in range(len(boxes)):
        x1, y1, x2, y2 = boxes[r].tolist()
        w, h = x2 - x1, y2 - y1
        pts = []
        for j, (ox, oy) in enumerate(sub_regions(56)):
            flat = probs[r, j].flatten()
            k = int(flat.argmax())
            p = float(flat[k])
            xs, ys = k % 28 + ox, k // 28 + oy
            pts.append((p, (xs + 0.5) / 28 * w + x1 - w / 2, (ys + 0.5) / 28 * h + y1 - h / 2))

        def vote(idx, axis, pts=pts):
            return sum(pts[i][0] * pts[i][axis] for i in idx) / sum(pts[i][0] for i in idx)

        out.append([vote([0, 1, 2], 1), vote([0, 3, 6], 2), vote([6, 7, 8], 1), vote([2, 5, 8], 2)])
    return torch.tensor(out, dtype=torch.float64)


def test_decode_equals_the_loop_reference():
    head = _head()
    g = torch.Generator().manual_seed(4)
    heatmaps = torch.randn(4, 9, 28, 28, generator=g, dtype=torch.float64)
    boxes = torch.tensor(
        [[10.0, 20.0, 60.0, 50.0], [0.0, 0.0, 5.0, 9.0], [100.0, 3.0, 180.0, 40.0], [7, 7, 8, 8.5]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(head.decode(heatmaps, boxes), _loop_decode(heatmaps, boxes))


def test_perfect_heatmaps_decode_to_the_gt_box():
    """Box (0, 0, 56, 56): its expanded map has 2-unit pixels centred at 2k - 27, so a GT
    with edges on those centres is recovered exactly from one-pixel targets."""
    head = _head(pos_radius=0)
    box = torch.tensor([[0.0, 0.0, 56.0, 56.0]], dtype=torch.float64)
    gt = torch.tensor([[2 * 16 - 27, 2 * 18 - 27, 2 * 34 - 27, 2 * 39 - 27]], dtype=torch.float64)
    target = head.targets(box, gt)
    assert target.flatten(2).sum(2).eq(1).all()
    torch.testing.assert_close(head.decode(target * 20 - 10, box), gt, rtol=0, atol=1e-12)


def test_jitter_formula_and_clip():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 99.0, 60.0]], dtype=torch.float64)
    torch.manual_seed(7)
    got = jitter_boxes(boxes, 0.15, (64, 100))
    torch.manual_seed(7)
    r = boxes.new_empty(2, 4).uniform_(-0.15, 0.15)
    for n, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        cx, cy = cx + w * float(r[n, 0]), cy + h * float(r[n, 1])
        w, h = w * (1 + float(r[n, 2])), h * (1 + float(r[n, 3]))
        want = [
            min(max(cx - w / 2, 0), 99),
            min(max(cy - h / 2, 0), 63),
            min(max(cx + w / 2, 0), 99),
            min(max(cy + h / 2, 0), 63),
        ]
        torch.testing.assert_close(got[n], torch.tensor(want, dtype=torch.float64))
    assert (r.abs() <= 0.15).all()


def test_box_head_without_regression_and_the_grid_loss():
    specs = [FeatureSpec(f"p{k}", 8, 2**k) for k in (2, 3, 4, 5)]
    cfg = GridRoIHeadConfig(
        box_head=BoxHeadConfig(fc_channels=16, with_reg=False),
        grid_head=GridHeadConfig(point_feat_channels=4, num_groups=9),
    )
    torch.manual_seed(0)
    head = cfg.build(specs, 3)
    assert not hasattr(head.bbox_head, "fc_reg")
    sizes = {"p2": (16, 20), "p3": (8, 10), "p4": (4, 5), "p5": (2, 3)}
    feats = {k: torch.randn(1, 8, *hw) for k, hw in sizes.items()}
    boxes = torch.tensor([[10.0, 8.0, 40.0, 30.0]])
    target = InstanceTargets(boxes=boxes, labels=torch.tensor([1]))
    proposals = [torch.tensor([[11.0, 9.0, 41.0, 29.0], [0.0, 0.0, 20.0, 20.0]])]
    losses = head.train().loss(feats, proposals, [target], [(64, 80)])
    assert set(losses) == {"loss_cls", "loss_grid"}
    losses["loss_grid"].backward()
    assert head.grid_head.deconv2.weight.grad is not None
    head.eval()
    (result,) = head.predict(feats, proposals, [(64, 80)])
    assert len(result) > 0 and result.masks is None


@pytest.mark.parametrize("bad", [{"num_groups": 7}, {"point_feat_channels": 0}])
def test_grid_head_config_errors(bad):
    with pytest.raises(ValueError, match=r"roi_head\.grid_head"):
        GridHeadConfig(**bad)
