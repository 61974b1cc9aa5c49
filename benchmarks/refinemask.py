"""Inference speed and peak memory of RefineMask (or CondInst) beside Mask R-CNN, in one run.

The paper's efficiency table (R50-FPN, 1333x800, one image at a time, V100) gives 15.7 FPS
for Mask R-CNN and 11.4 for RefineMask, a ratio of 0.73. This script times
``mask_rcnn_r50_fpn_1x_coco`` and ``refinemask_r50_fpn_1x_coco`` (or ``--configs``, e.g.
``condinst_r50_fpn_ms-poly-90k_coco_instance``) on the same random images. The weights are
untrained, so box scores sit near 1/81, under the 0.05 threshold: ``score_thr`` is set to 0
so that every image yields ``max_per_image`` (100) detections, the mask heads' worst and
COCO's usual case. Each model runs in its own child process, so that its peak memory (CUDA:
``max_memory_allocated``; CPU: the process's peak resident set, weights and libraries
included) is its own.

    python benchmarks/refinemask.py [--device cpu|cuda] [--batch 1] [--iters 3]
        [--size 800 1333] [--configs A B] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys

import torch

from _timing import median_seconds  # sibling module of this script
from instseg.configs import get_config
from instseg.data.loader import pad_images
from instseg.runner import build_model
from instseg.structures import ImageInfo

PAPER_RATIO = 11.4 / 15.7


def measure(config: str, device_name: str, batch: int, iters: int, size: tuple[int, int]) -> dict:
    """Median seconds per ``predict`` call of a fresh model, its detections and peak memory."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    cfg = get_config(config)
    if cfg.model.kind == "two_stage":
        cfg.model.roi_head.score_thr = 0.0
    else:  # one-stage: every (location, class) pair is a candidate, NMS keeps the best 100
        cfg.model.bbox_head.score_thr = 0.0
    model = build_model(cfg, 80).to(device).eval()
    height, width = size
    gen = torch.Generator().manual_seed(1)
    images = pad_images([torch.randn(3, height, width, generator=gen) for _ in range(batch)])
    images = images.to(device)
    infos = [ImageInfo(i, "", (height, width), (height, width)) for i in range(batch)]
    detections: list[int] = []

    def infer() -> None:
        with torch.no_grad():
            results = model.predict(images, infos)
        detections.append(sum(len(r) for r in results))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(infer, device, iters)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "config": config,
        "img_per_s": batch / seconds,
        "ms_per_img": 1000 * seconds / batch,
        "detections_per_img": detections[-1] / batch,
        "peak_mib": peak,
    }


def _child(args: tuple, queue: multiprocessing.Queue) -> None:
    queue.put(measure(*args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument(
        "--configs", nargs=2, default=("mask_rcnn_r50_fpn_1x_coco", "refinemask_r50_fpn_1x_coco")
    )
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    context = multiprocessing.get_context("spawn")
    rows = []
    for config in args.configs:
        queue = context.Queue()
        child = context.Process(
            target=_child,
            args=((config, args.device, args.batch, args.iters, tuple(args.size)), queue),
        )
        child.start()
        rows.append(queue.get())
        child.join()
        if child.exitcode != 0:
            print(f"error: measuring {config} failed", file=sys.stderr)
            return 1

    memory = "CUDA max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    print(
        f"inference on {args.device}, batch {args.batch}, {args.size[0]}x{args.size[1]}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.iters}"
    )
    print(f"{'config':30s} {'img/s':>8s} {'ms/img':>9s} {'dets/img':>9s} {memory + ' MiB':>20s}")
    for row in rows:
        print(
            f"{row['config']:30s} {row['img_per_s']:8.3f} {row['ms_per_img']:9.1f} "
            f"{row['detections_per_img']:9.0f} {row['peak_mib']:20.0f}"
        )
    ratio = rows[1]["img_per_s"] / rows[0]["img_per_s"]
    paper = (
        f" (paper: 11.4 / 15.7 FPS = {PAPER_RATIO:.2f})"
        if rows[1]["config"].startswith("refinemask")
        else ""
    )
    print(
        f"img/s ratio {rows[1]['config']} / {rows[0]['config']}: {ratio:.2f}{paper}; "
        f"peak memory ratio {rows[1]['peak_mib'] / rows[0]['peak_mib']:.2f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "img_per_s_ratio": ratio}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
