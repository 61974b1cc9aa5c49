"""LVIS evaluation (federated AP, APr / APc / APf), AP* and the cocofied LVIS json.

LVIS (Gupta et al., CVPR 2019) annotates each image exhaustively only for some categories,
so its AP differs from COCO's in three rules (spec §12.1, lvis-api ``LVISEval``):

- a detection of category c in image I is dropped unless c has ground truth in I or is in
  I's ``neg_category_ids`` (verified absent);
- an unmatched detection of a category in I's ``not_exhaustive_category_ids`` is ignored;
- at most 300 detections per image over all categories are kept (the highest-scoring ones,
  lvis-api ``LVISResults``), and AP / AR are taken at that cap;
- detections and ground truth of area 0 (an empty mask, a box of zero width or height) are
  left out altogether (lvis-api's ``get_ann_ids`` keeps areas strictly above 0): an empty
  detection is not a false positive.

AP is then averaged over categories as in COCO, and also over the rare / common / frequent
groups (``frequency`` of each category: r, c, f) as APr, APc, APf.

The computation is faster-coco-eval's ``COCOeval_faster(..., lvis_style=True)`` (C++, the
evaluation library we already use for Boundary AP); the 300-per-image limit, the result
copies and the metric read-out are ours. The tests compare it with the official lvis-api
(0.5.3) on the same results: every metric agrees. Two conventions of that comparison:

- Mask results leave out ``bbox`` (detectron2's convention), so the area ranges of APs /
  APm / APl refer to mask areas; mmdet's ``LVISMetric`` keeps ``bbox``, which makes lvis-api
  use box areas for segm (AP, AP50, AP75, APr/c/f are the same either way).
- lvis-api honours a ground-truth ``ignore`` flag and has no crowd regions; faster-coco-eval
  reads ``iscrowd`` instead. LVIS files carry neither; annotations that set either are
  rejected here rather than scored by a rule neither library shares.

AP* (PointRend, RefineMask) is COCO mask AP scored with these rules against the LVIS v0.5
annotations of the 80 COCO categories: :func:`cocofy_lvis` builds that json as detectron2's
``datasets/prepare_cocofied_lvis.py`` does, and it is evaluated like any LVIS file.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faster_coco_eval
import numpy as np
import pycocotools.mask as mask_utils

from instseg.evaluation.coco import (
    _mean_valid,
    _preview,
    _read_json,
    ap_summary,
    check_result_fields,
    fast_evaluator,
    fast_gt_copy,
    format_table,
)

# lvis-api's per-image cap (``LVISResults(max_dets=300)``, ``Params.max_dets``).
LVIS_MAX_DETS = 300
LVIS_IOU_TYPES = ("bbox", "segm")
FREQUENCIES = ("r", "c", "f")
_AREA_CHUNK = 255
# Area ranges of lvis-api's Params, as in COCO.
_AREA_RANGES = {
    "small": [0.0, 32.0**2],
    "medium": [32.0**2, 96.0**2],
    "large": [96.0**2, 1e5**2],
}


# ---------------------------------------------------------------------------------------------
# The LVIS json
# ---------------------------------------------------------------------------------------------


def is_lvis_dataset(dataset: dict[str, Any]) -> bool:
    """True when ``dataset`` is LVIS-format (federated): its images list negative and
    not-exhaustive category ids, or its categories carry a ``frequency``."""
    images = dataset.get("images") or []
    categories = dataset.get("categories") or []
    return bool(
        (images and "neg_category_ids" in images[0])
        or (categories and "frequency" in categories[0])
    )


def check_lvis_dataset(dataset: Any, source: str) -> dict[str, Any]:
    """``dataset`` if it is a usable LVIS json, else a ValueError naming what is wrong."""
    if not isinstance(dataset, dict):
        raise ValueError(f"LVIS annotation file {source}: top level must be an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ValueError(f"LVIS annotation file {source}: '{key}' must be a list")
    cat_ids = set()
    for i, cat in enumerate(dataset["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise ValueError(f"LVIS annotation file {source}: categories[{i}] has no 'id'")
        if cat.get("frequency") not in FREQUENCIES:
            raise ValueError(
                f"LVIS annotation file {source}: category {cat['id']} has frequency "
                f"{cat.get('frequency')!r}; LVIS categories need one of {FREQUENCIES}"
            )
        cat_ids.add(cat["id"])
    image_ids = set()
    for i, img in enumerate(dataset["images"]):
        where = f"LVIS annotation file {source}: image {img.get('id', f'#{i}')}"
        for key in ("id", "height", "width", "neg_category_ids", "not_exhaustive_category_ids"):
            if key not in img:
                raise ValueError(f"{where} has no '{key}'")
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            unknown = set(img[key]) - cat_ids
            if unknown:
                raise ValueError(f"{where}: {key} lists unknown categories {_preview(unknown)}")
        image_ids.add(img["id"])
    for i, ann in enumerate(dataset["annotations"]):
        where = f"LVIS annotation file {source}: annotation {ann.get('id', f'#{i}')}"
        for key in ("id", "image_id", "category_id", "bbox", "area"):
            if key not in ann:
                raise ValueError(f"{where} has no '{key}'")
        if ann["image_id"] not in image_ids:
            raise ValueError(f"{where} refers to unknown image {ann['image_id']}")
        if ann["category_id"] not in cat_ids:
            raise ValueError(f"{where} refers to unknown category {ann['category_id']}")
        if ann.get("iscrowd") or ann.get("ignore"):
            raise ValueError(
                f"{where} sets 'iscrowd' or 'ignore': LVIS has no crowd or ignore regions, and "
                "lvis-api and faster-coco-eval treat them differently"
            )
    return dataset


def load_lvis(path: str | Path) -> dict[str, Any]:
    """Read and check an LVIS-format json (LVIS v0.5 / v1, cocofied LVIS)."""
    return check_lvis_dataset(_read_json(path, "LVIS annotation"), str(path))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def limit_detections_per_image(
    results: list[dict[str, Any]], max_dets: int = LVIS_MAX_DETS
) -> list[dict[str, Any]]:
    """The ``max_dets`` highest-scoring results of each image (lvis-api ``LVISResults``:
    a stable sort by descending score, so equal scores keep their order in ``results``)."""
    per_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        per_image[r["image_id"]].append(r)
    kept: list[dict[str, Any]] = []
    for dets in per_image.values():
        if len(dets) > max_dets:
            dets = sorted(dets, key=lambda r: r["score"], reverse=True)[:max_dets]
        kept.extend(dets)
    return kept


def _areas(results: list[dict[str, Any]], iou_type: str) -> list[float]:
    """Each result's area as lvis-api's ``LVISResults`` computes it: the box's ``w * h`` for
    box results, the mask's pixel count for mask results."""
    if iou_type == "bbox":
        return [float(r["bbox"][2]) * float(r["bbox"][3]) for r in results]
    rles = [
        {"size": r["segmentation"]["size"], "counts": _as_bytes(r["segmentation"]["counts"])}
        for r in results
    ]
    # pycocotools' area() overflows on 256 or more RLEs at once (pycocotools 2.0.11).
    chunks = (rles[i : i + _AREA_CHUNK] for i in range(0, len(rles), _AREA_CHUNK))
    return [float(a) for chunk in chunks for a in mask_utils.area(chunk)]


def _as_bytes(counts: str | bytes) -> bytes:
    return counts.encode("ascii") if isinstance(counts, str) else counts


def _lvis_metrics(E: faster_coco_eval.COCOeval_faster, max_dets: int) -> dict[str, float]:
    """lvis-api's summary (``LVISEval.summarize``) read from the accumulated arrays."""
    p = E.params
    precision = E.eval["precision"][..., 0]  # [T, R, K, A]: maxDets = [max_dets]
    recall = E.eval["recall"][..., 0]  # [T, K, A]
    area = {label: i for i, label in enumerate(p.areaRngLbl)}

    def ap(thr: float | None = None, rng: str = "all", cats: list[int] | None = None) -> float:
        s = precision if thr is None else precision[np.isclose(p.iouThrs, thr)]
        s = s[:, :, :, area[rng]]
        if cats is not None:
            s = s[:, :, cats]
        return _mean_valid(s)

    def ar(rng: str = "all") -> float:
        return _mean_valid(recall[:, :, area[rng]])

    groups = dict(zip(FREQUENCIES, E.freq_groups, strict=True))
    raw = {
        **ap_summary(ap),
        "APr": ap(cats=groups["r"]),
        "APc": ap(cats=groups["c"]),
        "APf": ap(cats=groups["f"]),
        f"AR{max_dets}": ar(),
        "ARs": ar("small"),
        "ARm": ar("medium"),
        "ARl": ar("large"),
    }
    return {k: (v * 100.0 if v > -1 else -1.0) for k, v in raw.items()}


def evaluate_lvis(
    gt: str | Path | dict[str, Any],
    results: list[dict[str, Any]] | str | Path,
    iou_types: Sequence[str] = LVIS_IOU_TYPES,
    max_dets: int = LVIS_MAX_DETS,
    summarize: bool = False,
) -> dict[str, dict[str, float]]:
    """LVIS AP/AR per iou type, in percent: ``{"segm": {"AP": .., "APr": .., ...}, ...}``.

    ``gt`` is an LVIS-format json (path or loaded dict); ``results`` COCO-format result dicts
    (path or list) with LVIS category ids. Every result image must be a ground-truth image
    (lvis-api asserts it); results of categories absent from the ground truth can never be
    scored (the federated rule drops them) and are dropped. ``max_dets`` is the per-image cap
    over all categories (the official protocol: 300). Metrics with nothing to average are -1.
    """
    iou_types = tuple(dict.fromkeys(iou_types))
    bad = [t for t in iou_types if t not in LVIS_IOU_TYPES]
    if bad or not iou_types:
        raise ValueError(
            f"iou_types must be a non-empty subset of {LVIS_IOU_TYPES}, got {iou_types}"
        )
    if isinstance(max_dets, bool) or not isinstance(max_dets, int) or max_dets < 1:
        raise ValueError(f"max_dets must be a positive int, got {max_dets!r}")
    dataset = check_lvis_dataset(gt, "(dict)") if isinstance(gt, dict) else load_lvis(gt)
    if isinstance(results, str | Path):
        results = _read_json(results, "LVIS results")
    if not isinstance(results, list):
        raise ValueError(f"results must be a list of dicts, got {type(results).__name__}")
    images = {img["id"]: img for img in dataset["images"]}
    check_result_fields(results, images, iou_types)
    # The cap counts every result of an image, as LVISResults does, before any is dropped.
    results = limit_detections_per_image(results, max_dets)
    known_cats = {cat["id"] for cat in dataset["categories"]}
    results = [r for r in results if r["category_id"] in known_cats]

    # lvis-api's get_ann_ids keeps only areas strictly above 0, ground truth and results.
    fast_gt = fast_gt_copy(
        {**dataset, "annotations": [a for a in dataset["annotations"] if a["area"] > 0]}
    )
    metrics: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        scored = [r for r, area in zip(results, _areas(results, iou_type), strict=True) if area > 0]
        E = fast_evaluator(fast_gt, scored, iou_type, lvis_style=True)
        E.params.maxDets = [max_dets]
        E.params.areaRng = [[0.0, 1e5**2], *_AREA_RANGES.values()]
        E.params.areaRngLbl = ["all", *_AREA_RANGES]
        E.evaluate()
        E.accumulate()
        metrics[iou_type] = _lvis_metrics(E, max_dets)
    if summarize:
        print(format_table(metrics))
    return metrics


# ---------------------------------------------------------------------------------------------
# Cocofied LVIS (AP*)
# ---------------------------------------------------------------------------------------------

# The 80 COCO categories as LVIS synsets (COCO id -> synset), from lvis-api's
# data/coco_to_synset.json as detectron2's prepare_cocofied_lvis.py lists it.
COCO_ID_TO_LVIS_SYNSET: dict[int, str] = {
    1: "person.n.01", 2: "bicycle.n.01", 3: "car.n.01", 4: "motorcycle.n.01",
    5: "airplane.n.01", 6: "bus.n.01", 7: "train.n.01", 8: "truck.n.01", 9: "boat.n.01",
    10: "traffic_light.n.01", 11: "fireplug.n.01", 13: "stop_sign.n.01",
    14: "parking_meter.n.01", 15: "bench.n.01", 16: "bird.n.01", 17: "cat.n.01",
    18: "dog.n.01", 19: "horse.n.01", 20: "sheep.n.01", 21: "beef.n.01",
    22: "elephant.n.01", 23: "bear.n.01", 24: "zebra.n.01", 25: "giraffe.n.01",
    27: "backpack.n.01", 28: "umbrella.n.01", 31: "bag.n.04", 32: "necktie.n.01",
    33: "bag.n.06", 34: "frisbee.n.01", 35: "ski.n.01", 36: "snowboard.n.01",
    37: "ball.n.06", 38: "kite.n.03", 39: "baseball_bat.n.01", 40: "baseball_glove.n.01",
    41: "skateboard.n.01", 42: "surfboard.n.01", 43: "tennis_racket.n.01",
    44: "bottle.n.01", 46: "wineglass.n.01", 47: "cup.n.01", 48: "fork.n.01",
    49: "knife.n.01", 50: "spoon.n.01", 51: "bowl.n.03", 52: "banana.n.02",
    53: "apple.n.01", 54: "sandwich.n.01", 55: "orange.n.01", 56: "broccoli.n.01",
    57: "carrot.n.01", 58: "frank.n.02", 59: "pizza.n.01", 60: "doughnut.n.02",
    61: "cake.n.03", 62: "chair.n.01", 63: "sofa.n.01", 64: "pot.n.04", 65: "bed.n.01",
    67: "dining_table.n.01", 70: "toilet.n.02", 72: "television_receiver.n.01",
    73: "laptop.n.01", 74: "mouse.n.04", 75: "remote_control.n.01",
    76: "computer_keyboard.n.01", 77: "cellular_telephone.n.01", 78: "microwave.n.02",
    79: "oven.n.01", 80: "toaster.n.02", 81: "sink.n.01", 82: "electric_refrigerator.n.01",
    84: "book.n.01", 85: "clock.n.01", 86: "vase.n.01", 87: "scissors.n.01",
    88: "teddy.n.01", 89: "hand_blower.n.01", 90: "toothbrush.n.01",
}  # fmt: skip


def cocofy_lvis(lvis: dict[str, Any], source: str = "(dict)") -> dict[str, Any]:
    """The LVIS json ``lvis`` restricted to the 80 COCO categories, with COCO category ids:
    the ground truth of AP*.

    As detectron2's ``prepare_cocofied_lvis.py``: annotations of the 80 synsets are kept
    with the COCO id and renumbered from 1; each image's negative and not-exhaustive lists
    are mapped the same way (other categories dropped); a category is kept (its LVIS entry,
    ``frequency`` included, with the COCO id) when its COCO id occurs in a kept annotation
    or in any image's lists. The images are unchanged; ``lvis`` is not modified.
    """
    for key in ("images", "annotations", "categories"):
        if not isinstance(lvis.get(key), list):
            raise ValueError(f"LVIS file {source}: '{key}' must be a list")
    synset_to_coco = {synset: coco_id for coco_id, synset in COCO_ID_TO_LVIS_SYNSET.items()}
    to_coco: dict[int, int] = {}
    for i, cat in enumerate(lvis["categories"]):
        if "synset" not in cat or "id" not in cat:
            raise ValueError(f"LVIS file {source}: categories[{i}] needs 'id' and 'synset'")
        if cat["synset"] in synset_to_coco:
            to_coco[cat["id"]] = synset_to_coco[cat["synset"]]
    known = {cat["id"] for cat in lvis["categories"]}

    def lvis_category(cat_id: int, where: str) -> int | None:
        if cat_id not in known:
            raise ValueError(f"LVIS file {source}: {where} refers to unknown category {cat_id}")
        return to_coco.get(cat_id)

    used: set[int] = set()
    annotations = []
    for ann in lvis["annotations"]:
        coco_id = lvis_category(ann["category_id"], f"annotation {ann.get('id')}")
        if coco_id is None:
            continue
        new = copy.deepcopy(ann)
        new["category_id"] = coco_id
        new["id"] = len(annotations) + 1
        annotations.append(new)
        used.add(coco_id)
    images = []
    for img in lvis["images"]:
        new = copy.deepcopy(img)
        for key in ("not_exhaustive_category_ids", "neg_category_ids"):
            mapped = [lvis_category(c, f"image {img.get('id')} {key}") for c in img[key]]
            new[key] = [c for c in mapped if c is not None]
            used.update(new[key])
        images.append(new)
    categories = []
    for cat in lvis["categories"]:
        coco_id = to_coco.get(cat["id"])
        if coco_id is not None and coco_id in used:
            new = copy.deepcopy(cat)
            new["id"] = coco_id
            categories.append(new)
    out = {k: copy.deepcopy(v) for k, v in lvis.items() if k not in ("annotations", "images")}
    out.update(images=images, annotations=annotations, categories=categories)
    return out
