"""Tiny LVIS-format datasets and results for the LVIS evaluation tests.

Deterministic (``random.Random(seed)``) and built from the standard library, numpy (zeros)
and pycocotools only, so the same cases can be scored by the official lvis-api in an
environment of its own (``tests/fixtures/lvis/record_official.py``) and by the code under
test here.

Each case exercises the federated rules: detections of ground-truth categories (jittered
copies of the ground truth, some far off), of categories in an image's negative list (false
positives), of categories the image says nothing about (dropped), of not-exhaustive
categories (unmatched ones ignored), of a category outside the ground truth, exact score
ties, empty masks, and (``crowded=True``) images with more detections than the
300-per-image cap.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

# Frequencies of the categories 1..NUM_CATEGORIES: rare, common and frequent ones.
FREQUENCY = ["r", "c", "f", "f", "c", "r", "f", "c", "f", "r"]
NUM_CATEGORIES = len(FREQUENCY)
# A category id in results that the ground truth does not have.
UNKNOWN_CATEGORY = 999


def _polygon(rnd: random.Random, cx: float, cy: float, r: float) -> list[float]:
    k = rnd.randint(5, 9)
    angles = sorted(rnd.uniform(0, 2 * math.pi) for _ in range(k))
    pts: list[float] = []
    for a in angles:
        rr = r * rnd.uniform(0.55, 1.0)
        pts += [round(cx + rr * math.cos(a), 2), round(cy + rr * math.sin(a), 2)]
    return pts


def _rle(poly: list[float], h: int, w: int) -> dict[str, Any]:
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _empty_rle(h: int, w: int) -> dict[str, Any]:
    rle = mask_utils.encode(np.zeros((h, w, 1), dtype=np.uint8, order="F"))[0]
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _bbox(rle: dict[str, Any]) -> list[float]:
    return [float(v) for v in mask_utils.toBbox({**rle, "counts": rle["counts"].encode()})]


def _area(rle: dict[str, Any]) -> float:
    return float(mask_utils.area({**rle, "counts": rle["counts"].encode()}))


def make_case(
    seed: int, num_images: int = 6, crowded: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(ground truth, results)``: an LVIS-format dataset and COCO-format results with
    both ``bbox`` and ``segmentation`` (compressed RLE)."""
    rnd = random.Random(seed)
    categories = [
        {"id": c + 1, "name": f"cat{c + 1}", "synset": f"cat{c + 1}.n.01", "frequency": f}
        for c, f in enumerate(FREQUENCY)
    ]
    images, annotations, results = [], [], []
    for i in range(num_images):
        image_id = 10 + 7 * i
        h, w = rnd.randint(60, 140), rnd.randint(60, 160)
        cats = list(range(1, NUM_CATEGORIES + 1))
        rnd.shuffle(cats)
        present = cats[: rnd.randint(1, 4)]
        negative = cats[len(present) : len(present) + rnd.randint(1, 3)]
        not_exhaustive = [c for c in present if rnd.random() < 0.4]
        images.append(
            {
                "id": image_id,
                "height": h,
                "width": w,
                "coco_url": f"http://images.cocodataset.org/val2017/{image_id:012d}.jpg",
                "neg_category_ids": sorted(negative),
                "not_exhaustive_category_ids": sorted(not_exhaustive),
            }
        )
        for c in present:
            for _ in range(rnd.randint(1, 4)):
                r = rnd.uniform(4, min(h, w) / 2.5)
                cx, cy = rnd.uniform(r, w - r), rnd.uniform(r, h - r)
                poly = _polygon(rnd, cx, cy, r)
                rle = _rle(poly, h, w)
                if _area(rle) < 1:
                    continue
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": c,
                        "segmentation": [poly],
                        "bbox": _bbox(rle),
                        "area": _area(rle),
                    }
                )
                # Detections near this object: good, poor, and (sometimes) a duplicate.
                for jitter in (0.05, 0.25, 0.6)[: rnd.randint(1, 3)]:
                    dpoly = [v + rnd.uniform(-jitter, jitter) * r for v in poly]
                    results.append(_result(image_id, c, dpoly, h, w, rnd))
        # Detections that are not near any ground truth, of every kind of category.
        extra = rnd.randint(2, 6) + (330 if crowded and i % 2 == 0 else 0)
        others = [c for c in cats if c not in present and c not in negative]
        for _ in range(extra):
            kind = rnd.random()
            if kind < 0.3:
                c = rnd.choice(present)
            elif kind < 0.6:
                c = rnd.choice(negative)
            elif kind < 0.9 and others:
                c = rnd.choice(others)
            else:
                c = UNKNOWN_CATEGORY
            r = rnd.uniform(3, min(h, w) / 3)
            poly = _polygon(rnd, rnd.uniform(r, w - r), rnd.uniform(r, h - r), r)
            results.append(_result(image_id, c, poly, h, w, rnd))
        # An empty mask (box [0, 0, 0, 0]) scored high: lvis-api leaves area-0 results out.
        if i % 3 == 1:
            empty = _empty_rle(h, w)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": present[0],
                    "bbox": _bbox(empty),
                    "segmentation": empty,
                    "score": 0.999,
                }
            )
    # Exact score ties across images and categories.
    for k in range(0, len(results), 9):
        results[k]["score"] = 0.5
    gt = {
        "info": {"description": f"lvis case {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    return gt, results


def _result(
    image_id: int, c: int, poly: list[float], h: int, w: int, rnd: random.Random
) -> dict[str, Any]:
    poly = [min(max(v, 0.0), float(w if k % 2 == 0 else h)) for k, v in enumerate(poly)]
    rle = _rle(poly, h, w)
    return {
        "image_id": image_id,
        "category_id": c,
        "bbox": _bbox(rle),
        "segmentation": rle,
        "score": round(rnd.uniform(0.01, 1.0), 4),
    }


CASES = {
    "small": {"seed": 1},
    "medium": {"seed": 2, "num_images": 12},
    "crowded": {"seed": 3, "num_images": 4, "crowded": True},
}
