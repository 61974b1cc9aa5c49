"""The model zoo and dotted-key overrides."""

import json

import pytest

from instseg.configs import (
    ZOO,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    from_dict,
    get_config,
    to_dict,
)


def test_every_zoo_config_builds_and_round_trips_through_json():
    assert {
        "faster_rcnn_r50_fpn_1x_coco",
        "mask_rcnn_r50_fpn_1x_coco",
        "faster_rcnn_r101_fpn_1x_coco",
        "mask_rcnn_r101_fpn_1x_coco",
        "faster_rcnn_r18_fpn_small",
        "mask_rcnn_r18_fpn_small",
    } <= set(ZOO)
    for name in ZOO:
        cfg = get_config(name)
        assert cfg.name == name and cfg.description
        with_masks = name.startswith(
            ("mask", "refinemask", "condinst", "cascade", "torchvision_mask")
        )
        assert cfg.model.with_masks == with_masks
        assert (cfg.model.kind == "one_stage") == name.startswith(("fcos", "condinst"))
        if cfg.model.kind == "two_stage":
            mask_head = cfg.model.roi_head.mask_head
            kind = getattr(mask_head, "kind", None)
            assert (kind == "refinemask") == name.startswith("refinemask")
        rebuilt = from_dict(ExperimentConfig, json.loads(json.dumps(to_dict(cfg))))
        assert rebuilt == cfg


def test_condinst_and_fcos_recipes_match_spec():
    """Spec §4.2, §4.3, §4.5, §4.6."""
    cfg = get_config("condinst_r50_fpn_ms-poly-90k_coco_instance")
    model = cfg.model
    assert model.backbone.depth == 50 and model.backbone.frozen_stages == 1
    assert model.backbone.norm_eval
    neck = model.neck
    assert (neck.start_level, neck.add_extra_convs, neck.relu_before_extra_convs) == (
        1,
        "on_output",
        True,
    )
    head = model.bbox_head
    assert model.mask_head.num_params == 169
    assert (head.stacked_convs, head.feat_channels, head.norm, head.num_groups) == (
        4,
        256,
        "GN",
        32,
    )
    assert head.center_sampling and head.center_sample_radius == 1.5 and head.center_from_mask
    assert head.norm_on_bbox and head.centerness_on_reg and head.conv_bias
    assert head.regress_ranges[0] == (-1.0, 64.0) and head.regress_ranges[-1][0] == 512.0
    assert (head.score_thr, head.nms_pre, head.nms_iou, head.max_per_image) == (
        0.05,
        1000,
        0.6,
        100,
    )
    mask = model.mask_head
    assert mask.branch_levels == ("p3", "p4", "p5") and mask.branch_channels == 128
    assert (mask.branch_convs, mask.out_channels, mask.branch_norm) == (4, 8, "BN")
    assert (mask.size_of_interest, mask.mask_out_stride, mask.max_masks_to_train) == (8, 4, 300)
    s = cfg.train.schedule
    assert cfg.train.max_iters == 90_000 and cfg.train.batch_size == 16
    assert (s.base_lr, s.warmup_iters, s.warmup_ratio, s.steps) == (
        0.01,
        1000,
        0.001,
        (60_000, 80_000),
    )
    assert s.grad_clip is None
    assert [sc[1] for sc in cfg.data.train_scales] == [640, 672, 704, 736, 768, 800]
    fcos = get_config("fcos_r50_fpn_1x_coco")
    assert fcos.model.mask_head is None
    assert not fcos.model.bbox_head.center_from_mask  # FCOS samples around box centres
    assert fcos.train.schedule.grad_clip == 35.0 and fcos.train.schedule.base_lr == 0.01
    fs = fcos.train.schedule
    assert (fs.warmup, fs.warmup_iters, fs.warmup_ratio) == ("constant", 500, 1 / 3)
    assert (fs.bias_lr_mult, fs.bias_decay_mult) == (2.0, 0.0)


def test_refinemask_recipe_matches_spec():
    """Spec §3.7 and §3.9: the head values, the loss weights, the clip and the schedules."""
    cfg = get_config("refinemask_r50_fpn_1x_coco")
    base = get_config("mask_rcnn_r50_fpn_1x_coco")
    roi = cfg.model.roi_head
    assert roi.mask_head.kind == "refinemask"
    assert roi.box_head.loss_cls_weight == 2.0 and roi.box_head.loss_bbox_weight == 2.0
    assert cfg.train.schedule.grad_clip == 35.0 and base.train.schedule.grad_clip is None
    head = roi.mask_head
    assert head.variant == "refinemask" and head.conv_channels == 256
    assert (head.num_convs_instance, head.num_convs_semantic) == (2, 4)
    assert head.dilations == (1, 3, 5) and head.semantic_level == "p2" and head.mask_use_sigmoid
    assert head.stage_sizes == (14, 28, 56, 112) and not head.class_agnostic_last_stage
    assert head.stage_loss_weights == (0.25, 0.5, 0.75, 1.0) and head.semantic_loss_weight == 1.0
    assert head.boundary_width == 2 and head.start_stage == 1 and head.test_chunk_size == 100
    assert roi.mask_extractor == base.model.roi_head.mask_extractor  # RoIAlign 14, sampling 0
    assert cfg.train.max_iters == base.train.max_iters and cfg.model.backbone == base.model.backbone
    twice = get_config("refinemask_r50_fpn_2x_coco").train
    assert twice.max_iters == 177430 and twice.schedule.steps == (118287, 162645)  # 24, [16, 22]
    assert get_config("refinemask_r101_fpn_1x_coco").model.backbone.depth == 101
    fast = get_config("refinemask_r50_fpn_faster_better_1x_coco").model.roi_head.mask_head
    assert fast.variant == "faster_better" and fast.class_agnostic_last_stage
    assert fast.stage_loss_weights == (0.5, 0.75, 0.75, 1.0) and not fast.pre_upsample_last_stage


def test_coco_1x_recipe_matches_spec():
    cfg = get_config("mask_rcnn_r50_fpn_1x_coco")
    # 12 epochs of 118,287 images at 16 per iteration; steps after epochs 8 and 11.
    assert cfg.train.batch_size == 16 and cfg.train.max_iters == 88715
    assert cfg.train.schedule.steps == (59144, 81322)
    assert cfg.train.schedule.base_lr == 0.02 and cfg.train.schedule.warmup_iters == 500
    assert cfg.train.schedule.warmup_ratio == 0.001 and cfg.train.schedule.weight_decay == 1e-4
    assert cfg.model.backbone.depth == 50 and cfg.model.backbone.frozen_stages == 1
    assert cfg.model.backbone.norm_eval and cfg.model.rpn.nms_iou == 0.7
    assert cfg.model.roi_head.sampler.num == 512 and cfg.model.roi_head.sampler.pos_fraction == 0.25
    assert cfg.model.roi_head.box_extractor.sampling_ratio == 0
    assert cfg.model.roi_head.score_thr == 0.05 and cfg.model.roi_head.max_per_image == 100
    assert get_config("mask_rcnn_r101_fpn_1x_coco").model.backbone.depth == 101
    assert get_config("mask_rcnn_r50_fpn_1x_coco") is not get_config("mask_rcnn_r50_fpn_1x_coco")


def test_overrides_convert_to_the_declared_types():
    cfg = get_config("mask_rcnn_r18_fpn_small")
    apply_overrides(
        cfg,
        [
            "model.backbone.depth=34",
            "train.schedule.steps=(10, 20)",
            "data.train_scales=((512, 320), (600, 360))",
            "model.backbone.weights=/tmp/r18.pth",
            "model.roi_head.mask_head=none",
            "train.schedule.base_lr=0.01",
            "num_classes=5",
        ],
    )
    assert cfg.model.backbone.depth == 34
    assert cfg.train.schedule.steps == (10, 20)
    assert cfg.data.train_scales == ((512, 320), (600, 360))
    assert cfg.model.backbone.weights == "/tmp/r18.pth"
    assert cfg.model.roi_head.mask_head is None and not cfg.model.with_masks
    assert cfg.train.schedule.base_lr == 0.01 and cfg.num_classes == 5
    apply_overrides(cfg, ["model.backbone.weights=none", "num_classes=None"])
    assert cfg.model.backbone.weights is None and cfg.num_classes is None


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.backbone.detph=50", r"unknown key 'model.backbone.detph'.*valid: .*depth"),
        ("modle.backbone.depth=50", r"unknown key 'modle.backbone.depth'"),
        ("model.backbone.depth=fifty", r"model.backbone.depth: expected int"),
        ("model.backbone.depth=19", r"model.backbone.depth='19'"),
        ("model.roi_head.with_mask=true", r"roi_head has no 'with_mask' \(valid: .*mask_head"),
        (
            "model.roi_head.mask_head=maybe",
            r"mask_head: unknown choice 'maybe'; allowed: fcn, refinemask, ifr, none",
        ),
        (
            "model.roi_head.box_extractor=x",
            r"box_extractor: unknown choice 'x'; allowed: single, generic$",
        ),
        ("model.roi_head.mask_head.stage_sizes=(7,14)", r"mask_head has no 'stage_sizes'"),
        ("model.rpn.in_channels=16", r"rpn has no 'in_channels'"),
        ("train.schedule.steps=(1, x)", r"train.schedule.steps: expected a tuple"),
        ("model.backbone", r"must look like key=value"),
        ("model.backbone.depth.x=1", r"not a section"),
    ],
)
def test_override_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(get_config("mask_rcnn_r18_fpn_small"), [override])


def test_unknown_config_name_lists_known_ones():
    with pytest.raises(KeyError, match="mask_rcnn_r50_fpn_1x_coco"):
        get_config("mask_rcnn_r5O_fpn")


def test_from_dict_rejects_unknown_keys():
    data = to_dict(get_config("faster_rcnn_r18_fpn_small"))
    data["model"]["backbone"]["colour"] = "blue"
    with pytest.raises(ConfigError, match=r"model.backbone: unknown keys \['colour'\]"):
        from_dict(ExperimentConfig, data)
