"""Tests for ``instseg.evaluation`` (COCO results json and COCO AP).

The reference is pycocotools itself, called directly here (``loadRes`` + ``COCOeval`` +
``summarize()``) on its own copy of the ground truth, never through the code under test.
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
