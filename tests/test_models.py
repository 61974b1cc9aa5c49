"""Anchors, assignment, level mapping and the two-stage detector end to end (tiny, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from instseg.modeling.anchors import AnchorGenerator, AssignerConfig, assign, sample
from instseg.modeling.backbone import ResNetConfig
from instseg.modeling.dense_heads import RPNConfig
from instseg.modeling.detectors import TwoStageConfig, TwoStageDetector
from instseg.modeling.features import pyramid_specs
from instseg.modeling.neck import FPNConfig
from instseg.modeling.roi import (
    BoxHeadConfig,
    FCNMaskHeadConfig,
    RoIExtractorConfig,
    RoIHeadConfig,
    SingleRoIExtractor,
    map_roi_levels,
)
from instseg.ops import roi_align
from instseg.structures import ImageBatch, ImageInfo, InstanceTargets


def test_anchor_shapes_and_order():
    gen = AnchorGenerator(strides=(4, 8), ratios=(0.5, 1.0, 2.0), scales=(8.0,))
    anchors = gen.grid_anchors([(2, 3), (1, 2)], torch.device("cpu"))
    assert [a.shape for a in anchors] == [(2 * 3 * 3, 4), (1 * 2 * 3, 4)]
    # Ratio 1 at stride 4, scale 8: a 32x32 box centred on the location (0, 0).
    torch.testing.assert_close(anchors[0][1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    # Ratio 0.5 (h/w): area kept, w = 32 * sqrt(2).
    w = 32 * math.sqrt(2)
    torch.testing.assert_close(anchors[0][0], torch.tensor([-w / 2, -w / 4, w / 2, w / 4]))
    # Location-major order: the next location (x = 1) shifts by the stride.
    torch.testing.assert_close(anchors[0][4] - anchors[0][1], torch.tensor([4.0, 0, 4, 0]))
    torch.testing.assert_close(anchors[0][3 * 3 + 1] - anchors[0][1], torch.tensor([0.0, 4, 0, 4]))
    flags = gen.valid_flags([(4, 4), (2, 2)], (6, 16), torch.device("cpu"))
    assert flags.shape == (4 * 4 * 3 + 2 * 2 * 3,)
    assert (
        flags[: 4 * 4 * 3].view(4, 4, 3)[:2].all()
        and not flags[: 4 * 4 * 3].view(4, 4, 3)[2:].any()
    )


def _assign_reference(boxes, gts, cfg):
    """Loop-by-loop MaxIoU assignment (mmdet semantics)."""

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    boxes, gts = boxes.tolist(), gts.tolist()
    out = [-1] * len(boxes)
    ov = [[iou(g, b) for b in boxes] for g in gts]
    for j in range(len(boxes)):
        col = [ov[i][j] for i in range(len(gts))]
        best = max(col)
        if best < cfg.neg_iou_thr:
            out[j] = 0
        if best >= cfg.pos_iou_thr:
            out[j] = col.index(best) + 1
    if cfg.match_low_quality:
        for i in range(len(gts)):
            gmax = max(ov[i])
            if gmax >= cfg.min_pos_iou:
                for j in range(len(boxes)):
                    if ov[i][j] == gmax:
                        out[j] = i + 1
    return out


@pytest.mark.parametrize("low_quality", [False, True])
def test_assign_matches_loop_reference(low_quality):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 8 + torch.rand(300, 2, generator=g) * 30], 1)
    gxy = torch.rand(5, 2, generator=g) * 80
    gts = torch.cat([gxy, gxy + 10 + torch.rand(5, 2, generator=g) * 30], 1)
    gts[4] = gts[3]  # a duplicate GT: ties go to the later one
    cfg = AssignerConfig(0.7, 0.3, 0.3, match_low_quality=low_quality)
    assert assign(boxes, gts, cfg).tolist() == _assign_reference(boxes, gts, cfg)


def test_assign_ignore_regions_and_empty_gt():
    boxes = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 110]])
    gts = torch.tensor([[0.0, 0, 10, 10]])
    ignore = torch.tensor([[45.0, 45, 65, 65]])
    cfg = AssignerConfig(0.5, 0.5, 0.5, ignore_iof_thr=0.5)
    assert assign(boxes, gts, cfg, ignore).tolist() == [1, -1, 0]
    assert assign(boxes, gts[:0], cfg).tolist() == [0, 0, 0]


def test_sample_respects_budget():
    torch.manual_seed(0)
    assigned = torch.tensor([1] * 100 + [0] * 1000 + [-1] * 50)
    pos, neg = sample(assigned, 256, 0.25)
    assert len(pos) == 64 and len(neg) == 192
    assert (assigned[pos] > 0).all() and (assigned[neg] == 0).all()
    assert len(set(pos.tolist())) == 64
    pos, neg = sample(torch.tensor([1, 0, 0]), 256, 0.5)
    assert len(pos) == 1 and len(neg) == 2


def test_level_mapping_thresholds():
    sides = torch.tensor([10.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 2000.0])
    rois = torch.cat([torch.zeros(8, 3), sides[:, None], sides[:, None]], 1)
    assert map_roi_levels(rois, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("op", ["roi_align", "prroi_pool"])
def test_extractor_pools_each_roi_from_its_level(op):
    g = torch.Generator().manual_seed(1)
    specs = pyramid_specs(4, (4, 8, 16, 32))
    feats = {
        s.name: torch.randn(2, 4, 256 // s.stride, 256 // s.stride, generator=g) for s in specs
    }
    cfg = RoIExtractorConfig(op=op)
    rois = torch.tensor([[0, 0.0, 0, 50, 50], [1, 10, 10, 200, 150], [0, 0, 0, 400, 300]])
    out = SingleRoIExtractor(cfg, specs, 3)(feats, rois)
    for k, level in enumerate(map_roi_levels(rois, 4).tolist()):
        one = RoIExtractorConfig(op=op, levels=(specs[level].name,))
        expected = SingleRoIExtractor(one, specs, 3)(feats, rois[k : k + 1])
        torch.testing.assert_close(out[k : k + 1], expected)
    if op == "roi_align":
        direct = roi_align(feats["p2"], rois[:1], 3, 0.25, 0, True)
        torch.testing.assert_close(out[:1], direct)


@pytest.mark.parametrize("channels_last", [False, True])
def test_extractor_keeps_the_maps_layout_and_backpropagates_like_indexing(channels_last):
    """The level-sorted rows are put back in RoI order by a custom gather (forward and
    backward): same values and feature gradients as plain indexing, bit for bit, and
    channels-last maps give channels-last RoI features (the heads' convs stay NHWC)."""
    g = torch.Generator().manual_seed(3)
    specs = pyramid_specs(4, (4, 8, 16, 32))
    feats = {
        s.name: torch.randn(
            2, 6, 256 // s.stride, 256 // s.stride, generator=g, dtype=torch.float64
        )
        for s in specs
    }
    if channels_last:
        feats = {k: v.contiguous(memory_format=torch.channels_last) for k, v in feats.items()}
    for v in feats.values():
        v.requires_grad_(True)
    sides = torch.tensor([300.0, 20, 130, 60, 700, 250, 90, 30])
    rois = torch.cat(
        [
            torch.tensor([0.0, 1, 0, 1, 1, 0, 1, 0])[:, None],
            torch.full((8, 2), 3.0),
            3 + sides[:, None],
            3 + sides[:, None] * 0.75,
        ],
        1,
    )
    rois = rois.double()
    extractor = SingleRoIExtractor(RoIExtractorConfig(), specs, 3)
    out = extractor(feats, rois)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), list(feats.values()))
    # Reference: each RoI pooled alone from its level, in RoI order, by the public op.
    levels = map_roi_levels(rois, 4).tolist()
    assert sorted(set(levels)) == [0, 1, 2, 3] and levels != sorted(levels)
    expected = torch.cat(
        [
            roi_align(feats[specs[lv].name], rois[k : k + 1], 3, 1 / specs[lv].stride, 0, True)
            for k, lv in enumerate(levels)
        ]
    )
    assert torch.equal(out, expected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), list(feats.values()))
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def tiny_config(with_mask: bool = True, op: str = "roi_align") -> TwoStageConfig:
    """A narrow Mask (or Faster) R-CNN; every width follows the neck's 32 channels."""
    return TwoStageConfig(
        backbone=ResNetConfig(depth=18, base_width=8, frozen_stages=-1, norm_eval=False),
        neck=FPNConfig(out_channels=32),
        rpn=RPNConfig(
            train_nms_pre=300,
            train_max_per_image=200,
            test_nms_pre=300,
            test_max_per_image=100,
        ),
        roi_head=RoIHeadConfig(
            box_extractor=RoIExtractorConfig(op=op),
            mask_extractor=RoIExtractorConfig(op=op),
            box_head=BoxHeadConfig(fc_channels=64),
            mask_head=FCNMaskHeadConfig(num_convs=2) if with_mask else None,
        ),
    )


def toy_batch():
    images = torch.zeros(2, 3, 96, 128)
    masks0 = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks0[0, 10:50, 20:60] = True
    masks0[1, 55:90, 70:120] = True
    images[0, 0][masks0[0]] = 2.0
    images[0, 1][masks0[1]] = 2.0
    masks1 = torch.zeros(1, 80, 100, dtype=torch.bool)
    masks1[0, 20:60, 30:80] = True
    images[1, 2, :80, :100][masks1[0]] = 2.0
    targets = [
        InstanceTargets(
            torch.tensor([[20.0, 10, 60, 50], [70, 55, 120, 90]]), torch.tensor([0, 1]), masks0
        ),
        InstanceTargets(torch.tensor([[30.0, 20, 80, 60]]), torch.tensor([2]), masks1),
    ]
    return ImageBatch(images, [(96, 128), (80, 100)]), targets


@pytest.mark.parametrize(
    ("with_mask", "op"), [(True, "roi_align"), (False, "roi_align"), (True, "prroi_pool")]
)
def test_detector_overfits_a_batch(with_mask, op):
    torch.manual_seed(0)
    model = TwoStageDetector(tiny_config(with_mask=with_mask, op=op), num_classes=3)
    images, targets = toy_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(12):
        losses = model(images, targets)
        total = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(float(total.detach()))
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"} | (
        {"loss_mask"} if with_mask else set()
    )
    assert sum(history[-3:]) / 3 < 0.7 * sum(history[:3]) / 3


def test_detector_handles_images_without_objects_and_predicts_in_original_frame():
    torch.manual_seed(0)
    model = TwoStageDetector(tiny_config(), num_classes=3)
    images, targets = toy_batch()
    targets[1] = InstanceTargets(
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, 80, 100, dtype=torch.bool),
    )
    losses = model(images, targets)
    sum(losses.values()).backward()
    model.eval()
    infos = [
        ImageInfo(1, "a.png", (48, 64), (96, 128), scale=(2.0, 2.0)),
        ImageInfo(2, "b.png", (80, 100), (80, 100)),
    ]
    results = model.predict(images, infos)
    assert len(results) == 2
    for result, info in zip(results, infos, strict=True):
        assert len(result) <= 100
        assert result.masks.shape == (len(result), *info.original_size)
        assert result.masks.dtype == torch.bool
        if len(result):
            assert (result.boxes[:, 2] <= info.original_size[1] + 1e-4).all()
            assert (result.boxes[:, 3] <= info.original_size[0] + 1e-4).all()
            assert (result.scores > 0.05).all() and (result.labels < 3).all()


@pytest.mark.parametrize("class_agnostic", [False, True])
def test_box_head_loss_and_decode_match_loop_references(class_agnostic):
    """Cross-entropy over the sampled RoIs and L1 on the positives' normalised deltas (of
    their GT class, or the one class-agnostic box), divided by the number of samples;
    decoding inverts the coder. The reference is written out per RoI in float64."""
    from instseg.modeling.roi import SampledRoIs, Shared2FCBoxHead

    g = torch.Generator().manual_seed(3)
    num_classes, stds, means = 3, (0.1, 0.1, 0.2, 0.2), (0.01, -0.02, 0.0, 0.03)
    cfg = BoxHeadConfig(
        roi_size=2, fc_channels=8, class_agnostic=class_agnostic, target_means=means,
        target_stds=stds, loss_cls_weight=1.5, loss_bbox_weight=2.0,
    )  # fmt: skip
    head = Shared2FCBoxHead(cfg, 4, num_classes).double()
    xy = 5 + torch.rand(2, 5, 2, generator=g, dtype=torch.float64) * 50  # inside the image
    wh = 5 + 20 * torch.rand(2, 5, 2, generator=g, dtype=torch.float64)
    boxes = [torch.cat([xy[i], xy[i] + wh[i]], 1) for i in range(2)]
    gts = [b + torch.randn(b.shape, generator=g, dtype=torch.float64) for b in boxes]
    labels = torch.tensor([2, 0, 3, 3, 3, 1, 3, 3, 3, 3])  # 3 = background
    num_pos = [2, 1]
    sampled = SampledRoIs(
        boxes, labels, num_classes, [b[:n] for b, n in zip(boxes, num_pos, strict=True)],
        [torch.arange(n) for n in num_pos], [t[:n] for t, n in zip(gts, num_pos, strict=True)],
    )  # fmt: skip
    feats = torch.randn(10, 4, 2, 2, generator=g, dtype=torch.float64)
    cls_score, bbox_pred = head(feats)
    losses = head.loss(cls_score, bbox_pred, sampled)

    all_boxes = torch.cat(boxes)
    ce, l1 = 0.0, 0.0
    for k in range(10):
        row = cls_score[k].tolist()
        top = max(row)
        ce += -(row[labels[k]] - top - math.log(sum(math.exp(v - top) for v in row)))
        if labels[k] == num_classes:
            continue
        image, j = (0, k) if k < 5 else (1, k - 5)
        px1, py1, px2, py2 = all_boxes[k].tolist()
        gx1, gy1, gx2, gy2 = gts[image][j].tolist()
        pw, ph, gw, gh = px2 - px1, py2 - py1, gx2 - gx1, gy2 - gy1
        target = [
            ((gx1 + gx2) / 2 - (px1 + px2) / 2) / pw,
            ((gy1 + gy2) / 2 - (py1 + py2) / 2) / ph,
            math.log(gw / pw),
            math.log(gh / ph),
        ]
        column = 0 if class_agnostic else int(labels[k])
        pred = bbox_pred[k, 4 * column : 4 * column + 4].tolist()
        l1 += sum(
            abs(p - (t - m) / s) for p, t, m, s in zip(pred, target, means, stds, strict=True)
        )
    assert losses["loss_cls"].item() == pytest.approx(1.5 * ce / 10, rel=1e-12)
    assert losses["loss_bbox"].item() == pytest.approx(2.0 * l1 / 10, rel=1e-12)

    # Decoding the encoded GT recovers it, for every class column.
    from instseg.ops import encode_deltas

    deltas = encode_deltas(boxes[0][:2], gts[0][:2], means, stds)
    pred = deltas.repeat(1, 1 if class_agnostic else num_classes)
    decoded = head.decode(boxes[0][:2], pred, (1000, 1000))
    assert decoded.shape == (2, num_classes, 4)
    torch.testing.assert_close(decoded, gts[0][:2, None].expand(-1, num_classes, 4))


def test_sample_rois_marks_the_gt_boxes_it_joined_and_keeps_positives_first():
    from instseg.modeling.anchors import SamplerConfig
    from instseg.modeling.roi import sample_rois

    torch.manual_seed(0)
    _, targets = toy_batch()
    g = torch.Generator().manual_seed(0)
    proposals = [torch.rand(40, 2, generator=g) * 60 for _ in targets]
    proposals = [torch.cat([p, p + 20], 1) for p in proposals]
    sampled = sample_rois(proposals, targets, AssignerConfig(), SamplerConfig(num=16), 3)
    offset = 0
    for i, target in enumerate(targets):
        boxes, is_gt = sampled.boxes[i], sampled.is_gt[i]
        num_pos = len(sampled.pos_boxes[i])
        assert torch.equal(boxes[:num_pos], sampled.pos_boxes[i])
        # A sampled RoI marked is_gt is one of the image's GT boxes (the proposals here
        # never coincide with one); every GT box is a positive of itself (IoU 1).
        is_a_gt = (boxes[:, None] == target.boxes[None]).all(-1).any(-1)
        assert torch.equal(is_gt, is_a_gt)
        labels = sampled.labels[offset : offset + len(boxes)]
        assert torch.equal(labels[:num_pos], target.labels[sampled.pos_gt_index[i]])
        assert (labels[num_pos:] == 3).all()
        offset += len(boxes)
    assert sampled.rois.shape == (sum(len(b) for b in sampled.boxes), 5)
    torch.manual_seed(0)
    no_gt = sample_rois(
        proposals, targets, AssignerConfig(), SamplerConfig(num=16, add_gt_as_proposals=False), 3
    )
    assert not any(m.any() for m in no_gt.is_gt)
