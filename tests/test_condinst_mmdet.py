"""Our FCOS and CondInst against mmdetection 3.3's, with identical weights and inputs.

``fixtures/condinst_mmdet`` holds a narrow random model of mmdet's CondInst config (R-18 at
width 8, 16-channel FPN and towers, 5 classes; its norm layers randomised so that scores
spread), two padded input images, GT, and what mmdet computed from them (raw head outputs,
mask features, training losses, positives, detections with masks in the original frame); the
FCOS fixture is mmdet's FCOS "tricks" head with the same weights. ``make_fixture.py`` made
them in the mmdetection environment (see its README). mmcv's CPU NMS refuses float64, so
the fixtures are float32 and the tolerances are float32's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instseg.modeling.backbone import ResNetConfig
from instseg.modeling.condinst import CondInstMaskHeadConfig
from instseg.modeling.dense_heads import FCOSHeadConfig
from instseg.modeling.detectors import OneStageConfig
from instseg.modeling.neck import FPNConfig
from instseg.structures import InstanceTargets
from mmdet_fixtures import assert_detections_equal, mmdet_batch, rle_decode

FIXTURES = Path(__file__).parent / "fixtures" / "condinst_mmdet"
NUM_CLASSES = 5


def _config(with_mask: bool) -> OneStageConfig:
    """Our config of the fixture's narrowed mmdet model."""
    mask = CondInstMaskHeadConfig(branch_channels=16, branch_convs=2) if with_mask else None
    return OneStageConfig(
        # mmdet's operation order (conv, then BN): folding the BN rounds differently, which
        # reorders near-tied random-weight RPN scores.
        backbone=ResNetConfig(
            depth=18, base_width=8, norm="BN", frozen_stages=1, norm_eval=True, fold_norm=False
        ),
        neck=FPNConfig(
            out_channels=16,
            num_outs=5,
            start_level=1,
            add_extra_convs="on_output",
            relu_before_extra_convs=True,
        ),
        bbox_head=FCOSHeadConfig(
            stacked_convs=2,
            feat_channels=16,
            num_groups=4,
            center_from_mask=with_mask,
        ),
        mask_head=mask,
    )


@pytest.fixture(scope="module")
def fixture():
    if not (FIXTURES / "condinst_state.safetensors").is_file():
        pytest.skip("mmdet CondInst fixture absent")
    state = load_file(FIXTURES / "condinst_state.safetensors")
    inputs = load_file(FIXTURES / "inputs.safetensors")["inputs_x32"].float() / 32
    io = {name: load_file(FIXTURES / f"{name}_io.safetensors") for name in ("condinst", "fcos")}
    meta = json.loads((FIXTURES / "condinst_meta.json").read_text())
    return state, inputs, io, meta


def _model(state: dict, with_mask: bool):
    torch.manual_seed(0)
    model = _config(with_mask).build(NUM_CLASSES)
    ours = model.state_dict()
    wanted = {k: v for k, v in state.items() if with_mask or k in ours}
    assert set(ours) == set(wanted), set(ours) ^ set(wanted)
    model.load_state_dict(wanted, strict=True)
    return model


def _targets(io: dict, with_mask: bool) -> list[InstanceTargets]:
    targets = []
    for i in range(2):
        masks = None
        if with_mask:
            key = f"gt_masks.{i}"
            masks = rle_decode(io[key + "_rle_counts"], io[key + "_rle_lens"], 224, 320)
        targets.append(InstanceTargets(io[f"gt_boxes.{i}"], io[f"gt_labels.{i}"], masks))
    return targets


def test_state_dict_keys_are_mmdets(fixture):
    state, _, _, meta = fixture
    model = _config(True).build(NUM_CLASSES)
    # Same names in the same order as mmdet's state_dict (the safetensors file sorts them).
    assert list(model.state_dict()) == meta["state_dict_keys"]
    assert set(meta["state_dict_keys"]) == set(state)


def test_raw_head_outputs_and_mask_features_equal_mmdets(fixture):
    state, inputs, io, meta = fixture
    ref = io["condinst"]
    model = _model(state, True).eval()
    images, _ = mmdet_batch(inputs, meta)
    with torch.no_grad():
        feats = model.features(images)
        out = model.bbox_head(feats)
        mask_feat = model.mask_head.mask_feature_head(feats)
    for level in range(5):
        torch.testing.assert_close(out.cls[level], ref[f"cls_score.{level}"], rtol=1e-4, atol=1e-4)
        # mmdet multiplies the distances by the stride in eval mode; we do it in predict.
        stride = 8 * 2**level
        torch.testing.assert_close(
            out.bbox[level] * stride, ref[f"bbox_pred.{level}"], rtol=1e-4, atol=1e-3
        )
        torch.testing.assert_close(
            out.centerness[level], ref[f"centerness.{level}"], rtol=1e-4, atol=1e-4
        )
        if f"param_pred.{level}" in ref:
            torch.testing.assert_close(
                out.params[level], ref[f"param_pred.{level}"], rtol=1e-4, atol=1e-4
            )
    torch.testing.assert_close(mask_feat, ref["mask_feat"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["condinst", "fcos"])
def test_detections_equal_mmdets(fixture, name):
    state, inputs, io, meta = fixture
    ref = io[name]
    with_mask = name == "condinst"
    model = _model(state, with_mask).eval()
    images, infos = mmdet_batch(inputs, meta)
    with torch.no_grad():
        results = model.predict(images, infos)
    assert_detections_equal(results, ref, meta["img_metas"])


@pytest.mark.parametrize("name", ["condinst", "fcos"])
def test_training_losses_equal_mmdets(fixture, name):
    state, inputs, io, meta = fixture
    ref = io[name]
    with_mask = name == "condinst"
    model = _model(state, with_mask).train()
    images, _ = mmdet_batch(inputs, meta)
    losses = model(images, _targets(io["condinst"], with_mask))
    expected = {k[len("loss.") :]: v for k, v in ref.items() if k.startswith("loss.")}
    assert set(losses) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(losses[key].detach(), value, rtol=1e-4, atol=1e-5)


def test_positives_equal_mmdets(fixture):
    state, inputs, io, meta = fixture
    ref = io["condinst"]
    model = _model(state, True).train()
    images, _ = mmdet_batch(inputs, meta)
    targets = _targets(ref, True)
    with torch.no_grad():
        _, positives = model.bbox_head.loss(model.bbox_head(model.features(images)), targets)
    for i, pos in enumerate(positives):
        assert torch.equal(pos.index, ref[f"pos_inds.{i}"])
        assert torch.equal(pos.gt_index, ref[f"pos_gt_inds.{i}"])
