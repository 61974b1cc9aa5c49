"""Train iterations/s and inference images/s of a zoo detector, beside torchvision's.

Random 800x1333 images with a few random boxes and masks (untrained weights are fine for
speed). Where torchvision's detection models and ops load (a GPU machine), the same batch
goes through ``torchvision.models.detection.maskrcnn_resnet50_fpn`` in the same run and the
table shows the ours/theirs time ratio.

    python benchmarks/detector_speed.py [--config mask_rcnn_r50_fpn_1x_coco] [--device cpu]
        [--batch 2] [--iters 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from _timing import median_seconds  # sibling module of this script
from instseg.configs import get_config
from instseg.runner import build_model
from instseg.structures import ImageBatch, ImageInfo, InstanceTargets

HEIGHT, WIDTH = 800, 1344  # 1333 padded to a multiple of 32


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


def torchvision_model(device: torch.device):
    try:
        from torchvision.models.detection import maskrcnn_resnet50_fpn

        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).to(device)
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
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    cfg = get_config(args.config)
    model = build_model(cfg, 80).to(device)
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
        sum(losses.values()).backward()
        optimizer.step()

    def infer():
        model.eval()
        with torch.no_grad():
            model.predict(images, infos)

    rows = []
    t_train = median_seconds(train_step, device, args.iters)
    t_infer = median_seconds(infer, device, args.iters)
    rows.append(
        {"impl": "instseg", "train_it_per_s": 1 / t_train, "infer_img_per_s": args.batch / t_infer}
    )

    tv = torchvision_model(device)
    if tv is not None:
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

        def tv_infer():
            tv.eval()
            with torch.no_grad():
                tv(tv_images)

        rows.append(
            {
                "impl": "torchvision",
                "train_it_per_s": 1 / median_seconds(tv_train, device, args.iters),
                "infer_img_per_s": args.batch / median_seconds(tv_infer, device, args.iters),
            }
        )

    print(
        f"{args.config} on {device}, batch {args.batch}, {HEIGHT}x1333, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'impl':12s} {'train it/s':>11s} {'infer img/s':>12s}")
    for row in rows:
        print(f"{row['impl']:12s} {row['train_it_per_s']:11.3f} {row['infer_img_per_s']:12.3f}")
    if len(rows) == 2:
        print(
            f"{'ratio':12s} {rows[0]['train_it_per_s'] / rows[1]['train_it_per_s']:11.2f} "
            f"{rows[0]['infer_img_per_s'] / rows[1]['infer_img_per_s']:12.2f}  (ours / torchvision)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
