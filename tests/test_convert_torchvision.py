"""``instseg convert --format torchvision``: torchvision's own detections as the reference.

``fixtures/torchvision/make_fixture.py`` ran torchvision 0.28's ``maskrcnn_resnet50_fpn``
and ``fasterrcnn_resnet50_fpn`` (91 classes, FrozenBN ResNet-50, as built for the COCO
weights) in a separate virtualenv, with weights and images drawn by the rules of
``torchvision_fixtures.py``, and recorded their RPN proposals, detections, RoI mask
probabilities and pasted masks. Here the same rules build a state dict under torchvision's
key names; it is converted, loaded into the ``torchvision_*`` configs, and run through
instseg's own test-time pipeline (resize, batch, predict). Both sides run in float64, so
the tolerances are tight and near-tied scores keep their order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instseg.configs import apply_overrides, get_config
from instseg.convert import ConversionError, convert_checkpoint, read_torchvision
from instseg.data.loader import pad_images
from instseg.data.transforms import resize_image
from instseg.runner import build_model, eval_transform, load_trained
from mmdet_fixtures import rle_decode
from torchvision_fixtures import (
    DETECTIONS,
    IMAGE_SIZES,
    MAX_SIZE,
    MIN_SIZE,
    PROPOSALS,
    rule_image,
    rule_weights,
)

FIXTURE = Path(__file__).parent / "fixtures" / "torchvision"


@pytest.fixture(scope="module")
def fixture():
    if not (FIXTURE / "outputs.safetensors").is_file():
        pytest.skip("torchvision fixture absent")
    keys = json.loads((FIXTURE / "keys.json").read_text())
    return keys, load_file(FIXTURE / "outputs.safetensors")


def _converted(tmp_path: Path, keys: dict, kind: str, config: str):
    """The rule's weights saved as torchvision saves a state dict, converted and loaded."""
    source = tmp_path / f"{kind}.pth"
    torch.save(rule_weights({k: tuple(v) for k, v in keys[kind].items()}), source)
    cfg = apply_overrides(
        get_config(config),
        [f"data.test_scale=[{MAX_SIZE},{MIN_SIZE}]", f"eval.max_dets={DETECTIONS}"],
    )
    cfg.model.roi_head.max_per_image = DETECTIONS
    cfg.model.rpn.test_max_per_image = PROPOSALS
    out = convert_checkpoint(source, "torchvision", cfg, tmp_path / f"{kind}.safetensors")
    return load_trained(out), source


def _predict(trained, seen: dict | None = None):
    """instseg's test-time path on the two images: the transform's sizes and infos, its
    resize and normalisation redone in float64 (the transform works in float32). With
    ``seen``, the mask head's RoI probabilities are recorded in ``seen["probs"]``."""
    transform = eval_transform(trained.cfg)
    data = trained.cfg.data
    mean, std = (
        torch.tensor(v, dtype=torch.float64).view(3, 1, 1)
        for v in (data.pixel_mean, data.pixel_std)
    )
    tensors, infos = [], []
    for i in range(2):
        image = rule_image(i)
        _, info = transform.prepare_image(image.numpy(), i)
        resized = resize_image(image.permute(2, 0, 1).double(), info.image_size)
        tensors.append((resized - mean) / std)
        infos.append(info)
    batch = pad_images(tensors, trained.cfg.train.size_divisor)
    model = trained.model.double()
    if seen is not None:
        mask_head = model.roi_head.mask_head
        predict_probs = mask_head.predict_probs

        def recorded(*args):
            seen["probs"] = predict_probs(*args)
            return seen["probs"]

        mask_head.predict_probs = recorded
    with torch.no_grad():  # model.predict's steps, keeping the proposals and features
        feats = model.features(batch)
        proposals = model.rpn_head.predict(feats, batch.image_sizes, batch.input_size)
        results = model.roi_head.predict(feats, proposals, batch.image_sizes, infos)
    return feats, infos, proposals, results


def _assert_detections(results, ref, kind, categories):
    for i, res in enumerate(results):
        assert len(res) == len(ref[f"{kind}.scores.{i}"]) == DETECTIONS
        ids = torch.tensor([categories[k].id for k in res.labels.tolist()])
        assert torch.equal(ids, ref[f"{kind}.labels.{i}"])
        torch.testing.assert_close(res.scores, ref[f"{kind}.scores.{i}"], rtol=0, atol=1e-9)
        # rtol: torchvision scales boxes back by size ratios it computes in float32.
        torch.testing.assert_close(res.boxes, ref[f"{kind}.boxes.{i}"], rtol=1e-7, atol=1e-7)


def test_torchvision_mask_rcnn_gives_torchvisions_detections(fixture, tmp_path):
    keys, ref = fixture
    trained, _ = _converted(tmp_path, keys, "mask", "torchvision_maskrcnn_resnet50_fpn")
    assert len(trained.categories) == 90
    assert trained.categories[11].id == 12 and trained.categories[11].name == "N/A"
    assert trained.categories[0].name == "person" and trained.categories[89].id == 90
    seen = {}
    feats, infos, proposals, results = _predict(trained, seen)
    assert [list(info.image_size) for info in infos] == keys["mask_resized_sizes"]
    assert feats["p6"].shape[-2:] == (5, 5)  # 288 x 288 input: anchors step 57, not 64
    for i, props in enumerate(proposals):
        assert len(props) == PROPOSALS
        torch.testing.assert_close(props, ref[f"mask.proposals.{i}"], rtol=0, atol=1e-7)
    _assert_detections(results, ref, "mask", trained.categories)
    probs = seen["probs"].split([len(res) for res in results])
    for i, res in enumerate(results):
        # The mask head's RoI-resolution probabilities of the detections, then the pasted masks.
        torch.testing.assert_close(probs[i].float(), ref[f"mask.roi_probs.{i}"], rtol=0, atol=1e-6)
        # Pasted: equal wherever torchvision's probability is not within 1e-3 of 0.5.
        h, w = IMAGE_SIZES[i]
        want = rle_decode(ref[f"mask.masks.{i}_rle_counts"], ref[f"mask.masks.{i}_rle_lens"], h, w)
        near = rle_decode(
            ref[f"mask.near_half.{i}_rle_counts"], ref[f"mask.near_half.{i}_rle_lens"], h, w
        )
        assert want.any(dim=(1, 2)).sum() > DETECTIONS // 2
        assert torch.equal(res.masks & ~near, want & ~near)
    meta = json.loads((tmp_path / "mask.json").read_text())["state"]
    assert meta["converted_from"]["format"] == "torchvision"
    assert meta["converted_from"]["meta"] == {"classifier_rows": 91}


def test_torchvision_faster_rcnn_gives_torchvisions_detections(fixture, tmp_path):
    keys, ref = fixture
    trained, _ = _converted(tmp_path, keys, "faster", "torchvision_fasterrcnn_resnet50_fpn")
    _, _, _, results = _predict(trained)
    _assert_detections(results, ref, "faster", trained.categories)
    assert all(res.masks is None for res in results)


def test_torchvision_version1_names_and_wrappers_convert_the_same(fixture, tmp_path):
    """torchvision's ``_version`` 1 module names (FPN blocks without ``.0``, ``rpn.head.conv``,
    ``mask_fcn{i}``) and a reference-script style ``{"model": ...}`` give the same weights."""
    keys, _ = fixture
    state = rule_weights({k: tuple(v) for k, v in keys["mask"].items()})
    old = {}
    for key, value in state.items():
        key = key.replace("fpn.inner_blocks.0.0.", "fpn.inner_blocks.0.")
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            key = key.replace(
                f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}."
            )
        old[key] = value
    assert set(old) != set(state)
    torch.save(state, tmp_path / "new.pth")
    torch.save({"model": old, "epoch": 25}, tmp_path / "old.pth")
    wa = read_torchvision(tmp_path / "new.pth").state
    wb = read_torchvision(tmp_path / "old.pth").state
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    model = build_model(get_config("torchvision_maskrcnn_resnet50_fpn"), 90)
    assert set(wa) == set(model.state_dict())
    # Background row moved last, its box rows and mask logit dropped (spec §13.4).
    cls = state["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(wa["roi_head.bbox_head.fc_cls.weight"][-1], cls[0])
    assert torch.equal(wa["roi_head.bbox_head.fc_cls.weight"][11], cls[12])
    reg = state["roi_heads.box_predictor.bbox_pred.weight"]
    assert torch.equal(wa["roi_head.bbox_head.fc_reg.weight"][44:48], reg[48:52])
    logits = state["roi_heads.mask_predictor.mask_fcn_logits.bias"]
    assert torch.equal(wa["roi_head.mask_head.conv_logits.bias"], logits[1:])


def test_torchvision_without_coco_rows_needs_categories(fixture, tmp_path):
    keys, _ = fixture
    shapes = {k: tuple(v) for k, v in keys["faster"].items()}
    shapes["roi_heads.box_predictor.cls_score.weight"] = (3, 1024)
    shapes["roi_heads.box_predictor.cls_score.bias"] = (3,)
    shapes["roi_heads.box_predictor.bbox_pred.weight"] = (12, 1024)
    shapes["roi_heads.box_predictor.bbox_pred.bias"] = (12,)
    torch.save(rule_weights(shapes), tmp_path / "two.pth")
    cfg = get_config("torchvision_fasterrcnn_resnet50_fpn")
    with pytest.raises(ConversionError, match=r"has 2 classes .* --categories"):
        convert_checkpoint(tmp_path / "two.pth", "torchvision", cfg, tmp_path / "x.safetensors")
    from instseg.data import Category

    cats = [Category(1, "cell"), Category(2, "nucleus")]
    out = convert_checkpoint(
        tmp_path / "two.pth", "torchvision", cfg, tmp_path / "x.safetensors", cats
    )
    assert load_file(out)["roi_head.bbox_head.fc_cls.weight"].shape == (3, 1024)


def test_torchvision_recipe_fields_are_validated_and_mean_what_the_spec_says():
    from instseg.modeling.anchors import AnchorGenerator
    from instseg.modeling.dense_heads import RPNConfig
    from instseg.modeling.roi import BoxHeadConfig, RoIExtractorConfig, RoIHeadConfig
    from instseg.modeling.roi.extractor import map_roi_levels

    # Spec §13.5: size 32, ratio 0.5 -> mmdet [-22.63, -11.31, 22.63, 11.31], torchvision
    # [-23, -11, 23, 11].
    floats = AnchorGenerator((4,), (0.5,), (8.0,)).base_anchors[0][0]
    rounded = AnchorGenerator((4,), (0.5,), (8.0,), round_base=True).base_anchors[0][0]
    torch.testing.assert_close(
        floats, torch.tensor([-22.627, -11.314, 22.627, 11.314]), atol=1e-3, rtol=0
    )
    assert rounded.tolist() == [-23.0, -11.0, 23.0, 11.0]
    # Centres step by input // cells when asked (torchvision), by the stride otherwise.
    gen = AnchorGenerator((64,), (1.0,), (8.0,), round_base=True)
    by_input = gen.grid_anchors([(5, 5)], torch.device("cpu"), (288, 288))[0]
    by_stride = gen.grid_anchors([(5, 5)], torch.device("cpu"))[0]
    assert by_input[1, 0] - by_input[0, 0] == 57 and by_stride[1, 0] - by_stride[0, 0] == 64
    # Level mapping: the eps inside (mmdet) or after (torchvision) the log. Sides of 112 px
    # map to P3 in both; the thresholds below it differ: mmdet's is 112 - 5.6e-5,
    # torchvision's 112 * 2**-1e-6 = 112 - 7.8e-5, so a side of 112 - 6.5e-5 splits them.
    rois = torch.tensor([[0, 0, 0, 112.0, 112.0], [0, 0, 0, 111.999935, 111.999935]])
    assert map_roi_levels(rois, 4).tolist() == [1, 0]
    assert map_roi_levels(rois, 4, mapping="torchvision").tolist() == [1, 1]
    for make, field, bad in (
        (RPNConfig, "anchor_strides", "image"),
        (RPNConfig, "delta_clip", "lower"),
        (BoxHeadConfig, "delta_clip", "both"),
        (RoIExtractorConfig, "level_mapping", "detectron2"),
        (RoIHeadConfig, "mask_paste", "nearest"),
    ):
        with pytest.raises(ValueError, match=field):
            make(**{field: bad})
    with pytest.raises(ValueError, match="min_box_size"):
        RoIHeadConfig(min_box_size=-1.0)


def test_evaluation_leaves_out_categories_the_annotations_lack(caplog):
    """torchvision's 90 classes include ten "N/A" ids COCO's json lacks: their detections are
    left out of scoring (COCO's evaluation ignores them) and counted in a warning."""
    from types import SimpleNamespace

    from instseg.engine.inference import _annotated_categories_only

    dataset = SimpleNamespace(annotated_category_ids={1, 2}, ann_file="val.json")
    results = [{"category_id": c} for c in (1, 12, 2, 12, 26)]
    with caplog.at_level("WARNING"):
        kept = _annotated_categories_only(results, dataset)
    assert [r["category_id"] for r in kept] == [1, 2]
    assert "left out 3 detection(s) of categories [12, 26]" in caplog.text
