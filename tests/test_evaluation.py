"""Tests for ``instseg.evaluation`` (COCO results json and COCO AP).

The reference is pycocotools itself, called directly here (``loadRes`` + ``COCOeval`` +
``summarize()``) on its own copy of the ground truth, never through the code under test.
Boundary AP (computed by faster-coco-eval) is checked against a brute-force float64 boundary
IoU written out below with plain loops, on cases whose AP follows from one IoU.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import instseg.evaluation.coco as coco_eval
from instseg.evaluation import (
    evaluate_coco,
    format_table,
    instances_to_coco_results,
    load_coco,
    write_results,
)
from instseg.structures import Instances

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO_VAL6 = DATA / "coco-val-6" / "annotations.json"
NUCLEI = DATA / "dsb2018-nuclei-48" / "instances.json"

STAT_KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm"]
STAT_KEYS.append("ARl")

# ---------------------------------------------------------------------------------------------
# Helpers: synthetic ground truth, noisy detections, the pycocotools reference
# ---------------------------------------------------------------------------------------------


def star_polygon(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    """A random star-shaped polygon ``(K, 2)`` around ``(cx, cy)`` of radius about ``r``."""
    k = int(rng.integers(6, 12))
    angles = np.sort(rng.uniform(0, 2 * math.pi, k))
    radii = r * rng.uniform(0.6, 1.0, k)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def polygon_rle(poly: np.ndarray, h: int, w: int) -> dict[str, Any]:
    rle = mask_utils.merge(mask_utils.frPyObjects([poly.reshape(-1).tolist()], h, w))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def polygon_box(poly: np.ndarray, h: int, w: int) -> list[float]:
    x0, y0 = np.clip(poly.min(0), 0, [w, h])
    x1, y1 = np.clip(poly.max(0), 0, [w, h])
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def synthetic_gt(seed: int = 0) -> tuple[dict[str, Any], list[np.ndarray]]:
    """5 images 240x320, categories 2/5/11, small, medium and large polygons, one crowd RLE
    region and one image without annotations. Returns the dataset and each annotation's
    polygon (None for the crowd)."""
    rng = np.random.default_rng(seed)
    h, w = 240, 320
    cats = [{"id": c, "name": f"c{c}"} for c in (2, 5, 11)]
    images = [{"id": 10 + i, "width": w, "height": h, "file_name": f"{i}.png"} for i in range(5)]
    anns, polys = [], []
    for img in images[:4]:
        for r in [*rng.uniform(5, 14, 4), *rng.uniform(22, 45, 3), *rng.uniform(70, 100, 1)]:
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            poly = star_polygon(rng, cx, cy, r)
            rle = polygon_rle(poly, h, w)
            anns.append(
                {
                    "id": 1000 + len(anns),
                    "image_id": img["id"],
                    "category_id": int(rng.choice([2, 5, 11])),
                    "segmentation": [poly.reshape(-1).tolist()],
                    "area": float(mask_utils.area(rle)),
                    "bbox": polygon_box(poly, h, w),
                    "iscrowd": 0,
                }
            )
            polys.append(poly)
    crowd = np.zeros((h, w), np.uint8)
    crowd[150:220, 20:120] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    anns.append(
        {
            "id": 1000 + len(anns),
            "image_id": 10,
            "category_id": 5,
            "segmentation": {"size": [h, w], "counts": crowd_rle["counts"].decode()},
            "area": float(crowd.sum()),
            "bbox": [20.0, 150.0, 100.0, 70.0],
            "iscrowd": 1,
        }
    )
    polys.append(None)
    return {"images": images, "annotations": anns, "categories": cats}, polys


def noisy_detections(
    dataset: dict[str, Any], polys: list[np.ndarray | None], seed: int = 1
) -> list[dict[str, Any]]:
    """Perturbed copies of most objects (some with the wrong class, some duplicated), misses,
    and false positives (a few on the crowd region and on the empty image)."""
    rng = np.random.default_rng(seed)
    h, w = 240, 320
    dets = []

    def add(image_id: int, cat: int, poly: np.ndarray) -> None:
        box = polygon_box(poly, h, w)
        box = [box[0] + rng.normal(0, 1.5), box[1] + rng.normal(0, 1.5), *box[2:]]
        dets.append(
            {
                "image_id": image_id,
                "category_id": cat,
                "bbox": box,
                "score": float(rng.uniform(0.05, 1.0)),
                "segmentation": polygon_rle(poly, h, w),
            }
        )

    for ann, poly in zip(dataset["annotations"], polys, strict=True):
        if poly is None or rng.uniform() < 0.15:
            continue
        size = math.sqrt(ann["area"])
        jitter = poly + rng.normal(0, 0.08 * size, poly.shape) + rng.normal(0, 0.05 * size, 2)
        cat = ann["category_id"] if rng.uniform() < 0.9 else int(rng.choice([2, 5, 11]))
        add(ann["image_id"], cat, jitter)
        if rng.uniform() < 0.2:
            add(ann["image_id"], cat, poly + rng.normal(0, 0.15 * size, poly.shape))
    for img in dataset["images"]:
        for _ in range(3):
            r = float(rng.uniform(5, 60))
            poly = star_polygon(rng, rng.uniform(r, w - r), rng.uniform(r, h - r), r)
            add(img["id"], int(rng.choice([2, 5, 11])), poly)
    add(10, 5, star_polygon(rng, 70, 185, 25))  # inside the crowd region: ignored
    return dets


def reference_stats(
    dataset: dict[str, Any], dets: list[dict[str, Any]], iou_type: str, max_dets: int = 100
) -> np.ndarray:
    """pycocotools' own summarize() stats, on fresh copies of the ground truth and results."""
    keys = ["image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation"]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(dataset)
        gt.createIndex()
        dt = gt.loadRes([{k: copy.deepcopy(d[k]) for k in keys} for d in dets])
        E = COCOeval(gt, dt, iou_type)
        E.params.maxDets = [1, 10, max_dets]
        E.evaluate()
        E.accumulate()
        E.summarize()
    return E.stats


def gt_as_results(coco: COCO) -> list[dict[str, Any]]:
    """Every non-crowd annotation as a perfect detection (crowd regions are ignore regions)."""
    out = []
    for ann in coco.dataset["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        rle = coco.annToRLE(ann)
        counts = rle["counts"]
        out.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": list(ann["bbox"]),
                "score": 1.0,
                "segmentation": {
                    "size": list(rle["size"]),
                    "counts": counts.decode() if isinstance(counts, bytes) else counts,
                },
            }
        )
    return out


def coco_of(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@pytest.fixture(scope="module")
def synthetic() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    dataset, polys = synthetic_gt()
    return dataset, noisy_detections(dataset, polys)


# ---------------------------------------------------------------------------------------------
# Parity with pycocotools
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_parity_with_pycocotools_summarize(synthetic, iou_type):
    dataset, dets = synthetic
    ref = reference_stats(dataset, dets, iou_type)
    # The case must exercise every area range and be neither trivial nor hopeless.
    assert np.all((ref[:6] > 0.05) & (ref[:6] < 0.95)), ref
    ours = evaluate_coco(coco_of(dataset), copy.deepcopy(dets), iou_types=(iou_type,))
    assert list(ours) == [iou_type]
    assert list(ours[iou_type]) == STAT_KEYS
    for i, key in enumerate(STAT_KEYS):
        assert ours[iou_type][key] == pytest.approx(ref[i] * 100, abs=1e-9), key


def test_annotation_id_0_is_matched_like_any_other(synthetic):
    """pycocotools marks "unmatched" with id 0, so a detection matched to annotation 0 counts
    as a false positive there; our evaluation gives a 0-based ground truth the AP that
    pycocotools gives the same ground truth numbered from 1."""
    dataset, dets = synthetic
    lowest = min(a["id"] for a in dataset["annotations"])
    from_zero = copy.deepcopy(dataset)
    for ann in from_zero["annotations"]:
        ann["id"] -= lowest + 7  # ids from -7: 0 is one of them, and negative ones too
    assert 0 in {a["id"] for a in from_zero["annotations"]}
    gt = coco_of(from_zero)
    for iou_type in ("bbox", "segm"):
        right = reference_stats(dataset, dets, iou_type)
        # The case bites: pycocotools' own AP on the 0-based ids is lower.
        assert reference_stats(from_zero, dets, iou_type)[0] < right[0]
        ours = evaluate_coco(gt, copy.deepcopy(dets), iou_types=(iou_type,))[iou_type]
        for i, key in enumerate(STAT_KEYS):
            assert ours[key] == pytest.approx(right[i] * 100, abs=1e-9), key
    assert gt.dataset["annotations"] == from_zero["annotations"]  # not renumbered in place


def test_results_are_not_mutated_and_both_types_at_once(synthetic):
    dataset, dets = synthetic
    before = copy.deepcopy(dets)
    both = evaluate_coco(coco_of(dataset), dets)
    assert dets == before  # loadRes adds keys to the dicts it gets; ours gets copies
    assert set(both) == {"bbox", "segm"}
    assert both["segm"]["AP"] == pytest.approx(reference_stats(dataset, dets, "segm")[0] * 100)


def test_evaluate_from_files_and_image_subset(synthetic, tmp_path):
    dataset, dets = synthetic
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "res.json"
    gt_path.write_text(json.dumps(dataset))
    write_results(res_path, dets)
    from_lists = evaluate_coco(coco_of(dataset), dets)
    from_files = evaluate_coco(gt_path, res_path)
    for iou_type in ("bbox", "segm"):
        assert from_files[iou_type] == pytest.approx(from_lists[iou_type], abs=1e-9)

    # image_ids restricts the evaluation: the same as a dataset holding only those images.
    keep = [11, 12]
    subset = dict(dataset)
    subset["images"] = [i for i in dataset["images"] if i["id"] in keep]
    subset["annotations"] = [a for a in dataset["annotations"] if a["image_id"] in keep]
    sub_dets = [d for d in dets if d["image_id"] in keep]
    restricted = evaluate_coco(coco_of(dataset), dets, iou_types=("bbox",), image_ids=keep)
    assert restricted["bbox"]["AP"] == pytest.approx(
        reference_stats(subset, sub_dets, "bbox")[0] * 100, abs=1e-9
    )


def test_raised_max_dets_counts_more_detections():
    """> 100 objects per image: the default cap loses recall, max_dets=300 recovers it (and
    is not the -1 that pycocotools' summarize() prints for AP when maxDets[2] != 100)."""
    rng = np.random.default_rng(3)
    gts, dets = [], []
    for i in range(150):
        x, y = 30.0 * (i % 13) + 5, 30.0 * (i // 13) + 5
        gts.append(
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [x, y, 20.0, 20.0],
                "area": 400.0,
                "iscrowd": 0,
                "segmentation": [[x, y, x + 20, y, x + 20, y + 20, x, y + 20]],
            }
        )
        box = [x + rng.normal(0, 1.5), y + rng.normal(0, 1.5), 20.0, 20.0]
        dets.append({"image_id": 1, "category_id": 1, "bbox": box, "score": rng.uniform()})
    dataset = {
        "images": [{"id": 1, "width": 400, "height": 400}],
        "annotations": gts,
        "categories": [{"id": 1, "name": "dot"}],
    }
    gt = coco_of(dataset)
    ap100 = evaluate_coco(gt, dets, iou_types=("bbox",))["bbox"]
    ap300 = evaluate_coco(gt, dets, iou_types=("bbox",), max_dets=300)["bbox"]
    assert ap300["AP"] != -1 and ap300["AP"] >= ap100["AP"]
    assert ap300["AP50"] > ap100["AP50"] + 20  # a third of the objects were out of reach
    assert ap300["AR300"] == pytest.approx(100 * reference_recall(dataset, dets, 300))
    assert ap100["AP"] == pytest.approx(reference_stats(dataset, dets, "bbox")[0] * 100)


def reference_recall(dataset: dict[str, Any], dets: list[dict[str, Any]], cap: int) -> float:
    """AR at ``cap`` straight from pycocotools' accumulated recall array."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_of(dataset)
        E = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), "bbox")
        E.params.maxDets = [1, 10, cap]
        E.evaluate()
        E.accumulate()
    r = E.eval["recall"][:, :, 0, 2]
    return float(np.mean(r[r > -1]))


def test_empty_results_give_zero(synthetic):
    dataset, _ = synthetic
    metrics = evaluate_coco(coco_of(dataset), [])
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == 0.0
        assert metrics[iou_type]["APl"] == 0.0
        assert metrics[iou_type]["AR100"] == 0.0


def test_summarize_prints_only_when_asked(synthetic, capsys):
    dataset, dets = synthetic
    metrics = evaluate_coco(coco_of(dataset), dets, iou_types=("bbox",))
    assert capsys.readouterr().out == ""
    evaluate_coco(coco_of(dataset), dets, iou_types=("bbox",), summarize=True)
    out = capsys.readouterr().out
    assert out.strip() == format_table(metrics)
    assert "AP50" in out and f"{metrics['bbox']['AP']:.2f}" in out
    assert "-" in format_table({"bbox": {"AP": 12.5, "APl": -1.0}})


# ---------------------------------------------------------------------------------------------
# Ground truth against itself on real data
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not COCO_VAL6.is_file(), reason=f"real data absent: {COCO_VAL6}")
def test_coco_val6_ground_truth_scores_100():
    gt = load_coco(COCO_VAL6)
    results = gt_as_results(gt)
    assert len(results) == 35  # the crowd region is not a detection
    metrics = evaluate_coco(gt, results)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(100.0)
        assert metrics[iou_type]["AP75"] == pytest.approx(100.0)


@pytest.mark.skipif(not NUCLEI.is_file(), reason=f"real data absent: {NUCLEI}")
def test_nuclei_ground_truth_needs_raised_max_dets():
    """Up to 369 nuclei per image: perfect predictions score AP 73.3 at the default cap and
    100 with max_dets=400. Full segm set at 400; the bbox cap check runs on all images at 100
    and on the image with 125 nuclei (and two small ones) at 400 (pycocotools' matching is slow)."""
    gt = load_coco(NUCLEI)
    results = gt_as_results(gt)
    assert len(results) == 2885
    assert evaluate_coco(gt, results, iou_types=("segm",), max_dets=400)["segm"]["AP"] == (
        pytest.approx(100.0)
    )
    capped = evaluate_coco(gt, results, iou_types=("bbox",))["bbox"]["AP"]
    assert capped == pytest.approx(73.3, abs=0.05)
    subset = [45, 1, 2]
    sub_400 = evaluate_coco(gt, results, iou_types=("bbox",), max_dets=400, image_ids=subset)
    sub_100 = evaluate_coco(gt, results, iou_types=("bbox",), image_ids=subset)
    assert sub_400["bbox"]["AP"] == pytest.approx(100.0)
    assert sub_100["bbox"]["AP"] < 99.0


# ---------------------------------------------------------------------------------------------
# Results json
# ---------------------------------------------------------------------------------------------


def random_instances(n: int, h: int, w: int, seed: int = 0) -> Instances:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2]) + 1
    masks = torch.rand(n, h, w, generator=g) > 0.6
    masks[0] = False  # an empty mask
    if n > 1:
        masks[1] = True  # a full one
    return Instances(
        boxes=torch.cat([xy, xy + wh], dim=1),
        scores=torch.rand(n, generator=g),
        labels=torch.randint(0, 3, (n,), generator=g),
        masks=masks,
    )


@pytest.mark.parametrize("chunk_pixels", [None, 37 * 53 * 2])
def test_instances_to_coco_results_round_trip(chunk_pixels, monkeypatch):
    if chunk_pixels is not None:  # several pycocotools calls, as for many large masks
        monkeypatch.setattr(coco_eval, "_ENCODE_CHUNK_PIXELS", chunk_pixels)
    inst = random_instances(7, 37, 53)
    results = instances_to_coco_results(inst, image_id=42, category_ids=[3, 7, 9])
    assert len(results) == 7
    rles = [r["segmentation"] for r in results]
    assert all(isinstance(r["counts"], str) for r in rles)
    assert all(r["size"] == [37, 53] for r in rles)
    decoded = mask_utils.decode([{"size": r["size"], "counts": r["counts"]} for r in rles])
    assert np.array_equal(decoded, inst.masks.permute(1, 2, 0).numpy().astype(np.uint8))
    for r, box, score, label in zip(
        results, inst.boxes.tolist(), inst.scores.tolist(), inst.labels.tolist(), strict=True
    ):
        assert r["image_id"] == 42
        assert r["category_id"] == [3, 7, 9][label]
        x1, y1, x2, y2 = box
        assert r["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-5)
        assert r["score"] == pytest.approx(score)
    json.dumps(results)  # plain json types only


def test_instances_to_coco_results_without_masks_and_empty():
    inst = random_instances(3, 10, 12)
    inst.masks = None
    results = instances_to_coco_results(inst, 1, [5, 6, 7])
    assert all("segmentation" not in r for r in results)
    assert instances_to_coco_results(inst[torch.zeros(3, dtype=torch.bool)], 1, [5]) == []


def test_instances_to_coco_results_rejects_bad_labels():
    inst = random_instances(3, 10, 12)
    inst.labels = torch.tensor([0, 5, 1])
    with pytest.raises(ValueError, match=r"labels \[5\]"):
        instances_to_coco_results(inst, 1, [5, 6, 7])


def test_write_results_is_atomic(tmp_path):
    path = tmp_path / "results.json"
    good = [{"image_id": 1, "category_id": 2, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.5}]
    write_results(path, good)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_results(path, [*good, {"image_id": 1, "score": object()}])
    with pytest.raises(ValueError):
        write_results(path, [{"score": float("nan")}])  # NaN is not json
    assert path.read_bytes() == before
    assert json.loads(before) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_unknown_image_and_category_ids(synthetic):
    dataset, dets = synthetic
    bad_image = [*dets, {**dets[0], "image_id": 999999}]
    with pytest.raises(ValueError, match=r"image ids.*999999"):
        evaluate_coco(coco_of(dataset), bad_image)
    bad_cat = [*dets, {**dets[0], "category_id": 77}]
    with pytest.raises(ValueError, match=r"category ids.*77"):
        evaluate_coco(coco_of(dataset), bad_cat)
    with pytest.raises(ValueError, match=r"image_ids not in the ground truth.*123"):
        evaluate_coco(coco_of(dataset), dets, image_ids=[10, 123])


def test_segm_without_masks(synthetic):
    dataset, dets = synthetic
    boxes_only = [{k: v for k, v in d.items() if k != "segmentation"} for d in dets]
    with pytest.raises(ValueError, match=r"'segm'.*no 'segmentation'"):
        evaluate_coco(coco_of(dataset), boxes_only)
    assert evaluate_coco(coco_of(dataset), boxes_only, iou_types=("bbox",))["bbox"]["AP"] > 0


def test_mask_size_must_match_image(synthetic):
    dataset, dets = synthetic
    small = np.asfortranarray(np.ones((24, 32), np.uint8))
    rle = mask_utils.encode(small)
    bad = [*dets, {**dets[0], "segmentation": {"size": [24, 32], "counts": rle["counts"].decode()}}]
    with pytest.raises(ValueError, match=r"mask size \[24, 32\].*\[240, 320\]"):
        evaluate_coco(coco_of(dataset), bad, iou_types=("segm",))


def test_missing_and_malformed_gt(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=r"nope.json"):
        load_coco(missing)
    with pytest.raises(FileNotFoundError, match=r"nope.json"):
        evaluate_coco(missing, [])
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(ValueError, match=r"broken.json.*line 2 column"):
        load_coco(broken)
    not_coco = tmp_path / "list.json"
    not_coco.write_text('{"images": [], "categories": []}')
    with pytest.raises(ValueError, match=r"list.json.*'annotations'"):
        load_coco(not_coco)


def test_bad_arguments(synthetic):
    dataset, dets = synthetic
    with pytest.raises(ValueError, match="iou_types"):
        evaluate_coco(coco_of(dataset), dets, iou_types=("keypoints",))
    with pytest.raises(ValueError, match="max_dets"):
        evaluate_coco(coco_of(dataset), dets, max_dets=5)


# ---------------------------------------------------------------------------------------------
# Boundary AP
# ---------------------------------------------------------------------------------------------

IOU_THRESHOLDS = [0.5 + 0.05 * i for i in range(10)]


def reference_dilation(h: int, w: int) -> int:
    """Boundary width in pixels: max(1, round(0.02 * image diagonal)), halves rounded up."""
    return max(1, math.floor(0.02 * math.hypot(h, w) + 0.5))


def reference_boundary(mask: np.ndarray) -> np.ndarray:
    """The mask minus its erosion: ``d`` rounds of 3x3 erosion written as explicit loops, a
    pixel surviving a round only if its 8 neighbours and itself are inside the image and set."""
    h, w = mask.shape
    inner = [[bool(mask[y, x]) for x in range(w)] for y in range(h)]
    for _ in range(reference_dilation(h, w)):
        eroded = [[False] * w for _ in range(h)]
        for y in range(h):
            for x in range(w):
                eroded[y][x] = all(
                    0 <= y + dy < h and 0 <= x + dx < w and inner[y + dy][x + dx]
                    for dy in (-1, 0, 1)
                    for dx in (-1, 0, 1)
                )
        inner = eroded
    return np.array([[bool(mask[y, x]) and not inner[y][x] for x in range(w)] for y in range(h)])


def reference_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = float(np.logical_or(a, b).sum(dtype=np.float64))
    return float(np.logical_and(a, b).sum(dtype=np.float64)) / union if union else 0.0


def expected_ap(iou: float) -> float:
    """AP (percent) of one detection on one ground truth: 100 at thresholds the IoU reaches."""
    return 100.0 * sum(iou >= t for t in IOU_THRESHOLDS) / len(IOU_THRESHOLDS)


def boxes_mask(h: int, w: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Union of ``[y0, y1) x [x0, x1)`` rectangles given as ``(y0, x0, y1, x1)``."""
    mask = np.zeros((h, w), bool)
    for y0, x0, y1, x1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


def disc_mask(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def boundary_case(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(ground truth, detection) masks. Image sizes give boundary widths 1, 2 and 3."""
    rect = boxes_mask(40, 50, [(8, 10, 32, 40)])
    wide = boxes_mask(64, 96, [(10, 20, 50, 80)])
    bar = [(20, 10, 26, 70)]
    cases = {
        # One side 1 px in: mask IoU 0.97, boundary IoU 0.63.
        "side_in": (rect, boxes_mask(40, 50, [(8, 10, 32, 39)])),
        "corner_cut": (rect, rect & ~boxes_mask(40, 50, [(8, 10, 12, 14)])),
        "disc_shift": (disc_mask(60, 80, 30, 40, 18), disc_mask(60, 80, 30, 41, 18)),
        "small_notch": (wide, wide & ~boxes_mask(64, 96, [(10, 40, 14, 44)])),
        "large_notch": (wide, wide & ~boxes_mask(64, 96, [(10, 40, 22, 52)])),
        # A thin bar (all boundary) and an extra thick blob: here mask IoU is the smaller.
        "bar_blob": (boxes_mask(100, 120, bar), boxes_mask(100, 120, [*bar, (60, 80, 76, 96)])),
        # Touching the image border: out-of-image is background, so the border is boundary.
        "border": (boxes_mask(40, 50, [(0, 0, 30, 35)]), boxes_mask(40, 50, [(0, 0, 30, 34)])),
        "border_grow": (boxes_mask(40, 50, [(0, 0, 20, 25)]), boxes_mask(40, 50, [(0, 0, 20, 26)])),
    }
    return cases[name]


BOUNDARY_CASES = [
    "side_in",
    "corner_cut",
    "disc_shift",
    "small_notch",
    "large_notch",
    "bar_blob",
    "border",
    "border_grow",
]


def single_pair_eval(gt_mask: np.ndarray, dt_mask: np.ndarray) -> dict[str, dict[str, float]]:
    """segm and boundary metrics of one detection (score 1) on one ground truth."""
    h, w = gt_mask.shape

    def rle(mask: np.ndarray) -> dict[str, Any]:
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [h, w], "counts": encoded["counts"].decode("ascii")}

    ys, xs = np.nonzero(gt_mask)
    box = [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]
    dataset = {
        "images": [{"id": 1, "height": h, "width": w, "file_name": "x.png"}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": rle(gt_mask),
                "area": float(gt_mask.sum()),
                "bbox": box,
                "iscrowd": 0,
            }
        ],
    }
    result = {"image_id": 1, "category_id": 1, "score": 1.0, "segmentation": rle(dt_mask)}
    return evaluate_coco(coco_of(dataset), [result], iou_types=("segm", "boundary"))


def test_reference_boundary_is_the_inner_band():
    """The reference itself: a d-pixel inner band, the image border counting as outside."""
    assert [reference_dilation(h, w) for h, w in [(40, 50), (60, 80), (64, 96), (100, 120)]] == [
        1,
        2,
        2,
        3,
    ]
    rect = boxes_mask(64, 96, [(10, 20, 50, 80)])  # 40 x 60, d = 2
    assert np.array_equal(reference_boundary(rect), rect & ~boxes_mask(64, 96, [(12, 22, 48, 78)]))
    full = np.ones((40, 50), bool)  # d = 1: the outermost ring of the image
    assert np.array_equal(reference_boundary(full), full & ~boxes_mask(40, 50, [(1, 1, 39, 49)]))


@pytest.mark.parametrize("name", BOUNDARY_CASES)
def test_boundary_ap_matches_brute_force_boundary_iou(name):
    gt_mask, dt_mask = boundary_case(name)
    mask_iou = reference_iou(gt_mask, dt_mask)
    boundary_iou = reference_iou(reference_boundary(gt_mask), reference_boundary(dt_mask))
    iou = min(mask_iou, boundary_iou)
    # Each case is informative: the IoU lies in (0.5, 0.95) and clear of every threshold.
    assert 0.5 < iou < 0.95, (name, iou)
    assert min(abs(iou - t) for t in IOU_THRESHOLDS) > 1e-3, (name, iou)
    metrics = single_pair_eval(gt_mask, dt_mask)
    assert metrics["boundary"]["AP"] == pytest.approx(expected_ap(iou), abs=1e-9)
    assert metrics["segm"]["AP"] == pytest.approx(expected_ap(mask_iou), abs=1e-9)


def test_boundary_cases_cover_varied_outcomes():
    """The cases above land on several AP values, and in some mask IoU decides, in others
    boundary IoU: a checker that ignored either half of min() would fail one of them."""
    aps, mask_decides, boundary_decides = set(), 0, 0
    for name in BOUNDARY_CASES:
        gt_mask, dt_mask = boundary_case(name)
        mask_iou = reference_iou(gt_mask, dt_mask)
        boundary_iou = reference_iou(reference_boundary(gt_mask), reference_boundary(dt_mask))
        aps.add(expected_ap(min(mask_iou, boundary_iou)))
        if expected_ap(mask_iou) < expected_ap(boundary_iou):
            mask_decides += 1
        if expected_ap(boundary_iou) < expected_ap(mask_iou):
            boundary_decides += 1
    assert len(aps) >= 5 and mask_decides >= 1 and boundary_decides >= 5


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """3x3 dilation, ``pixels`` times."""
    for _ in range(pixels):
        padded = np.pad(mask, 1)
        grown = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                grown |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
        mask = grown
    return mask


def test_ground_truth_scores_100_on_boundary(synthetic):
    dataset, _ = synthetic
    gt = coco_of(dataset)
    metrics = evaluate_coco(gt, gt_as_results(gt), iou_types=("boundary",))
    assert list(metrics) == ["boundary"] and list(metrics["boundary"]) == STAT_KEYS
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert metrics["boundary"][key] == pytest.approx(100.0), key


@pytest.mark.skipif(not COCO_VAL6.is_file(), reason=f"real data absent: {COCO_VAL6}")
def test_coco_val6_ground_truth_scores_100_on_boundary():
    gt = load_coco(COCO_VAL6)  # holds a crowd region (uncompressed RLE)
    metrics = evaluate_coco(gt, gt_as_results(gt), iou_types=("bbox", "segm", "boundary"))
    assert list(metrics) == ["bbox", "segm", "boundary"]
    assert metrics["boundary"]["AP"] == pytest.approx(100.0)
    assert metrics["boundary"]["AP75"] == pytest.approx(100.0)


def test_dilated_masks_lose_more_boundary_ap_than_mask_ap(synthetic):
    """Growing every mask by 2 px barely moves mask IoU of large objects but shifts their
    whole boundary band (8 px wide on these 240x320 images)."""
    dataset, _ = synthetic
    gt = coco_of(dataset)
    results = gt_as_results(gt)
    for r in results:
        mask = dilate(mask_utils.decode(r["segmentation"]).astype(bool), 2)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    metrics = evaluate_coco(gt, results, iou_types=("segm", "boundary"))
    segm, boundary = metrics["segm"], metrics["boundary"]
    assert 0 < boundary["AP"] < segm["AP"] - 5
    assert boundary["APl"] < segm["APl"] - 30
    assert all(boundary[k] <= segm[k] + 1e-9 for k in ("AP", "AP50", "AP75", "APm", "APl"))


def test_boundary_does_not_mutate_inputs_and_composes(synthetic):
    dataset, dets = synthetic
    gt = coco_of(dataset)
    gt_before, dets_before = copy.deepcopy(gt.dataset), copy.deepcopy(dets)
    alone = evaluate_coco(gt, dets, iou_types=("boundary",))
    assert gt.dataset == gt_before and dets == dets_before
    # After segm has turned the ground truth's polygons into RLEs in place, same numbers.
    together = evaluate_coco(gt, dets, iou_types=("segm", "boundary"))
    assert together["boundary"] == alone["boundary"]
    assert 0 < alone["boundary"]["AP"] < together["segm"]["AP"]
    # image_ids restricts boundary evaluation as it does the others.
    keep = [11, 12]
    subset = dict(dataset)
    subset["images"] = [i for i in dataset["images"] if i["id"] in keep]
    subset["annotations"] = [a for a in dataset["annotations"] if a["image_id"] in keep]
    sub_dets = [d for d in dets if d["image_id"] in keep]
    restricted = evaluate_coco(coco_of(dataset), dets, iou_types=("boundary",), image_ids=keep)
    on_subset = evaluate_coco(coco_of(subset), sub_dets, iou_types=("boundary",))
    assert restricted["boundary"] == pytest.approx(on_subset["boundary"], abs=1e-9)
    assert evaluate_coco(gt, [], iou_types=("boundary",))["boundary"]["AP"] == 0.0


def test_boundary_with_raised_max_dets():
    """150 squares in one image: the default cap of 100 loses a third, max_dets=300 not."""
    side, anns, results = 20, [], []
    for i in range(150):
        x, y = 30 * (i % 13) + 5, 30 * (i // 13) + 5
        mask = boxes_mask(400, 400, [(y, x, y + side, x + side)])
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        seg = {"size": [400, 400], "counts": rle["counts"].decode("ascii")}
        box = [float(x), float(y), float(side), float(side)]
        anns.append(
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": seg,
                "area": float(side * side),
                "bbox": box,
                "iscrowd": 0,
            }
        )
        results.append(
            {"image_id": 1, "category_id": 1, "score": 1.0 - i / 1000, "segmentation": seg}
        )
    dataset = {
        "images": [{"id": 1, "width": 400, "height": 400}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "square"}],
    }
    capped = evaluate_coco(coco_of(dataset), results, iou_types=("boundary",))["boundary"]
    raised = evaluate_coco(coco_of(dataset), results, iou_types=("boundary",), max_dets=300)
    assert raised["boundary"]["AP"] == pytest.approx(100.0)
    assert raised["boundary"]["AR300"] == pytest.approx(100.0)
    assert capped["AP"] < 70.0


def test_boundary_needs_masks(synthetic):
    dataset, dets = synthetic
    boxes_only = [{k: v for k, v in d.items() if k != "segmentation"} for d in dets]
    with pytest.raises(ValueError, match=r"iou type 'boundary' requested.*no 'segmentation'"):
        evaluate_coco(coco_of(dataset), boxes_only, iou_types=("bbox", "boundary"))
    some = [*dets[:3], boxes_only[3]]
    with pytest.raises(ValueError, match=r"'boundary' evaluation needs 'segmentation'.*result 3"):
        evaluate_coco(coco_of(dataset), some, iou_types=("boundary",))
    with pytest.raises(ValueError, match=r"iou types 'segm', 'boundary' requested"):
        evaluate_coco(coco_of(dataset), boxes_only, iou_types=("segm", "boundary"))
    no_gt_masks = copy.deepcopy(dataset)
    del no_gt_masks["annotations"][0]["segmentation"]
    with pytest.raises(ValueError, match=r"'boundary' requested but ground-truth annotations"):
        evaluate_coco(coco_of(no_gt_masks), dets, iou_types=("boundary",))
    with pytest.raises(ValueError, match=r"iou_types must be .*'boundary'.*keypoints"):
        evaluate_coco(coco_of(dataset), dets, iou_types=("keypoints",))


def test_boundary_is_not_in_the_default_types(synthetic):
    dataset, dets = synthetic
    assert set(evaluate_coco(coco_of(dataset), dets)) == {"bbox", "segm"}
    assert coco_eval.IOU_TYPES == ("bbox", "segm", "boundary")
    table = format_table(evaluate_coco(coco_of(dataset), dets, iou_types=coco_eval.IOU_TYPES))
    rows = table.splitlines()
    assert [row.split()[0] for row in rows] == ["type", "bbox", "segm", "boundary"]
    assert len({len(row) for row in rows}) == 1  # columns line up with the longer label
