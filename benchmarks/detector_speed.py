"""Train iterations/s and inference images/s of a zoo detector, beside torchvision's.

Random 800x1333 images (padded to 800x1344 for ours) with 5 random boxes and masks each;
random weights (speed does not depend on their values). Where torchvision's detection models
and ops load (the torchvision environment of ``shared/DESIGN.md`` on CPU, or a GPU machine),
the same batch goes through torchvision's Mask R-CNN R-50-FPN (``MaskRCNN`` on
``resnet_fpn_backbone``) in the same run and the table shows ours/theirs speed ratios (above
1: ours is faster). Both train as when fine-tuning from ImageNet weights: frozen BN, stem and
first stage frozen.

Inference is measured twice: with each library's default score threshold (random weights give
no detection above 0.05, so this is the network without the mask branch), and with both score
thresholds at 0 so that each image ends with exactly ``--dets`` boxes and masks, as a trained
model's inference does (mask head, pasting into the image). Each timing alternates ours and
torchvision's calls (median of ``--iters`` rounds), so that a machine whose speed drifts
during the run does not favour the one measured first.

    python benchmarks/detector_speed.py [--config mask_rcnn_r50_fpn_1x_coco] [--device cpu]
        [--batch 2] [--iters 3] [--dets 100] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

from _timing import interleaved_median_seconds  # sibling module of this script
from instseg.configs import get_config
from instseg.configs.overrides import set_value
from instseg.runner import build_model
from instseg.structures import ImageBatch, ImageInfo, InstanceTargets

HEIGHT, WIDTH = 800, 1344  # 1333 padded to a multiple of 32


class Impl(NamedTuple):
    """One implementation's timed calls, and the detection counts its --dets inference saw."""

    name: str
    train: Callable[[], None]
    infer: Callable[[], None]
    infer_dets: Callable[[], None]
    counts: list[list[int]]


def random_targets(batch: int, num_classes: int, device: torch.device) -> list[InstanceTargets]:
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        n = 5
        xy = torch.rand(n, 2, generator=g) * torch.tensor([WIDTH - 300, HEIGHT - 300])
        boxes = torch.cat([xy, xy + 50 + torch.rand(n, 2, generator=g) * 250], 1)
        masks = torch.zeros(n, HEIGHT, WIDTH, dtype=torch.bool)
        for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[i, y1:y2, x1:x2] = True
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append(InstanceTargets(boxes, labels, masks).to(device))
    return targets


def torchvision_model(device: torch.device, dets: int | None):
    """torchvision's Mask R-CNN R-50-FPN as it is fine-tuned from ImageNet weights (frozen BN,
    stem and layer1 frozen: ``trainable_layers=3``, the work of our ``frozen_stages=1``,
    ``norm_eval``), with our 80 classes; None where it does not load here. With ``dets``,
    score threshold 0 and ``dets`` detections per image. (``maskrcnn_resnet50_fpn`` without
    weights would train every layer and its batch statistics: more work than ours.)"""
    try:
        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
        from torchvision.ops import FrozenBatchNorm2d

        kwargs = {} if dets is None else {"box_score_thresh": 0.0, "box_detections_per_img": dets}
        torch.manual_seed(0)
        backbone = resnet_fpn_backbone(
            backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
        )
        model = MaskRCNN(backbone, num_classes=81, **kwargs).to(device)
        model.eval()
        with torch.no_grad():
            model([torch.zeros(3, 64, 64, device=device)])
        return model
    except Exception as exc:  # missing package or compiled ops that do not load
        print(f"torchvision detection unavailable ({type(exc).__name__}: {str(exc)[:80]})")
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mask_rcnn_r50_fpn_1x_coco")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--dets", type=int, default=100, help="detections per image, 2nd mode")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    cfg = get_config(args.config)
    model = build_model(cfg, 80).to(device)
    many = copy.deepcopy(cfg)
    set_value(many, "model.roi_head.score_thr", 0.0)
    set_value(many, "model.roi_head.max_per_image", args.dets)
    model_many = build_model(many, 80).to(device)
    model_many.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    images = ImageBatch(
        torch.randn(args.batch, 3, HEIGHT, WIDTH, device=device),
        [(HEIGHT, 1333)] * args.batch,
    )
    targets = random_targets(args.batch, 80, device)
    infos = [ImageInfo(i, "", (HEIGHT, 1333), (HEIGHT, 1333)) for i in range(args.batch)]

    def train_step():
        model.train()
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(v for k, v in losses.items() if k.startswith("loss")).backward()
        optimizer.step()

    def infer(net, counts=None):
        def run():
            net.eval()
            with torch.no_grad():
                results = net.predict(images, infos)
            if counts is not None:
                counts.append([len(r) for r in results])

        return run

    ours_counts: list[list[int]] = []
    impls = [Impl("instseg", train_step, infer(model), infer(model_many, ours_counts), ours_counts)]

    tv = torchvision_model(device, None)
    tv_many = torchvision_model(device, args.dets)
    if tv is not None and tv_many is not None:
        tv_many.load_state_dict(tv.state_dict())
        tv_images = [images.tensor[i, :, :, :1333] for i in range(args.batch)]
        tv_targets = [
            {
                "boxes": t.boxes,
                "labels": t.labels + 1,
                "masks": t.masks[:, :, :1333].to(torch.uint8),
            }
            for t in targets
        ]
        tv_optim = torch.optim.SGD(tv.parameters(), lr=1e-4, momentum=0.9)

        def tv_train():
            tv.train()
            losses = tv(tv_images, tv_targets)
            tv_optim.zero_grad()
            sum(losses.values()).backward()
            tv_optim.step()

        def tv_infer(net, counts=None):
            def run():
                net.eval()
                with torch.no_grad():
                    results = net(tv_images)
                if counts is not None:
                    counts.append([len(r["boxes"]) for r in results])

            return run

        tv_counts: list[list[int]] = []
        impls.append(
            Impl("torchvision", tv_train, tv_infer(tv), tv_infer(tv_many, tv_counts), tv_counts)
        )

    # Each mode's calls alternate between the implementations (ours, theirs, ours, ...).
    def timed(mode: str) -> list[float]:
        return interleaved_median_seconds([getattr(i, mode) for i in impls], device, args.iters)

    train_s, infer_s, infer_dets_s = timed("train"), timed("infer"), timed("infer_dets")
    rows = [
        {
            "impl": impl.name,
            "train_it_per_s": 1 / train_s[i],
            "infer_img_per_s": args.batch / infer_s[i],
            "infer_dets_img_per_s": args.batch / infer_dets_s[i],
            "dets_per_image": impl.counts[-1],
        }
        for i, impl in enumerate(impls)
    ]

    print(
        f"{args.config} on {device}, batch {args.batch}, {HEIGHT}x1333, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.iters}"
    )
    dets = f"img/s {args.dets} dets"
    print(f"{'impl':12s} {'train it/s':>11s} {'infer img/s':>12s} {dets:>17s}  dets/image")
    for row in rows:
        print(
            f"{row['impl']:12s} {row['train_it_per_s']:11.3f} {row['infer_img_per_s']:12.3f} "
            f"{row['infer_dets_img_per_s']:17.3f}  {row['dets_per_image']}"
        )
    if len(rows) == 2:
        ours, theirs = rows
        ratios = {k: ours[k] / theirs[k] for k in ours if k.endswith("_per_s")}
        print(
            f"{'ratio':12s} {ratios['train_it_per_s']:11.2f} {ratios['infer_img_per_s']:12.2f} "
            f"{ratios['infer_dets_img_per_s']:17.2f}  (ours / torchvision speed)"
        )
        rows.append({"impl": "ratio", **ratios})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "batch": args.batch, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
