"""Inference images/s of the exported ONNX graph (onnxruntime, CPU) beside PyTorch (CPU).

For each config: random weights, score thresholds at ``--score-thr`` (default 0) so that
every image ends with exactly ``--dets`` detections with masks (as a trained model's
inference does), exported by :func:`instseg.export.export_onnx` at a fixed ``--size``
(default 800x1333) with masks
pasted into the image. Both run the same random images, one at a time, on the same number
of threads: PyTorch normalises, pads and calls ``model.predict`` (masks pasted and
thresholded); onnxruntime runs the whole graph (masks pasted, as probabilities). Prints
images/s and the onnxruntime/PyTorch ratio (above 1: onnxruntime is faster) and writes them
as JSON (``--out``).

    python benchmarks/onnx_speed.py [--configs mask_rcnn_r50_fpn_1x_coco ...]
        [--size 800 1333] [--iters 5] [--dets 100] [--score-thr 0] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _timing import median_seconds  # sibling module of this script
from instseg.configs import get_config
from instseg.configs.overrides import set_value
from instseg.data.loader import pad_images
from instseg.export import export_onnx
from instseg.runner import build_model
from instseg.structures import ImageInfo

CONFIGS = ("mask_rcnn_r50_fpn_1x_coco", "condinst_r50_fpn_ms-poly-90k_coco_instance")
NUM_CLASSES = 80


def with_fixed_detections(cfg, dets: int, score_thr: float):
    """Score threshold ``score_thr`` and ``dets`` detections per image (test-time settings
    only). With random weights every class scores about 1/81 (softmax) or the prior 0.01
    (FCOS): a threshold of 0 lets every (box, class) pair into NMS, where a trained model
    has few; that NMS is part of what is timed."""
    head = "model.roi_head" if hasattr(cfg.model, "roi_head") else "model.bbox_head"
    set_value(cfg, f"{head}.score_thr", str(score_thr))
    set_value(cfg, f"{head}.max_per_image", str(dets))
    return cfg


def measure(
    name: str,
    size: tuple[int, int],
    iters: int,
    dets: int,
    score_thr: float,
    threads: int,
    work: Path,
):
    import onnxruntime as ort

    cfg = with_fixed_detections(get_config(name), dets, score_thr)
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES).eval()
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (*size, 3)).astype(np.float32)

    start = time.perf_counter()
    report = export_onnx(
        model,
        cfg,
        list(range(1, NUM_CLASSES + 1)),
        work / f"{name}.onnx",
        image_size=size,
        pasted_masks=True,
        validate_images=[image],
    )
    export_s = time.perf_counter() - start

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(report.path), options, providers=["CPUExecutionProvider"])
    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    onnx_dets = len(session.run(None, {"image": chw})[0])
    onnx_s = median_seconds(lambda: session.run(None, {"image": chw}), torch.device("cpu"), iters)

    mean = torch.tensor(cfg.data.pixel_mean).view(3, 1, 1)
    std = torch.tensor(cfg.data.pixel_std).view(3, 1, 1)
    tensor = torch.from_numpy(chw)
    info = ImageInfo(0, "", size, size)

    @torch.no_grad()
    def torch_predict():
        x = tensor.flip(0) if cfg.data.bgr else tensor
        batch = pad_images([(x - mean) / std], cfg.train.size_divisor)
        return model.predict(batch, [info])[0]

    torch_dets = len(torch_predict())
    torch_s = median_seconds(torch_predict, torch.device("cpu"), iters)
    check = report.checks[0]
    return {
        "onnx_images_per_s": 1 / onnx_s,
        "torch_images_per_s": 1 / torch_s,
        "ratio_onnx_over_torch": torch_s / onnx_s,
        "detections_onnx": onnx_dets,
        "detections_torch": torch_dets,
        "validation": {
            "ok": check.ok,
            "box_diff": check.box_diff,
            "score_diff": check.score_diff,
            "mask_diff": check.mask_diff,
        },
        "export_s": export_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--size", nargs=2, type=int, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument(
        "--iters", type=int, default=5, help="timed runs (median), after one warm-up"
    )
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument(
        "--score-thr", type=float, default=0.0, help="score threshold of both (default 0)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import onnx
    import onnxruntime

    torch.set_num_threads(args.threads)
    size = tuple(args.size)
    results = {
        "size": list(size),
        "threads": args.threads,
        "iters": args.iters,
        "dets": args.dets,
        "score_thr": args.score_thr,
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "models": {},
    }
    print(f"{'config':48s} {'torch img/s':>12s} {'onnx img/s':>12s} {'onnx/torch':>10s}")
    with tempfile.TemporaryDirectory(prefix="instseg_onnx_speed_") as tmp:
        for name in args.configs:
            row = measure(
                name, size, args.iters, args.dets, args.score_thr, args.threads, Path(tmp)
            )
            results["models"][name] = row
            valid = "ok" if row["validation"]["ok"] else "FAILED"
            print(
                f"{name:48s} {row['torch_images_per_s']:12.3f} {row['onnx_images_per_s']:12.3f} "
                f"{row['ratio_onnx_over_torch']:10.2f}  (detections {row['detections_torch']} / "
                f"{row['detections_onnx']}, validation {valid})"
            )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
