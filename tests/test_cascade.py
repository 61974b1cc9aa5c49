"""Cascade R-CNN's RoI head (spec §10, §5.7) against float64 loop references: the stage
targets and the RoIs handed from stage to stage in both recipes, the test-time score merge
of each recipe and the refined boxes."""

from __future__ import annotations

import math

import pytest
import torch

from instseg.modeling.features import FeatureSpec
from instseg.modeling.roi import CascadeRoIHeadConfig, FCNMaskHeadConfig
from instseg.modeling.roi.cascade import _ScaleGradient
from instseg.structures import InstanceTargets

NUM_CLASSES = 3
SPECS = [FeatureSpec(f"p{k}", 8, 2**k) for k in (2, 3, 4, 5)]
IMAGE = (64, 80)  # (h, w)


def _feats(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = {"p2": (16, 20), "p3": (8, 10), "p4": (4, 5), "p5": (2, 3)}
    return {k: torch.randn(1, 8, *hw, generator=g, dtype=torch.float64) for k, hw in sizes.items()}


def _targets() -> list[InstanceTargets]:
    boxes = torch.tensor([[10.0, 8.0, 40.0, 30.0], [30.0, 20.0, 70.0, 60.0]], dtype=torch.float64)
    masks = torch.zeros(2, *IMAGE, dtype=torch.bool)
    masks[0, 8:30, 10:40] = True
    masks[1, 20:60, 30:70] = True
    return [InstanceTargets(boxes=boxes, labels=torch.tensor([2, 0]), masks=masks)]


def _proposals() -> list[torch.Tensor]:
    """Boxes around both GTs at various overlaps, plus background."""
    g = torch.Generator().manual_seed(3)
    gts = _targets()[0].boxes
    jitter = torch.randn(40, 4, generator=g, dtype=torch.float64) * 6
    base = gts[torch.arange(40) % 2]
    boxes = base + jitter
    boxes = torch.cat([boxes, torch.tensor([[0.0, 0.0, 12.0, 9.0], [50.0, 2.0, 78.0, 15.0]])])
    x1 = torch.minimum(boxes[:, 0], boxes[:, 2] - 2).clamp(0, IMAGE[1])
    y1 = torch.minimum(boxes[:, 1], boxes[:, 3] - 2).clamp(0, IMAGE[0])
    return [
        torch.stack([x1, y1, boxes[:, 2].clamp(0, IMAGE[1]), boxes[:, 3].clamp(0, IMAGE[0])], 1)
    ]


def _head(**overrides):
    cfg = CascadeRoIHeadConfig(mask_head=FCNMaskHeadConfig(num_convs=1), **overrides)
    cfg.box_head.fc_channels = 16
    # Keep every candidate: at most 1000 per image, all positives allowed.
    cfg.sampler.num, cfg.sampler.pos_fraction = 1000, 1.0
    torch.manual_seed(0)
    head = cfg.build(SPECS, NUM_CLASSES).double()
    with torch.no_grad():
        for box_head in head.bbox_head:
            box_head.fc_reg.weight.normal_(0, 0.05)  # regressions that move the boxes
            box_head.fc_cls.weight.normal_(0, 0.2)
    return head


def _iou(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _label(box, gts, labels, thr) -> tuple[int, int]:
    """(class, gt index) of a box at IoU threshold ``thr`` (background: NUM_CLASSES, -1)."""
    ious = [_iou(box, g) for g in gts]
    best = max(range(len(gts)), key=lambda i: ious[i])
    return (labels[best], best) if ious[best] >= thr else (NUM_CLASSES, -1)


def _decode(box, delta, stds, size) -> list[float]:
    """mmdet's DeltaXYWHBBoxCoder decode with zero means, clipped to ``size`` = (h, w)."""
    dx, dy, dw, dh = (d * s for d, s in zip(delta, stds, strict=True))
    limit = abs(math.log(16 / 1000))
    dw, dh = max(-limit, min(limit, dw)), max(-limit, min(limit, dh))
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    w, h = box[2] - box[0], box[3] - box[1]
    ncx, ncy, nw, nh = cx + dx * w, cy + dy * h, w * math.exp(dw), h * math.exp(dh)
    out = [ncx - nw / 2, ncy - nh / 2, ncx + nw / 2, ncy + nh / 2]
    return [min(max(v, 0.0), size[1] if i % 2 == 0 else size[0]) for i, v in enumerate(out)]


def _sorted_rows(t: torch.Tensor) -> torch.Tensor:
    rows = sorted(t.tolist())
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, t.shape[1])


@pytest.mark.parametrize("recipe", ["mmdet", "cvpods"])
def test_stage_targets_and_handed_boxes_against_a_loop_reference(recipe):
    overrides = {}
    if recipe == "cvpods":
        overrides = dict(
            later_stages="relabel",
            stage_loss_weights=(1.0, 1.0, 1.0),
            stage_gradient_scale=1 / 3,
            score_merge="mean_probs",
            mask_per_stage=False,
        )
    head = _head(**overrides).train()
    seen = []
    for t, box_head in enumerate(head.bbox_head):
        original = box_head.loss

        def recording(cls_score, bbox_pred, sampled, t=t, original=original):
            seen.append((t, sampled, bbox_pred.detach(), cls_score.detach()))
            return original(cls_score, bbox_pred, sampled)

        box_head.loss = recording
    targets = _targets()
    gts, labels = targets[0].boxes.tolist(), targets[0].labels.tolist()
    losses = head.loss(_feats(), _proposals(), targets, [IMAGE])
    stages = head.cfg.num_stages
    expected_keys = {f"s{t}.loss_{k}" for t in range(stages) for k in ("cls", "bbox")}
    expected_keys |= (
        {f"s{t}.loss_mask" for t in range(stages)} if recipe == "mmdet" else {"loss_mask"}
    )
    assert set(losses) == expected_keys
    assert len(seen) == stages

    candidates = [list(b) for b in _proposals()[0].tolist()]
    for t, sampled, bbox_pred, _ in seen:
        thr = head.cfg.stage_ious[t]
        with_gt = t == 0 or recipe == "mmdet"
        pool = (gts if with_gt else []) + candidates
        want = [(*b, float(_label(b, gts, labels, thr)[0])) for b in pool]
        got = torch.cat([sampled.boxes[0], sampled.labels[:, None].double()], 1)
        torch.testing.assert_close(
            _sorted_rows(got), torch.tensor(sorted(want), dtype=torch.float64), rtol=0, atol=1e-12
        )
        # The positives' GT boxes are their best-IoU GT.
        for box, gt_box in zip(
            sampled.pos_boxes[0].tolist(), sampled.pos_gt_boxes[0].tolist(), strict=True
        ):
            assert gt_box == gts[_label(box, gts, labels, thr)[1]]
        # The boxes handed to the next stage.
        stds = head.cfg.stage_target_stds[t]
        is_gt = sampled.is_gt[0].tolist() if sampled.is_gt is not None else [False] * len(got)
        candidates = []
        for box, delta, gt_flag in zip(
            sampled.boxes[0].tolist(), bbox_pred.tolist(), is_gt, strict=True
        ):
            new = _decode(box, delta, stds, IMAGE)
            if recipe == "mmdet" and gt_flag:
                continue
            if recipe == "cvpods" and not (new[2] > new[0] and new[3] > new[1]):
                continue
            candidates.append(new)
    # Stage weights: with weight w the recorded loss is w times the head's own.
    if recipe == "mmdet":
        t, sampled, bbox_pred, cls_score = seen[2]
        plain = torch.nn.functional.cross_entropy(cls_score, sampled.labels)
        torch.testing.assert_close(losses["s2.loss_cls"].detach(), 0.25 * plain)


def test_scale_gradient():
    x = torch.randn(3, requires_grad=True)
    _ScaleGradient.apply(x, 1 / 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 1 / 3))


@pytest.mark.parametrize("merge", ["mean_logits", "mean_probs"])
def test_test_time_scores_and_boxes_against_their_formulas(merge):
    head = _head(score_merge=merge, score_thr=0.0, nms_iou=1.0, max_per_image=10_000).eval()
    outputs = []
    for box_head in head.bbox_head:
        box_head.register_forward_hook(lambda m, i, o: outputs.append(tuple(t.clone() for t in o)))
    rois_seen = []
    for extractor in head.bbox_roi_extractor:
        extractor.register_forward_hook(lambda m, i, o: rois_seen.append(i[1].clone()))
    proposals = _proposals()
    (result,) = head.predict(_feats(), proposals, [IMAGE])
    logits = [o[0] for o in outputs]
    if merge == "mean_logits":
        scores = torch.softmax(sum(logits) / 3, 1)
    else:
        scores = sum(torch.softmax(x, 1) for x in logits) / 3
    # Each stage's RoIs: the previous stage's decoded boxes, the first's the proposals.
    boxes = proposals[0].tolist()
    for t in range(3):
        torch.testing.assert_close(rois_seen[t][:, 1:], torch.tensor(boxes, dtype=torch.float64))
        stds = head.cfg.stage_target_stds[t]
        boxes = [
            _decode(b, d, stds, IMAGE) for b, d in zip(boxes, outputs[t][1].tolist(), strict=True)
        ]
    want = sorted(
        (float(scores[i, c]), *boxes[i], c) for i in range(len(boxes)) for c in range(NUM_CLASSES)
    )
    got = sorted(
        (s, *b, c)
        for s, b, c in zip(
            result.scores.tolist(), result.boxes.tolist(), result.labels.tolist(), strict=True
        )
    )
    assert len(got) == len(want)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-10)


def test_per_stage_masks_are_averaged_and_one_head_is_used_alone():
    head = _head().eval()
    probs = []
    for mask_head in head.mask_head:
        original = mask_head.predict_probs

        def recording(*args, original=original):
            out = original(*args)
            probs.append(out)
            return out

        mask_head.predict_probs = recording
    rois = torch.tensor([[0.0, 10.0, 8.0, 40.0, 30.0]], dtype=torch.float64)
    merged = head._mask_probs(_feats())(rois, torch.tensor([1]))
    assert len(probs) == 3
    torch.testing.assert_close(merged, (probs[0] + probs[1] + probs[2]) / 3)
    single = _head(mask_per_stage=False).eval()
    assert not isinstance(single.mask_head, torch.nn.ModuleList)
    direct = single.mask_head.predict_probs(
        _feats(), single.mask_roi_extractor, rois, torch.tensor([1])
    )
    torch.testing.assert_close(single._mask_probs(_feats())(rois, torch.tensor([1])), direct)


def test_mmdet_parameter_names():
    names = set(_head().state_dict())
    for t in range(3):
        assert f"bbox_head.{t}.shared_fcs.1.weight" in names
        assert f"bbox_head.{t}.fc_reg.weight" in names
        assert f"mask_head.{t}.convs.0.conv.weight" in names
    assert _head().bbox_head[0].fc_reg.out_features == 4  # class-agnostic


def test_config_rejects_inconsistent_stages():
    with pytest.raises(ValueError, match="one entry per stage"):
        CascadeRoIHeadConfig(stage_ious=(0.5, 0.6))
    with pytest.raises(ValueError, match="later_stages must be one of"):
        CascadeRoIHeadConfig(later_stages="bogus")
