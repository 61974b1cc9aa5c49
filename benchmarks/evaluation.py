"""Evaluation time: ours against the reference implementations, on one synthetic result set.

Builds a synthetic dataset of ``--images`` images (default 5,000) in two forms, COCO (80
categories) and LVIS v1-like (1,203 categories with LVIS v1's rare / common / frequent
counts, negative and not-exhaustive lists), with polygon ground truth and noisy detections
(boxes and RLE masks), then times box and mask evaluation:

- COCO: ``instseg.evaluation.evaluate_coco`` against pycocotools' ``COCOeval``
  (``evaluate`` + ``accumulate``), both in this process;
- LVIS: ``instseg.evaluation.evaluate_lvis`` against the official lvis-api 0.5.3
  (``LVIS`` + ``LVISResults`` + ``LVISEval.run``), which needs numpy < 1.24 and so runs in
  its own environment (``--lvis-python``, default /work/lvisvenv/bin/python; the time is
  measured inside that process around the evaluation only, not the interpreter start).

Every summary metric of both sides is compared (they must agree to 1e-9) and the times
printed with ratios.
Run it alone: a second job on these cores distorts the times.

    python benchmarks/evaluation.py [--images 5000] [--lvis-python PATH] [--skip-lvis-api]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pycocotools.mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instseg.evaluation import evaluate_coco, evaluate_lvis

# LVIS v1: 1,203 categories, 337 rare, 461 common, 405 frequent.
LVIS_FREQUENCIES = ["r"] * 337 + ["c"] * 461 + ["f"] * 405

LVIS_API_SCRIPT = r"""
import json, sys, time
from lvis import LVIS, LVISEval, LVISResults
gt_path, res_path, iou_type = sys.argv[1:4]
results = json.load(open(res_path))
start = time.perf_counter()
gt = LVIS(gt_path)
ev = LVISEval(gt, LVISResults(gt, results, max_dets=300), iou_type)
ev.run()
seconds = time.perf_counter() - start
out = {k: (float(v) * 100 if v > -1 else -1.0) for k, v in ev.get_results().items()}
print(json.dumps({"seconds": seconds, "metrics": out}))
"""


def _polygon(rnd: random.Random, cx: float, cy: float, r: float) -> list[float]:
    pts: list[float] = []
    for a in sorted(rnd.uniform(0, 2 * math.pi) for _ in range(rnd.randint(5, 9))):
        rr = r * rnd.uniform(0.6, 1.0)
        pts += [round(cx + rr * math.cos(a), 2), round(cy + rr * math.sin(a), 2)]
    return pts


def _encode(poly: list[float], h: int, w: int) -> dict[str, Any]:
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _bbox_area(rle: dict[str, Any]) -> tuple[list[float], float]:
    raw = {**rle, "counts": rle["counts"].encode()}
    return [float(v) for v in mask_utils.toBbox(raw)], float(mask_utils.area(raw))


def synthetic(num_images: int, lvis: bool, seed: int = 0) -> tuple[dict, list[dict]]:
    """Ground truth (COCO or LVIS format) and results (bbox + RLE segmentation)."""
    rnd = random.Random(seed)
    num_cats = len(LVIS_FREQUENCIES) if lvis else 80
    categories = [{"id": c + 1, "name": f"c{c + 1}"} for c in range(num_cats)]
    if lvis:
        for cat, f in zip(categories, LVIS_FREQUENCIES, strict=True):
            cat["frequency"] = f
    images, annotations, results = [], [], []
    for i in range(num_images):
        h, w = rnd.choice([(480, 640), (640, 480), (427, 640)])
        image: dict[str, Any] = {"id": i + 1, "height": h, "width": w, "file_name": f"{i}.jpg"}
        present = rnd.sample(range(1, num_cats + 1), rnd.randint(1, 4))
        if lvis:
            others = rnd.sample(range(1, num_cats + 1), 12)
            image["neg_category_ids"] = [c for c in others[:8] if c not in present]
            image["not_exhaustive_category_ids"] = [c for c in present if rnd.random() < 0.1]
        images.append(image)
        for c in present:
            for _ in range(rnd.randint(1, 3)):
                r = rnd.uniform(8, 120)
                cx, cy = rnd.uniform(r, w - r), rnd.uniform(r, h - r)
                poly = _polygon(rnd, cx, cy, r)
                box, area = _bbox_area(_encode(poly, h, w))
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": c,
                        "segmentation": [poly],
                        "bbox": box,
                        "area": area,
                        **({} if lvis else {"iscrowd": 0}),
                    }
                )
                for jitter in (0.05, 0.2)[: rnd.randint(1, 2)]:
                    dpoly = [v + rnd.uniform(-jitter, jitter) * r for v in poly]
                    results.append(_result(i + 1, c, dpoly, h, w, rnd))
        candidates = present + (image.get("neg_category_ids") or present)
        for _ in range(rnd.randint(3, 8)):
            r = rnd.uniform(8, 100)
            poly = _polygon(rnd, rnd.uniform(r, w - r), rnd.uniform(r, h - r), r)
            results.append(_result(i + 1, rnd.choice(candidates), poly, h, w, rnd))
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, results


def _result(image_id: int, c: int, poly: list[float], h: int, w: int, rnd: random.Random) -> dict:
    poly = [min(max(v, 0.0), float(w if k % 2 == 0 else h)) for k, v in enumerate(poly)]
    rle = _encode(poly, h, w)
    box, _ = _bbox_area(rle)
    return {
        "image_id": image_id,
        "category_id": c,
        "bbox": box,
        "segmentation": rle,
        "score": round(rnd.uniform(0.01, 1.0), 5),
    }


def _only(results: list[dict], iou_type: str) -> list[dict]:
    key = "bbox" if iou_type == "bbox" else "segmentation"
    return [{k: r[k] for k in ("image_id", "category_id", "score", key)} for r in results]


COCO_KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm"]
COCO_KEYS.append("ARl")


def _pycocotools(
    gt_path: Path, results: list[dict], iou_type: str
) -> tuple[float, dict[str, float]]:
    """Seconds for loading + evaluate + accumulate + summarize, and summarize()'s 12 numbers
    (percent) by our names."""
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        gt = COCO(str(gt_path))
        E = COCOeval(gt, gt.loadRes(_only(results, iou_type)), iou_type)
        E.evaluate()
        E.accumulate()
        E.summarize()
        seconds = time.perf_counter() - start
    return seconds, {k: float(v) * 100 for k, v in zip(COCO_KEYS, E.stats, strict=True)}


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--lvis-python", default="/work/lvisvenv/bin/python")
    parser.add_argument("--skip-lvis-api", action="store_true", help="time ours only for LVIS")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lvis in (False, True):
            start = time.perf_counter()
            gt, results = synthetic(args.images, lvis)
            built = time.perf_counter() - start
            name = "LVIS" if lvis else "COCO"
            gt_path = Path(tmp) / f"{name}.json"
            gt_path.write_text(json.dumps(gt))
            print(
                f"{name}: {len(gt['images'])} images, {len(gt['categories'])} categories, "
                f"{len(gt['annotations'])} ground truth, {len(results)} results "
                f"(built in {built:.0f} s)",
                flush=True,
            )
            for iou_type in ("bbox", "segm"):
                if lvis:
                    ours_s, ours = _timed(
                        lambda: evaluate_lvis(gt_path, results, iou_types=(iou_type,))  # noqa: B023
                    )
                    ref_s, ref = _lvis_api(args, tmp, gt_path, results, iou_type)
                else:
                    ours_s, ours = _timed(
                        lambda: evaluate_coco(gt_path, results, iou_types=(iou_type,))  # noqa: B023
                    )
                    ref_s, ref = _pycocotools(gt_path, results, iou_type)
                ap = ours[iou_type]["AP"]
                for key, value in (ref or {}).items():
                    if abs(ours[iou_type][key] - value) > 1e-9:
                        raise SystemExit(
                            f"{name} {iou_type}: {key} {ours[iou_type][key]} differs from the "
                            f"reference's {value}"
                        )
                ratio = f"{ours_s / ref_s:.3f}" if ref_s else "-"
                rows.append((name, iou_type, ours_s, ref_s, ratio, ap))
                print(
                    f"  {iou_type}: ours {ours_s:.1f} s, reference "
                    f"{ref_s if ref_s is None else round(ref_s, 1)} s, ratio {ratio}, AP {ap:.3f}",
                    flush=True,
                )
    print("\n| data | iou type | ours (s) | reference (s) | ours / reference | AP |")
    print("|---|---|---|---|---|---|")
    for name, iou_type, ours_s, ref_s, ratio, ap in rows:
        ref = "-" if ref_s is None else f"{ref_s:.1f}"
        print(f"| {name} | {iou_type} | {ours_s:.1f} | {ref} | {ratio} | {ap:.2f} |")


def _lvis_api(
    args: argparse.Namespace, tmp: str, gt_path: Path, results: list[dict], iou_type: str
) -> tuple[float | None, dict[str, float] | None]:
    if args.skip_lvis_api or not Path(args.lvis_python).is_file():
        print(f"  (lvis-api not run: {args.lvis_python})")
        return None, None
    res_path = Path(tmp) / f"lvis_results_{iou_type}.json"
    res_path.write_text(json.dumps(_only(results, iou_type)))
    out = subprocess.run(
        [args.lvis_python, "-c", LVIS_API_SCRIPT, str(gt_path), str(res_path), iou_type],
        check=True,
        capture_output=True,
        text=True,
    )
    record = json.loads(out.stdout.strip().splitlines()[-1])
    # lvis-api's names ('AR@300', 'ARs@300') as ours ('AR300', 'ARs').
    metrics = {
        ("AR" + k[3:] if k.startswith("AR@") else k.split("@")[0]): v
        for k, v in record["metrics"].items()
    }
    return record["seconds"], metrics


if __name__ == "__main__":
    sys.exit(main())
