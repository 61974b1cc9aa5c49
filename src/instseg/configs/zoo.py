"""Named configs: the recipes of the seeds' result tables and small CPU configs.

Each name maps to a plain function that builds a fresh :class:`ExperimentConfig`; there is
no inheritance to follow. ``get_config("mask_rcnn_r50_fpn_1x_coco")`` returns one, and
:func:`instseg.configs.apply_overrides` changes fields by dotted key.

The COCO recipes (spec §1.5) use 16 images per iteration (mmdet: 8 GPUs x 2) and lr 0.02;
12 epochs of COCO train2017 (118,287 images) are 88,716 iterations, with the lr divided by
10 after epochs 8 and 11. With fewer images per iteration, scale ``train.schedule.base_lr``
linearly and the iteration counts inversely (the linear scaling rule).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

from ..engine import ScheduleConfig, TrainConfig
from ..modeling.anchors import AssignerConfig, SamplerConfig
from ..modeling.backbone import ResNetConfig
from ..modeling.condinst import CondInstMaskHeadConfig
from ..modeling.dense_heads import FCOSHeadConfig, RPNConfig
from ..modeling.detectors import OneStageConfig, TwoStageConfig
from ..modeling.neck import FPNConfig
from ..modeling.roi import (
    BoxHeadConfig,
    CascadeRoIHeadConfig,
    FCNMaskHeadConfig,
    GridHeadConfig,
    GridRoIHeadConfig,
    GRoIEConfig,
    IFRMaskHeadConfig,
    RefineMaskHeadConfig,
    RoIExtractorConfig,
    RoIHeadConfig,
)
from .schema import DataConfig, EvalConfig, ExperimentConfig

COCO_TRAIN_IMAGES = 118_287


def _epochs_to_iters(epochs: float, batch_size: int, images: int = COCO_TRAIN_IMAGES) -> int:
    return round(epochs * images / batch_size)


def _coco_1x_run(**schedule: object) -> dict:
    """Data and schedule of mmdet's COCO 1x recipes: one scale (1333, 800), 12 epochs of 16
    images, 500 warmup iterations, lr x0.1 after epochs 8 and 11; ``schedule`` sets the
    rest of the SGD settings (lr, warmup ratio and kind, clip, multipliers)."""
    batch = 16
    return {
        "data": DataConfig(train_scales=((1333, 800),), test_scale=(1333, 800)),
        "train": TrainConfig(
            max_iters=_epochs_to_iters(12, batch),
            batch_size=batch,
            checkpoint_every=5000,
            schedule=ScheduleConfig(
                warmup_iters=500,
                steps=(_epochs_to_iters(8, batch), _epochs_to_iters(11, batch)),
                **schedule,
            ),
        ),
    }


def _rcnn_r50_fpn_1x(name: str, description: str, depth: int, with_mask: bool) -> ExperimentConfig:
    return ExperimentConfig(
        name=name,
        description=description,
        num_classes=80,
        model=TwoStageConfig(
            backbone=ResNetConfig(depth=depth, norm="BN", frozen_stages=1, norm_eval=True),
            neck=FPNConfig(out_channels=256, num_outs=5),
            rpn=RPNConfig(),
            roi_head=RoIHeadConfig(mask_head=FCNMaskHeadConfig() if with_mask else None),
        ),
        **_coco_1x_run(base_lr=0.02, warmup_ratio=0.001),
    )


def faster_rcnn_r50_fpn_1x_coco() -> ExperimentConfig:
    return _rcnn_r50_fpn_1x(
        "faster_rcnn_r50_fpn_1x_coco", "Faster R-CNN R-50-FPN, mmdet 1x COCO recipe", 50, False
    )


def faster_rcnn_r101_fpn_1x_coco() -> ExperimentConfig:
    return _rcnn_r50_fpn_1x(
        "faster_rcnn_r101_fpn_1x_coco", "Faster R-CNN R-101-FPN, mmdet 1x COCO recipe", 101, False
    )


def mask_rcnn_r50_fpn_1x_coco() -> ExperimentConfig:
    return _rcnn_r50_fpn_1x(
        "mask_rcnn_r50_fpn_1x_coco",
        "Mask R-CNN R-50-FPN, mmdet 1x COCO recipe (spec 1.5)",
        50,
        True,
    )


def mask_rcnn_r101_fpn_1x_coco() -> ExperimentConfig:
    return _rcnn_r50_fpn_1x(
        "mask_rcnn_r101_fpn_1x_coco", "Mask R-CNN R-101-FPN, mmdet 1x COCO recipe", 101, True
    )


def _small_backbone() -> ResNetConfig:
    """R-18 at half width from scratch. Trainable BN keeps a from-scratch net stable without
    zero-init residuals; the demo and nuclei numbers were measured with the plain
    (torchvision) init."""
    return ResNetConfig(
        depth=18,
        norm="BN",
        frozen_stages=-1,
        norm_eval=False,
        base_width=32,
        zero_init_residual=False,
    )


def _small_run(base_lr: float) -> dict:
    """Data, schedule and evaluation of the small configs: short side about 320, 400
    iterations of 4 images, a tight gradient clip for training from scratch."""
    return {
        "data": DataConfig(
            train_scales=((512, 288), (512, 320), (512, 352)), test_scale=(512, 320)
        ),
        "train": TrainConfig(
            max_iters=400,
            batch_size=4,
            checkpoint_every=100,
            schedule=ScheduleConfig(
                base_lr=base_lr,
                warmup_iters=50,
                warmup_ratio=0.01,
                steps=(300, 370),
                grad_clip=10.0,
            ),
        ),
        "eval": EvalConfig(max_dets=100, batch_size=4),
    }


def _rcnn_r18_fpn_small(name: str, description: str, with_mask: bool) -> ExperimentConfig:
    """ResNet-18 (half width) FPN from scratch, short side about 320, a 2-conv mask head
    and 256 sampled RoIs per image: minutes on a CPU."""
    return ExperimentConfig(
        name=name,
        description=description,
        model=TwoStageConfig(
            backbone=_small_backbone(),
            neck=FPNConfig(out_channels=64),  # every other width follows it
            rpn=RPNConfig(
                train_nms_pre=1000,
                train_max_per_image=500,
                test_nms_pre=500,
                test_max_per_image=300,
            ),
            roi_head=RoIHeadConfig(
                box_head=BoxHeadConfig(fc_channels=256),
                # Two mask convs instead of four and 256 sampled RoIs instead of 512: small
                # images hold few objects. On the demo data, 600 iterations at short side
                # 256 reached segm AP 58 with this head; the 4-conv, 512-RoI head reached
                # 46-47 in a similar CPU time (450-560 iterations).
                mask_head=FCNMaskHeadConfig(num_convs=2) if with_mask else None,
                sampler=SamplerConfig(num=256, pos_fraction=0.25),
            ),
        ),
        **_small_run(base_lr=0.02),
    )


def faster_rcnn_r18_fpn_small() -> ExperimentConfig:
    return _rcnn_r18_fpn_small(
        "faster_rcnn_r18_fpn_small",
        "Faster R-CNN R-18-FPN (half width, from scratch), CPU-sized",
        False,
    )


def mask_rcnn_r18_fpn_small() -> ExperimentConfig:
    return _rcnn_r18_fpn_small(
        "mask_rcnn_r18_fpn_small", "Mask R-CNN R-18-FPN (half width, from scratch), CPU-sized", True
    )


# ----------------------------------------------------------------------------------- GRoIE
# The GRoIE table (spec §2.3, §7): the same detectors with both RoI extractors replaced by
# GRoIE (RoIAlign sampling_ratio 2; pre 5x5 conv, sum, '0100' attention), and GCNet Mask
# R-CNN (SyncBN backbone with trainable statistics, ContextBlock ratio 1/4 in c3-c5) with
# and without it. Everything else is the base recipe.


def _use_groie(cfg: ExperimentConfig, name: str, description: str) -> ExperimentConfig:
    """``cfg``, renamed, with GRoIE box and mask (or grid) extractors, each with its own
    modules."""
    roi_head = cfg.model.roi_head
    roi_head.box_extractor = GRoIEConfig()
    for branch in ("mask_extractor", "grid_extractor"):
        if hasattr(roi_head, branch):
            setattr(roi_head, branch, GRoIEConfig())
    cfg.name, cfg.description = name, description
    return cfg


def _use_gcnet(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with mmdet's GCNet backbone: SyncBN, ``norm_eval=False``, a ContextBlock
    (ratio 1/4) after conv3 of every bottleneck in c3-c5."""
    backbone = cfg.model.backbone
    backbone.norm = "SyncBN"
    backbone.norm_eval = False
    backbone.context_block_stages = (False, True, True, True)
    backbone.context_block_ratio = 1 / 4
    return cfg


def faster_rcnn_r50_fpn_groie_1x_coco() -> ExperimentConfig:
    return _use_groie(
        faster_rcnn_r50_fpn_1x_coco(),
        "faster_rcnn_r50_fpn_groie_1x_coco",
        "Faster R-CNN R-50-FPN with GRoIE, 1x COCO (box AP 38.3 official)",
    )


def mask_rcnn_r50_fpn_groie_1x_coco() -> ExperimentConfig:
    return _use_groie(
        mask_rcnn_r50_fpn_1x_coco(),
        "mask_rcnn_r50_fpn_groie_1x_coco",
        "Mask R-CNN R-50-FPN with GRoIE, 1x COCO (39.0 / 36.0 official)",
    )


def _gcnet(depth: int, groie: bool) -> ExperimentConfig:
    base = mask_rcnn_r50_fpn_1x_coco() if depth == 50 else mask_rcnn_r101_fpn_1x_coco()
    name = f"mask_rcnn_r{depth}_fpn_syncbn-backbone_r4_gcb_c3-c5_{'groie_' if groie else ''}1x_coco"
    official = {(50, False): "40.7 / 36.5", (50, True): "41.0 / 37.8"}
    official |= {(101, False): "42.2 / 37.8", (101, True): "42.6 / 38.7"}
    description = (
        f"GCNet Mask R-CNN R-{depth}-FPN (SyncBN, r4, c3-c5){' with GRoIE' if groie else ''}, "
        f"1x COCO ({official[depth, groie]} official)"
    )
    cfg = _use_gcnet(base)
    if groie:
        return _use_groie(cfg, name, description)
    cfg.name, cfg.description = name, description
    return cfg


def mask_rcnn_r18_fpn_groie_small() -> ExperimentConfig:
    return _use_groie(
        mask_rcnn_r18_fpn_small(),
        "mask_rcnn_r18_fpn_groie_small",
        "mask_rcnn_r18_fpn_small with GRoIE extractors, CPU-sized",
    )


# ------------------------------------------------------------------------------ RefineMask
# The RefineMask table (spec §3.7): Mask R-CNN with the RefineMask head (P2 semantic branch,
# stages 14 -> 112), the box losses weighted 2.0 and gradients clipped at 35 (L2).


def _use_refinemask(
    cfg: ExperimentConfig, name: str, description: str, head: RefineMaskHeadConfig
) -> ExperimentConfig:
    """``cfg`` (a Mask R-CNN), renamed, with the RefineMask head and recipe."""
    roi_head = cfg.model.roi_head
    roi_head.mask_head = head
    roi_head.box_head.loss_cls_weight = 2.0
    roi_head.box_head.loss_bbox_weight = 2.0
    cfg.train.schedule.grad_clip = 35.0
    cfg.name, cfg.description = name, description
    return cfg


def _schedule_2x(cfg: ExperimentConfig) -> ExperimentConfig:
    """24 epochs with the lr divided by 10 after epochs 16 and 22."""
    batch = cfg.train.batch_size
    cfg.train.max_iters = _epochs_to_iters(24, batch)
    cfg.train.schedule.steps = (_epochs_to_iters(16, batch), _epochs_to_iters(22, batch))
    return cfg


def _refinemask(depth: int, epochs: int) -> ExperimentConfig:
    base = mask_rcnn_r50_fpn_1x_coco() if depth == 50 else mask_rcnn_r101_fpn_1x_coco()
    if epochs == 24:
        base = _schedule_2x(base)
    official = {(50, 12): "37.3", (50, 24): "37.8", (101, 12): "38.6", (101, 24): "39.0"}
    return _use_refinemask(
        base,
        f"refinemask_r{depth}_fpn_{epochs // 12}x_coco",
        f"RefineMask R-{depth}-FPN, {epochs // 12}x COCO (mask AP {official[depth, epochs]} "
        "on val2017, official README)",
        RefineMaskHeadConfig(),
    )


def refinemask_r50_fpn_1x_coco() -> ExperimentConfig:
    return _refinemask(50, 12)


def refinemask_r50_fpn_2x_coco() -> ExperimentConfig:
    return _refinemask(50, 24)


def refinemask_r101_fpn_1x_coco() -> ExperimentConfig:
    return _refinemask(101, 12)


def refinemask_r101_fpn_2x_coco() -> ExperimentConfig:
    return _refinemask(101, 24)


def refinemask_r50_fpn_faster_better_1x_coco() -> ExperimentConfig:
    """The official r50-refinemask-1x-faster-better (spec §3.9)."""
    return _use_refinemask(
        mask_rcnn_r50_fpn_1x_coco(),
        "refinemask_r50_fpn_faster_better_1x_coco",
        "RefineMask R-50-FPN faster & better head (SimpleRefineMaskHead), 1x COCO",
        RefineMaskHeadConfig(
            variant="faster_better",
            class_agnostic_last_stage=True,
            stage_loss_weights=(0.5, 0.75, 0.75, 1.0),
        ),
    )


def refinemask_r18_fpn_small() -> ExperimentConfig:
    """``mask_rcnn_r18_fpn_small`` with the RefineMask head at the small width (64 -> 32 ->
    16 -> 8 channels over the stages) and the RefineMask box-loss weights; the small
    configs' tighter gradient clip (10) is kept."""
    cfg = _use_refinemask(
        mask_rcnn_r18_fpn_small(),
        "refinemask_r18_fpn_small",
        "RefineMask R-18-FPN (half width, from scratch), CPU-sized",
        RefineMaskHeadConfig(conv_channels=64),
    )
    cfg.train.schedule.grad_clip = 10.0
    return cfg


# ----------------------------------------------------------------------------- FCOS / CondInst
# Spec §4: ResNet (pytorch style, BN statistics frozen, stem and layer1 frozen), FPN on C3-C5
# with P6/P7 from stride-2 convs on P5's output (ReLU before P7), the FCOS head with GN,
# centre sampling, distances normalised by the stride, centerness on the reg tower, GIoU.


def _p3_p7_neck(width: int) -> FPNConfig:
    """FPN on C3-C5 with P6 and P7 from stride-2 convs on P5's output (ReLU before P7)."""
    return FPNConfig(
        out_channels=width,
        num_outs=5,
        start_level=1,
        add_extra_convs="on_output",
        relu_before_extra_convs=True,
    )


def _one_stage_r50(with_mask: bool) -> OneStageConfig:
    mask_head = CondInstMaskHeadConfig() if with_mask else None
    return OneStageConfig(
        backbone=ResNetConfig(depth=50, norm="BN", frozen_stages=1, norm_eval=True),
        neck=_p3_p7_neck(256),
        bbox_head=FCOSHeadConfig(
            center_from_mask=with_mask,
        ),
        mask_head=mask_head,
    )


def fcos_r50_fpn_1x_coco() -> ExperimentConfig:
    """mmdet's FCOS "center-normbbox-centeronreg-giou" recipe (lr 0.01, constant x1/3 warmup
    over 500 iterations, bias lr x2 and no bias decay, 12 epochs, grad clip 35, NMS 0.6) on
    the pytorch-style R-50 of CondInst; mmdet's uses its caffe-style R-50 (issue 14)."""
    return ExperimentConfig(
        name="fcos_r50_fpn_1x_coco",
        description="FCOS R-50-FPN (GN head, centre sampling, GIoU), mmdet 1x COCO recipe",
        num_classes=80,
        model=_one_stage_r50(with_mask=False),
        **_coco_1x_run(
            base_lr=0.01,
            warmup_ratio=1.0 / 3,
            warmup="constant",
            grad_clip=35.0,
            bias_lr_mult=2.0,
            bias_decay_mult=0.0,
        ),
    )


def condinst_r50_fpn_ms_poly_90k_coco_instance() -> ExperimentConfig:
    """mmdet's ``condinst_r50_fpn_ms-poly-90k_coco_instance`` (spec §4.6): 90k iterations of
    16 images, lr 0.01 (linear warmup over 1000 from x0.001), x0.1 at 60k and 80k, short
    side one of 640-800 (step 32), flip 0.5, no grad clip."""
    return ExperimentConfig(
        name="condinst_r50_fpn_ms-poly-90k_coco_instance",
        description="CondInst R-50-FPN, multi-scale 90k iterations (mmdet recipe)",
        num_classes=80,
        model=_one_stage_r50(with_mask=True),
        data=DataConfig(
            train_scales=tuple((1333, s) for s in range(640, 801, 32)), test_scale=(1333, 800)
        ),
        train=TrainConfig(
            max_iters=90_000,
            batch_size=16,
            checkpoint_every=10_000,
            schedule=ScheduleConfig(
                base_lr=0.01, warmup_iters=1000, warmup_ratio=0.001, steps=(60_000, 80_000)
            ),
        ),
    )


def condinst_r18_fpn_small() -> ExperimentConfig:
    """CondInst at the size of the other small configs: R-18 at half width from scratch
    (trainable BN), 64-channel FPN, 2-conv towers, a 32-channel 2-conv mask branch."""
    mask_head = CondInstMaskHeadConfig(branch_channels=32, branch_convs=2)
    return ExperimentConfig(
        name="condinst_r18_fpn_small",
        description="CondInst R-18-FPN (half width, from scratch), CPU-sized",
        model=OneStageConfig(
            backbone=_small_backbone(),
            neck=_p3_p7_neck(64),
            bbox_head=FCOSHeadConfig(
                stacked_convs=2,
                feat_channels=64,
                center_from_mask=True,
            ),
            mask_head=mask_head,
        ),
        **_small_run(base_lr=0.01),
    )


# ----------------------------------------------------------------- Cascade R-CNN (mmdet)
# Spec §10.1: the Mask R-CNN 1x recipe with a 3-stage cascade (IoU 0.5/0.6/0.7, class-agnostic
# regression, smooth L1 beta 1, stage weights 1/0.5/0.25, a mask head per stage), 2000 RPN
# proposals in training and the RPN box loss smooth L1 with beta 1/9.


def cascade_mask_rcnn_r50_fpn_1x_coco() -> ExperimentConfig:
    cfg = _rcnn_r50_fpn_1x(
        "cascade_mask_rcnn_r50_fpn_1x_coco",
        "Cascade Mask R-CNN R-50-FPN, mmdet 1x COCO recipe (41.2 / 35.9 official)",
        50,
        True,
    )
    cfg.model.rpn.train_max_per_image = 2000
    cfg.model.rpn.loss_bbox_beta = 1.0 / 9.0
    cfg.model.roi_head = CascadeRoIHeadConfig()
    return cfg


def cascade_mask_rcnn_r18_fpn_small() -> ExperimentConfig:
    """``mask_rcnn_r18_fpn_small`` with mmdet's cascade: three box stages and three 2-conv
    mask heads, 256 RoIs sampled per stage."""
    cfg = mask_rcnn_r18_fpn_small()
    cfg.name = "cascade_mask_rcnn_r18_fpn_small"
    cfg.description = "Cascade Mask R-CNN R-18-FPN (half width, from scratch), CPU-sized"
    cfg.model.roi_head = CascadeRoIHeadConfig(
        box_head=BoxHeadConfig(fc_channels=256, class_agnostic=True, loss_bbox_beta=1.0),
        mask_head=FCNMaskHeadConfig(num_convs=2),
        sampler=SamplerConfig(num=256, pos_fraction=0.25),
    )
    cfg.model.rpn.loss_bbox_beta = 1.0 / 9.0
    return cfg


# ------------------------------------------------------------- IFR (detectron2 / cvpods)
# Spec §5.8: cvpods' R-50-FPN recipe, each difference from mmdet's a named field: MSRA caffe
def _torchvision_rcnn(name: str, description: str, with_mask: bool) -> ExperimentConfig:
    """torchvision's ``maskrcnn_resnet50_fpn`` / ``fasterrcnn_resnet50_fpn`` (v1, the COCO_V1
    weights) as instseg fields, spec §13.5-§13.6: FrozenBN ResNet-50 (stride in the 3x3, stem
    and layer1 frozen), integer base anchors whose centres step by input size // level size,
    dw/dh clamped from above only, RoIAlign with ``aligned=False`` and 2 samples per bin,
    torchvision's level mapping, RPN boxes under 1e-3 px and detections under 1e-2 px
    dropped, torchvision's mask paste, resized sides floored. 90 classes: its 91 rows less
    the background, class k is COCO category id k + 1 (ten ids are "N/A").

    Training follows torchvision's reference recipe where instseg has the field (26 epochs
    of 16 images, lr 0.02 x0.1 after epochs 16 and 22, linear warmup of 1000 iterations from
    x0.001, smooth-L1 beta 1/9, 2000 RPN proposals per image); the sampling and loss
    normalisation are instseg's (mmdet's)."""
    batch = 16
    extractor = RoIExtractorConfig(sampling_ratio=2, aligned=False, level_mapping="torchvision")
    return ExperimentConfig(
        name=name,
        description=description,
        num_classes=90,
        model=TwoStageConfig(
            backbone=ResNetConfig(depth=50, norm="FrozenBN", frozen_stages=1, norm_eval=True),
            neck=FPNConfig(out_channels=256, num_outs=5),
            rpn=RPNConfig(
                anchor_rounding=True,
                anchor_strides="input",
                delta_clip="upper",
                min_box_size=1e-3,
                loss_bbox_beta=1 / 9,
                train_max_per_image=2000,
            ),
            roi_head=RoIHeadConfig(
                box_extractor=extractor,
                box_head=BoxHeadConfig(delta_clip="upper", loss_bbox_beta=1 / 9),
                mask_extractor=copy.deepcopy(extractor),
                mask_head=FCNMaskHeadConfig() if with_mask else None,
                min_box_size=1e-2,
                mask_paste="torchvision",
            ),
        ),
        data=DataConfig(train_scales=((1333, 800),), test_scale=(1333, 800), size_rounding="floor"),
        train=TrainConfig(
            max_iters=_epochs_to_iters(26, batch),
            batch_size=batch,
            checkpoint_every=5000,
            schedule=ScheduleConfig(
                base_lr=0.02,
                warmup_iters=1000,
                warmup_ratio=0.001,
                steps=(_epochs_to_iters(16, batch), _epochs_to_iters(22, batch)),
            ),
        ),
    )


def torchvision_maskrcnn_resnet50_fpn() -> ExperimentConfig:
    return _torchvision_rcnn(
        "torchvision_maskrcnn_resnet50_fpn",
        "torchvision maskrcnn_resnet50_fpn (COCO_V1: box 37.9, mask 34.6) as instseg fields",
        True,
    )


def torchvision_fasterrcnn_resnet50_fpn() -> ExperimentConfig:
    return _torchvision_rcnn(
        "torchvision_fasterrcnn_resnet50_fpn",
        "torchvision fasterrcnn_resnet50_fpn (COCO_V1: box 37.0) as instseg fields",
        False,
    )


# R-50 (stride in the 1x1, FrozenBN, stem and res2 frozen), BGR input with std 1, c2_xavier
# init of the FPN and box FCs (mask logits at N(0, 0.001^2)), RPN low-quality matches at any
# IoU and its losses over 256 x images, 90k iterations of 16 images (warmup 1000 from x0.001,
# x0.1 at 60k and 80k), no weight decay on norm layers. The box coder weights (10, 10, 5, 5)
# are mmdet's stds (0.1, 0.1, 0.2, 0.2); L1 box losses, 512 RoIs at 0.25, NMS 0.5 are already
# mmdet's. Weights: ``model.backbone.weights=R-50.pkl`` converted to torchvision names
# (issue 18).

DETECTRON2_BGR_MEAN = (103.53, 116.28, 123.675)
CVPODS_MULTISCALE = tuple((1333, s) for s in (640, 672, 704, 736, 768, 800))


def _cvpods_rcnn(
    name: str, description: str, roi_head: RoIHeadConfig | CascadeRoIHeadConfig, multiscale: bool
) -> ExperimentConfig:
    roi_head.box_head.fc_init = "c2_xavier"
    return ExperimentConfig(
        name=name,
        description=description,
        num_classes=80,
        model=TwoStageConfig(
            backbone=ResNetConfig(
                depth=50, norm="FrozenBN", frozen_stages=1, norm_eval=True, style="caffe"
            ),
            neck=FPNConfig(out_channels=256, num_outs=5, init="c2_xavier"),
            rpn=RPNConfig(
                assigner=AssignerConfig(0.7, 0.3, 0.0, match_low_quality=True),
                loss_normalizer="per_image",
                train_max_per_image=2000 if isinstance(roi_head, CascadeRoIHeadConfig) else 1000,
            ),
            roi_head=roi_head,
        ),
        data=DataConfig(
            train_scales=CVPODS_MULTISCALE if multiscale else ((1333, 800),),
            test_scale=(1333, 800),
            pixel_mean=DETECTRON2_BGR_MEAN,
            pixel_std=(1.0, 1.0, 1.0),
            bgr=True,
        ),
        train=TrainConfig(
            max_iters=90_000,
            batch_size=16,
            checkpoint_every=10_000,
            schedule=ScheduleConfig(
                base_lr=0.02,
                warmup_iters=1000,
                warmup_ratio=0.001,
                steps=(60_000, 80_000),
                norm_decay_mult=0.0,
            ),
        ),
    )


def _ifr_head(mode: str = "implicit") -> IFRMaskHeadConfig:
    return IFRMaskHeadConfig(mode=mode, pretrain_steps=50_000)


def _cvpods_cascade(mask_head: FCNMaskHeadConfig | IFRMaskHeadConfig) -> CascadeRoIHeadConfig:
    """cvpods' cascade (spec §5.7, §10.4): detectron2 weights (10, 10, 5, 5) x 1, 2, 3 as
    stds, L1, every stage weighted 1 with its RoI features' gradient scaled by 1/3, later
    stages relabel all RoIs, probabilities averaged, one mask head on stage-1 positives."""
    return CascadeRoIHeadConfig(
        box_head=BoxHeadConfig(class_agnostic=True, loss_bbox_beta=0.0),
        stage_target_stds=tuple(
            (1 / (10 * k), 1 / (10 * k), 1 / (5 * k), 1 / (5 * k)) for k in (1, 2, 3)
        ),
        stage_loss_weights=(1.0, 1.0, 1.0),
        later_stages="relabel",
        stage_gradient_scale=1.0 / 3.0,
        score_merge="mean_probs",
        mask_head=mask_head,
        mask_per_stage=False,
    )


def mask_rcnn_res50_fpn_coco_multiscale_1x() -> ExperimentConfig:
    return _cvpods_rcnn(
        "mask_rcnn.res50.fpn.coco.multiscale.1x",
        "Mask R-CNN R-50-FPN, cvpods multi-scale 1x recipe (the IFR baseline)",
        RoIHeadConfig(mask_head=FCNMaskHeadConfig(logits_init_std=0.001)),
        multiscale=True,
    )


def mask_rcnn_ifr_res50_fpn_coco_multiscale_1x() -> ExperimentConfig:
    return _cvpods_rcnn(
        "mask_rcnn.ifr.res50.fpn.coco.multiscale.1x",
        "Mask R-CNN R-50-FPN with IFR, cvpods multi-scale 1x (mask AP 36.3 official)",
        RoIHeadConfig(mask_head=_ifr_head()),
        multiscale=True,
    )


def mask_rcnn_res50_fpn_coco_multiscale_weight_sharing_1x() -> ExperimentConfig:
    return _cvpods_rcnn(
        "mask_rcnn.res50.fpn.coco.multiscale.weight_sharing.1x",
        "Mask R-CNN R-50-FPN with IFR's block unrolled 4 times (weight sharing), cvpods "
        "multi-scale 1x (mask AP 35.9 official)",
        RoIHeadConfig(mask_head=_ifr_head("weight_sharing")),
        multiscale=True,
    )


def cascade_rcnn_res50_fpn_coco_800size_1x() -> ExperimentConfig:
    return _cvpods_rcnn(
        "cascade_rcnn.res50.fpn.coco.800size.1x",
        "Cascade R-CNN R-50-FPN with a mask head, cvpods 800-size 1x (41.7 / 36.1 cvpods)",
        _cvpods_cascade(FCNMaskHeadConfig(logits_init_std=0.001)),
        multiscale=False,
    )


def cascade_rcnn_ifr_res50_fpn_coco_800size_1x() -> ExperimentConfig:
    return _cvpods_rcnn(
        "cascade_rcnn.ifr.res50.fpn.coco.800size.1x",
        "Cascade R-CNN R-50-FPN with IFR, cvpods 800-size 1x (mask AP 36.9 official)",
        _cvpods_cascade(_ifr_head()),
        multiscale=False,
    )


def mask_rcnn_r18_fpn_ifr_small() -> ExperimentConfig:
    """``mask_rcnn_r18_fpn_small`` with the IFR head: the explicit 4-step phase for the first
    220 of 400 iterations (the official 50k of 90k), then the equilibrium solve."""
    cfg = mask_rcnn_r18_fpn_small()
    cfg.name = "mask_rcnn_r18_fpn_ifr_small"
    cfg.description = "Mask R-CNN R-18-FPN with the IFR head (half width, from scratch), CPU-sized"
    cfg.model.roi_head.mask_head = IFRMaskHeadConfig(pretrain_steps=220)
    return cfg


# ------------------------------------------------------------------------------ Grid R-CNN
# Spec §11: Faster R-CNN's R-50-FPN with a classification-only box head and the grid head
# (8 GN convs, 9 points of 64 channels, fusion, 28x28 heatmaps), boxes only; RPN smooth L1
# beta 1/9 and 2000 training proposals; test score 0.03, NMS 0.3. The 2x schedule is 25
# epochs with a 3665-iteration warmup from 1/80 and steps after epochs 17 and 23; the 1x
# (and GRoIE) schedule is mmdet 2.x's (warmup 500 from 0.001), which produced the GRoIE
# table (mmdet 3.x starts its warmup at 0.0001).


def _grid_rcnn(name: str, description: str, epochs: int) -> ExperimentConfig:
    cfg = faster_rcnn_r50_fpn_1x_coco()
    cfg.name, cfg.description = name, description
    cfg.model.rpn.train_max_per_image = 2000
    cfg.model.rpn.loss_bbox_beta = 1.0 / 9.0
    cfg.model.roi_head = GridRoIHeadConfig()
    if epochs == 25:
        batch = cfg.train.batch_size
        cfg.train.max_iters = _epochs_to_iters(25, batch)
        cfg.train.schedule.warmup_iters = 3665
        cfg.train.schedule.warmup_ratio = 1.0 / 80
        cfg.train.schedule.steps = (_epochs_to_iters(17, batch), _epochs_to_iters(23, batch))
    return cfg


def grid_rcnn_r50_fpn_gn_head_2x_coco() -> ExperimentConfig:
    return _grid_rcnn(
        "grid_rcnn_r50_fpn_gn-head_2x_coco",
        "Grid R-CNN R-50-FPN (GN head), mmdet 2x (25 epochs) COCO recipe (box AP 40.4 official)",
        25,
    )


def grid_rcnn_r50_fpn_gn_head_1x_coco() -> ExperimentConfig:
    return _grid_rcnn(
        "grid_rcnn_r50_fpn_gn-head_1x_coco",
        "Grid R-CNN R-50-FPN (GN head), 1x COCO (box AP 39.1, GRoIE README)",
        12,
    )


def grid_rcnn_r50_fpn_gn_head_groie_1x_coco() -> ExperimentConfig:
    return _use_groie(
        grid_rcnn_r50_fpn_gn_head_1x_coco(),
        "grid_rcnn_r50_fpn_gn-head_groie_1x_coco",
        "Grid R-CNN R-50-FPN (GN head) with GRoIE box and grid extractors, 1x COCO (no "
        "published number)",
    )


def grid_rcnn_r18_fpn_small() -> ExperimentConfig:
    """``faster_rcnn_r18_fpn_small`` with the grid head at 16 channels per point (144 in all,
    GroupNorm 36 groups of 4)."""
    cfg = faster_rcnn_r18_fpn_small()
    cfg.name = "grid_rcnn_r18_fpn_small"
    cfg.description = "Grid R-CNN R-18-FPN (half width, from scratch), CPU-sized"
    cfg.model.rpn.loss_bbox_beta = 1.0 / 9.0
    cfg.model.roi_head = GridRoIHeadConfig(
        box_head=BoxHeadConfig(fc_channels=256, with_reg=False),
        grid_head=GridHeadConfig(point_feat_channels=16),
        sampler=SamplerConfig(num=256, pos_fraction=0.25),
    )
    return cfg


# ------------------------------------------------------------------- LVIS v1 and Cityscapes
# The RefineMask tables' other datasets (spec §3.7 variants, §7) and mmdet's baselines on
# them. LVIS v1: 1203 classes, repeat-factor sampling at 1e-3 (mmdet ClassBalancedDataset),
# short side one of 640-800 (step 32), 12 epochs counted as mmdet counts them: epochs of
# the repeated list, which is longer than LVIS v1 train's 100,170 images by an amount only
# the annotations tell, so the schedule is given in epochs (``train.by_epoch``) and becomes
# iterations when training starts (75,128 iterations if no image were repeated); 300
# detections per image above score 1e-4 at test. Images are read by their ``coco_url``
# under the COCO root (``data.train_images=coco/``). Cityscapes: 8 classes, long edge 2048
# and short edge sampled in [800, 1024] (mmdet 2.x "range" mode), RepeatDataset x8 of the
# 2975 train images for 8 epochs (64 passes), lr x0.1 after epoch 7, test scale (2048, 1024).

LVIS_V1_TRAIN_IMAGES = 100_170
LVIS_V1_CLASSES = 1203
LVIS_MULTISCALE = tuple((1333, s) for s in range(640, 801, 32))
CITYSCAPES_TRAIN_IMAGES = 2_975
CITYSCAPES_CLASSES = 8
CITYSCAPES_REPEAT = 8  # mmdet RepeatDataset(times=8): one "epoch" is 8 passes
COCO_MASK_RCNN_WEIGHTS = "checkpoints/mask_rcnn_r50_fpn_1x_coco.safetensors"


def _on_lvis_v1(cfg: ExperimentConfig, name: str, description: str) -> ExperimentConfig:
    """``cfg`` (a COCO 1x recipe of 16 images per iteration), renamed, on LVIS v1."""
    cfg.name, cfg.description = name, description
    cfg.num_classes = LVIS_V1_CLASSES
    cfg.data = DataConfig(
        train_scales=LVIS_MULTISCALE, test_scale=(1333, 800), repeat_threshold=1e-3
    )
    cfg.model.roi_head.score_thr = 1e-4
    cfg.model.roi_head.max_per_image = 300
    cfg.eval.max_dets = 300
    cfg.train.by_epoch = True
    cfg.train.max_iters = 12
    cfg.train.schedule.steps = (8, 11)
    return cfg


def _lvis_description(method: str, depth: int, official: str) -> str:
    return (
        f"{method} R-{depth}-FPN, 1x LVIS v1 ({official}): repeat-factor sampling at 1e-3, "
        "short side 640-800, 12 epochs of 16 images counted as mmdet does, over the "
        "repeated image list (train.by_epoch: the iterations are fixed when training "
        f"starts; {_epochs_to_iters(12, 16, LVIS_V1_TRAIN_IMAGES):,} for LVIS v1 train's "
        f"{LVIS_V1_TRAIN_IMAGES:,} images without repeats, more with them)"
    )


def _mask_rcnn_lvis_v1(depth: int) -> ExperimentConfig:
    """mmdet 3.3 ``mask-rcnn_r{depth}_fpn_sample1e-3_ms-1x_lvis-v1``: the COCO Mask R-CNN
    1x recipe (L1 box loss, no clip) with 1203 classes, class-specific masks,
    ``ClassBalancedDataset(oversample_thr=1e-3)``, ``RandomChoiceResize`` over short sides
    640-800 and a test cap of 300 detections above score 1e-4."""
    base = mask_rcnn_r50_fpn_1x_coco() if depth == 50 else mask_rcnn_r101_fpn_1x_coco()
    official = {50: "box AP 22.5, mask AP 21.7", 101: "box AP 24.6, mask AP 23.6"}[depth]
    return _on_lvis_v1(
        base,
        f"mask_rcnn_r{depth}_fpn_1x_lvis_v1",
        _lvis_description("Mask R-CNN", depth, f"mmdet: {official}"),
    )


def mask_rcnn_r50_fpn_1x_lvis_v1() -> ExperimentConfig:
    return _mask_rcnn_lvis_v1(50)


def mask_rcnn_r101_fpn_1x_lvis_v1() -> ExperimentConfig:
    return _mask_rcnn_lvis_v1(101)


def _refinemask_lvis_v1(depth: int) -> ExperimentConfig:
    """RefineMask's ``configs/refinemask/lvis/r50-refinemask-1x.py``: the COCO RefineMask
    recipe (box losses x2, clip 35) with a class-agnostic last stage
    (``stage_num_classes=[1203, 1203, 1203, 1]``), ``ClassBalancedDataset(1e-3)``, short
    sides 640-800 ("value" mode), 12 epochs, lr 0.02 at 16 images, test score 1e-4 and 300
    detections. The repository has no R-101 LVIS file; the R-101 row of its README is this
    recipe at depth 101, as its COCO R-101 file is the R-50 one at depth 101."""
    official = {50: "mask AP 25.7, APr 13.8", 101: "mask AP 27.1, APr 15.6"}[depth]
    cfg = _on_lvis_v1(
        _refinemask(depth, 12),
        f"refinemask_r{depth}_fpn_1x_lvis_v1",
        _lvis_description("RefineMask", depth, f"official README: {official}"),
    )
    cfg.model.roi_head.mask_head.class_agnostic_last_stage = True
    return cfg


def refinemask_r50_fpn_1x_lvis_v1() -> ExperimentConfig:
    return _refinemask_lvis_v1(50)


def refinemask_r101_fpn_1x_lvis_v1() -> ExperimentConfig:
    return _refinemask_lvis_v1(101)


def _on_cityscapes(
    cfg: ExperimentConfig, name: str, description: str, batch: int, grad_clip: float | None
) -> ExperimentConfig:
    """``cfg`` (an R-50 COCO recipe), renamed, on Cityscapes: 8 classes, the "range"
    multi-scale of mmdet 2.x (``img_scale=[(2048, 800), (2048, 1024)]``; mmdet 3.x's
    ``RandomResize`` samples the same), test at (2048, 1024), lr 0.01 with warmup 500 from
    x0.001, 8 epochs of the 8-times repeated 2975 images, x0.1 after epoch 7."""
    cfg.name, cfg.description = name, description
    cfg.num_classes = CITYSCAPES_CLASSES
    cfg.data = DataConfig(
        train_scales=((2048, 800), (2048, 1024)), test_scale=(2048, 1024), train_scale_mode="range"
    )
    images = CITYSCAPES_REPEAT * CITYSCAPES_TRAIN_IMAGES
    cfg.train = TrainConfig(
        max_iters=_epochs_to_iters(8, batch, images),
        batch_size=batch,
        checkpoint_every=2000,
        schedule=ScheduleConfig(
            base_lr=0.01,
            warmup_iters=500,
            warmup_ratio=0.001,
            steps=(_epochs_to_iters(7, batch, images),),
            grad_clip=grad_clip,
        ),
    )
    return cfg


def refinemask_r50_fpn_1x_cityscapes() -> ExperimentConfig:
    """RefineMask's ``configs/refinemask/cityscapes/r50-refinemask.py``: unlike mmdet's
    Cityscapes file it keeps ``load_from = None`` (ImageNet backbone only), uses smooth L1
    (beta 1) box regression weighted 2 like its classification, a class-specific last stage
    (``stage_num_classes=[8, 8, 8, 8]``) and clips gradients at 35; 16 images per iteration
    (2 per GPU on 8 GPUs in its latest commit, 16 x 1 in its README) at lr 0.01."""
    cfg = _on_cityscapes(
        _refinemask(50, 12),
        "refinemask_r50_fpn_1x_cityscapes",
        "RefineMask R-50-FPN on Cityscapes (official README: mask AP 37.6, COCO-style on "
        "the val json), RefineMask's recipe: no COCO init, smooth-L1 box loss x2, 8 "
        "epochs of RepeatDataset x8 at 16 images, range multi-scale (2048, 800-1024)",
        batch=16,
        grad_clip=35.0,
    )
    cfg.model.roi_head.box_head.loss_bbox_beta = 1.0
    return cfg


def mask_rcnn_r50_fpn_1x_cityscapes() -> ExperimentConfig:
    """mmdet 3.3 ``mask-rcnn_r50_fpn_1x_cityscapes``: the COCO Mask R-CNN initialised from
    the COCO-trained weights (``load_from``; mismatched class layers are skipped), no
    ImageNet backbone init, smooth L1 (beta 1) box loss weight 1, 8 images per iteration
    (8 GPUs x 1) at lr 0.01, no gradient clip. The COCO weights are read from
    ``train.load_from`` (default ``checkpoints/mask_rcnn_r50_fpn_1x_coco.safetensors``,
    relative to the working folder), e.g. mmdet's ``mask_rcnn_r50_fpn_1x_coco_20200205``
    converted to instseg's format; training stops at once with an error naming the file
    when it is absent (``train.load_from=none`` trains without it)."""
    cfg = _on_cityscapes(
        mask_rcnn_r50_fpn_1x_coco(),
        "mask_rcnn_r50_fpn_1x_cityscapes",
        "Mask R-CNN R-50-FPN on Cityscapes, mmdet recipe (mmdet: box AP 40.9, mask AP 36.4 "
        f"COCO-style): initialised from COCO weights ({COCO_MASK_RCNN_WEIGHTS}), 8 epochs "
        "of RepeatDataset x8 at 8 images, range multi-scale (2048, 800-1024)",
        batch=8,
        grad_clip=None,
    )
    cfg.model.roi_head.box_head.loss_bbox_beta = 1.0
    cfg.train.load_from = COCO_MASK_RCNN_WEIGHTS
    return cfg


ZOO: dict[str, Callable[[], ExperimentConfig]] = {
    fn.__name__: fn
    for fn in (
        faster_rcnn_r50_fpn_1x_coco,
        faster_rcnn_r101_fpn_1x_coco,
        mask_rcnn_r50_fpn_1x_coco,
        mask_rcnn_r101_fpn_1x_coco,
        torchvision_maskrcnn_resnet50_fpn,
        torchvision_fasterrcnn_resnet50_fpn,
        faster_rcnn_r18_fpn_small,
        mask_rcnn_r18_fpn_small,
        faster_rcnn_r50_fpn_groie_1x_coco,
        mask_rcnn_r50_fpn_groie_1x_coco,
        mask_rcnn_r18_fpn_groie_small,
        refinemask_r50_fpn_1x_coco,
        refinemask_r50_fpn_2x_coco,
        refinemask_r101_fpn_1x_coco,
        refinemask_r101_fpn_2x_coco,
        refinemask_r50_fpn_faster_better_1x_coco,
        refinemask_r18_fpn_small,
        fcos_r50_fpn_1x_coco,
        condinst_r18_fpn_small,
        cascade_mask_rcnn_r50_fpn_1x_coco,
        cascade_mask_rcnn_r18_fpn_small,
        mask_rcnn_r18_fpn_ifr_small,
        grid_rcnn_r18_fpn_small,
        mask_rcnn_r50_fpn_1x_lvis_v1,
        mask_rcnn_r101_fpn_1x_lvis_v1,
        refinemask_r50_fpn_1x_lvis_v1,
        refinemask_r101_fpn_1x_lvis_v1,
        mask_rcnn_r50_fpn_1x_cityscapes,
        refinemask_r50_fpn_1x_cityscapes,
    )
}
# Names with '-' cannot be function names; _gcnet builds the name it is listed under.
ZOO.update(
    {
        "condinst_r50_fpn_ms-poly-90k_coco_instance": condinst_r50_fpn_ms_poly_90k_coco_instance,
        "mask_rcnn_r50_fpn_syncbn-backbone_r4_gcb_c3-c5_1x_coco": partial(_gcnet, 50, False),
        "mask_rcnn_r50_fpn_syncbn-backbone_r4_gcb_c3-c5_groie_1x_coco": partial(_gcnet, 50, True),
        "mask_rcnn_r101_fpn_syncbn-backbone_r4_gcb_c3-c5_1x_coco": partial(_gcnet, 101, False),
        "mask_rcnn_r101_fpn_syncbn-backbone_r4_gcb_c3-c5_groie_1x_coco": partial(_gcnet, 101, True),
        "grid_rcnn_r50_fpn_gn-head_2x_coco": grid_rcnn_r50_fpn_gn_head_2x_coco,
        "grid_rcnn_r50_fpn_gn-head_1x_coco": grid_rcnn_r50_fpn_gn_head_1x_coco,
        "grid_rcnn_r50_fpn_gn-head_groie_1x_coco": grid_rcnn_r50_fpn_gn_head_groie_1x_coco,
    }
)
# The cvpods rows keep their dotted names.
ZOO.update(
    {
        fn().name: fn
        for fn in (
            mask_rcnn_res50_fpn_coco_multiscale_1x,
            mask_rcnn_ifr_res50_fpn_coco_multiscale_1x,
            mask_rcnn_res50_fpn_coco_multiscale_weight_sharing_1x,
            cascade_rcnn_res50_fpn_coco_800size_1x,
            cascade_rcnn_ifr_res50_fpn_coco_800size_1x,
        )
    }
)


def get_config(name: str) -> ExperimentConfig:
    """A fresh copy of the named config; an unknown name lists the known ones."""
    if name not in ZOO:
        raise KeyError(f"unknown config {name!r}; known: {', '.join(sorted(ZOO))}")
    return ZOO[name]()
