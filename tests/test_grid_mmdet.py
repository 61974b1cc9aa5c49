"""Our Grid R-CNN against mmdetection 3.3's ``GridRoIHead``/``GridHead`` with identical
weights and inputs.

``fixtures/grid_mmdet`` holds a narrow random model of mmdet's
``grid-rcnn_r50_fpn_gn-head_2x_coco`` (R-18 at width 8, 16-channel FPN, 32-wide box FCs,
8 channels per grid point, 5 classes; norms randomised, the classifier scaled per class so
that scores spread), the two padded images of the CondInst and Cascade fixtures, and what
mmdet computed: RPN proposals, box logits, the detections before and after the grid
refinement, heatmaps, and the jittered RoIs, targets and losses of a training step.
``make_fixture.py`` made them in the mmdetection environment (see its README); float32.
"""

from __future__ import annotations

import pytest
import torch

from instseg.modeling.backbone import ResNetConfig
from instseg.modeling.dense_heads import RPNConfig
from instseg.modeling.detectors import TwoStageConfig
from instseg.modeling.neck import FPNConfig
from instseg.modeling.roi import BoxHeadConfig, GridHeadConfig, GridRoIHeadConfig, SampledRoIs
from instseg.structures import InstanceTargets
from mmdet_fixtures import assert_detections_equal, load_mmdet_fixture, mmdet_batch

NUM_CLASSES = 5


def _config() -> TwoStageConfig:
    return TwoStageConfig(
        # mmdet's operation order (conv, then BN): folding the BN rounds differently, which
        # reorders near-tied random-weight RPN scores.
        backbone=ResNetConfig(
            depth=18, base_width=8, norm="BN", frozen_stages=1, norm_eval=True, fold_norm=False
        ),
        neck=FPNConfig(out_channels=16, num_outs=5),
        rpn=RPNConfig(train_max_per_image=2000, loss_bbox_beta=1.0 / 9.0),
        roi_head=GridRoIHeadConfig(
            box_head=BoxHeadConfig(fc_channels=32, with_reg=False),
            grid_head=GridHeadConfig(point_feat_channels=8),
        ),
    )


@pytest.fixture(scope="module")
def fixture():
    torch.manual_seed(0)
    model = _config().build(NUM_CLASSES)
    inputs, io, meta = load_mmdet_fixture("grid", model, inputs_from="cascade_mmdet")
    return model, inputs, io, meta


def test_box_stage_heatmaps_and_refined_boxes_equal_mmdets(fixture):
    model, inputs, io, meta = fixture
    model.eval()
    images, _ = mmdet_batch(inputs, meta)
    head = model.roi_head
    with torch.no_grad():
        feats = model.features(images)
        proposals = model.rpn_head.predict(feats, images.image_sizes)
        for i, props in enumerate(proposals):
            torch.testing.assert_close(props, io[f"rpn_proposals.{i}"], rtol=1e-5, atol=1e-3)
        rois = torch.cat([torch.full((1000, 1), float(i)) for i in range(2)])
        rois = torch.cat([rois, torch.cat([io[f"rpn_proposals.{i}"] for i in range(2)])], 1)
        cls_score, _ = head.bbox_head(head.bbox_roi_extractor(feats, rois))
        torch.testing.assert_close(cls_score, io["cls_score"], rtol=1e-4, atol=1e-4)
        for i in range(2):
            boxes = io[f"bbox_det_boxes.{i}"]
            det_rois = torch.cat([torch.full((len(boxes), 1), float(i)), boxes], 1)
            fused, _ = head.grid_head(head.grid_roi_extractor(feats, det_rois))
            torch.testing.assert_close(fused[:2], io[f"grid_fused.{i}"], rtol=1e-4, atol=1e-4)
            probs = fused.sigmoid().flatten(2)
            assert torch.equal(probs.argmax(2), io[f"grid_argmax.{i}"])
            torch.testing.assert_close(probs.amax(2), io[f"grid_maxprob.{i}"])
            refined = head.grid_head.decode(fused, boxes)
            torch.testing.assert_close(refined, io[f"det_boxes_img.{i}"], rtol=0, atol=1e-3)


def test_detections_equal_mmdets(fixture):
    model, inputs, io, meta = fixture
    model.eval()
    images, infos = mmdet_batch(inputs, meta)
    with torch.no_grad():
        results = model.predict(images, infos)
    assert_detections_equal(results, io, meta["img_metas"])
    # mmdet leaves refined boxes outside the image (its clamp is a no-op); so do we.
    assert any((r.boxes < 0).any() for r in results)


def test_classification_and_grid_losses_on_mmdets_rois_equal_mmdets(fixture):
    model, inputs, io, meta = fixture
    model.train()
    images, _ = mmdet_batch(inputs, meta)
    head = model.roi_head
    feats = model.features(images)
    rois, labels = io["train.rois"], io["train.labels"]
    sampled = SampledRoIs(
        boxes=[rois[rois[:, 0] == i, 1:] for i in range(2)],
        labels=labels,
        num_classes=NUM_CLASSES,
        pos_boxes=[],
        pos_gt_index=[],
        pos_gt_boxes=[],
    )
    cls_score, bbox_pred = head.bbox_head(head.bbox_roi_extractor(feats, sampled.rois))
    loss = head.bbox_head.loss(cls_score, bbox_pred, sampled)
    torch.testing.assert_close(loss["loss_cls"].detach(), io["loss.loss_cls"], rtol=1e-4, atol=0)
    grid_rois = io["train.grid_rois"]
    target = head.grid_head.targets(grid_rois[:, 1:], io["train.grid_gt_boxes"])
    pos = io["train.grid_targets_pos"].long()
    expected = torch.zeros_like(target)
    expected[pos[:, 0], pos[:, 1], pos[:, 2], pos[:, 3]] = 1
    assert torch.equal(target, expected)
    fused, unfused = head.grid_head(head.grid_roi_extractor(feats, grid_rois))
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    torch.testing.assert_close(
        15 * bce(fused, target).detach(), io["loss.grid_fused"], rtol=1e-4, atol=0
    )
    torch.testing.assert_close(
        15 * bce(unfused, target).detach(), io["loss.grid_unfused"], rtol=1e-4, atol=0
    )


def test_jitter_with_mmdets_offsets(fixture):
    _, _, io, meta = fixture
    from instseg.modeling.roi.grid import jitter_boxes

    before, offsets = io["train.grid_rois_prejitter"], io["train.grid_jitter_offsets"]
    for i, m in enumerate(meta["img_metas"]):
        rows = before[:, 0] == i
        got = jitter_boxes(before[rows, 1:], 0.15, tuple(m["img_shape"]), offsets[rows])
        torch.testing.assert_close(got, io["train.grid_rois"][rows, 1:], rtol=0, atol=1e-4)


def test_training_step_runs_with_mmdets_loss_names(fixture):
    model, inputs, io, meta = fixture
    model.train()
    images, _ = mmdet_batch(inputs, meta)
    targets = [InstanceTargets(io[f"gt_boxes.{i}"], io[f"gt_labels.{i}"]) for i in range(2)]
    torch.manual_seed(1)
    losses = model(images, targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_grid"}
    sum(losses.values()).backward()
