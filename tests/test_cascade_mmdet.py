"""Our Cascade Mask R-CNN against mmdetection 3.3's ``CascadeRoIHead``, with identical
weights and inputs.

``fixtures/cascade_mmdet`` holds a narrow random model of mmdet's
``cascade-mask-rcnn_r50_fpn_1x_coco`` (R-18 at width 8, 16-channel FPN, 32-wide box FCs,
5 classes; norms randomised and classifiers scaled so that scores spread), the two padded
images of the CondInst fixture, and what mmdet computed: RPN proposals, each stage's RoIs
and raw outputs, detections with masks, and the sampled RoIs and losses of a training step.
``make_fixture.py`` made them in the mmdetection environment (see its README); float32.
"""

from __future__ import annotations

import pytest
import torch

from instseg.modeling.backbone import ResNetConfig
from instseg.modeling.dense_heads import RPNConfig
from instseg.modeling.detectors import TwoStageConfig
from instseg.modeling.neck import FPNConfig
from instseg.modeling.roi import BoxHeadConfig, CascadeRoIHeadConfig, SampledRoIs
from instseg.structures import InstanceTargets
from mmdet_fixtures import assert_detections_equal, load_mmdet_fixture, mmdet_batch, rle_decode

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
        roi_head=CascadeRoIHeadConfig(
            box_head=BoxHeadConfig(fc_channels=32, class_agnostic=True, loss_bbox_beta=1.0)
        ),
    )


@pytest.fixture(scope="module")
def fixture():
    torch.manual_seed(0)
    model = _config().build(NUM_CLASSES)
    inputs, io, meta = load_mmdet_fixture("cascade", model)
    return model, inputs, io, meta


def _targets(io: dict) -> list[InstanceTargets]:
    return [
        InstanceTargets(
            io[f"gt_boxes.{i}"],
            io[f"gt_labels.{i}"],
            rle_decode(io[f"gt_masks.{i}_rle_counts"], io[f"gt_masks.{i}_rle_lens"], 224, 320),
        )
        for i in range(2)
    ]


def test_rpn_proposals_and_every_stage_equal_mmdets(fixture):
    model, inputs, io, meta = fixture
    model.eval()
    images, _ = mmdet_batch(inputs, meta)
    with torch.no_grad():
        feats = model.features(images)
        proposals = model.rpn_head.predict(feats, images.image_sizes)
        for i, props in enumerate(proposals):
            torch.testing.assert_close(props, io[f"rpn_proposals.{i}"], rtol=1e-5, atol=1e-3)
        head = model.roi_head
        for t in range(3):
            # Each stage on mmdet's RoIs for that stage, so errors do not compound.
            rois = io[f"stage_rois.{t}"]
            cls_score, bbox_pred = head._box_forward(t, feats, rois)
            torch.testing.assert_close(cls_score, io[f"cls_score.{t}"], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(bbox_pred, io[f"bbox_pred.{t}"], rtol=1e-4, atol=1e-4)
            if t < 2:
                refined = torch.cat(
                    [
                        head._regress(t, boxes, deltas, deltas.new_zeros(0).long(), size)
                        for boxes, deltas, size in zip(
                            rois[:, 1:].split(1000),
                            bbox_pred.split(1000),
                            images.image_sizes,
                            strict=True,
                        )
                    ]
                )
                want = io[f"stage_rois.{t + 1}"][:, 1:]
                torch.testing.assert_close(refined, want, rtol=1e-5, atol=1e-3)


def test_detections_and_masks_equal_mmdets(fixture):
    model, inputs, io, meta = fixture
    model.eval()
    images, infos = mmdet_batch(inputs, meta)
    with torch.no_grad():
        results = model.predict(images, infos)
    assert_detections_equal(results, io, meta["img_metas"])


def test_each_mask_heads_probabilities_equal_mmdets(fixture):
    model, inputs, io, meta = fixture
    model.eval()
    images, _ = mmdet_batch(inputs, meta)
    head = model.roi_head
    with torch.no_grad():
        feats = model.features(images)
        for i in range(2):
            boxes = io[f"det_boxes_img.{i}"][:5]
            rois = torch.cat([torch.full((5, 1), float(i)), boxes], 1)
            labels = io[f"det_labels.{i}"][:5]
            for t in range(3):
                probs = head.mask_head[t].predict_probs(
                    feats, head.mask_roi_extractor[t], rois, labels
                )
                torch.testing.assert_close(probs, io[f"mask_prob.{t}.{i}"], rtol=1e-4, atol=1e-4)


def test_stage_losses_on_mmdets_sampled_rois_equal_mmdets(fixture):
    """The random samplers cannot be matched; on the RoIs mmdet sampled, each stage's box and
    mask losses (times the stage weight) equal mmdet's."""
    model, inputs, io, meta = fixture
    model.train()
    images, _ = mmdet_batch(inputs, meta)
    targets = _targets(io)
    head = model.roi_head
    feats = model.features(images)
    weights = head.cfg.stage_loss_weights
    for t in range(3):
        rois, labels = io[f"train.rois.{t}"], io[f"train.labels.{t}"]
        per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
        is_pos = labels < NUM_CLASSES
        pos_boxes = [rois[(rois[:, 0] == i) & is_pos, 1:] for i in range(2)]
        gt_index = [io[f"train.pos_gt_inds.{t}.{i}"] for i in range(2)]
        sampled = SampledRoIs(
            boxes=per_image,
            labels=labels,
            num_classes=NUM_CLASSES,
            pos_boxes=pos_boxes,
            pos_gt_index=gt_index,
            pos_gt_boxes=[targets[i].boxes[gt_index[i]] for i in range(2)],
        )
        cls_score, bbox_pred = head._box_forward(t, feats, sampled.rois)
        box = head.bbox_head[t].loss(cls_score, bbox_pred, sampled)
        mask = head.mask_head[t].loss(feats, head.mask_roi_extractor[t], sampled, targets)
        for name, value in [*box.items(), *mask.items()]:
            torch.testing.assert_close(
                weights[t] * value.detach(), io[f"loss.s{t}.{name}"], rtol=1e-4, atol=1e-5
            )


def test_training_step_runs_with_mmdets_loss_names(fixture):
    model, inputs, io, meta = fixture
    model.train()
    images, _ = mmdet_batch(inputs, meta)
    torch.manual_seed(1)
    losses = model(images, _targets(io))
    expected = {k[len("loss.") :] for k in io if k.startswith("loss.") and not k.endswith("acc")}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
