"""LVIS evaluation, AP* and the cocofied LVIS json (``instseg.evaluation.lvis``).

Two independent references:

- the official lvis-api (0.5.3): its metrics of the cases of ``tests/lvis_cases.py`` are
  recorded in ``tests/fixtures/lvis/official_metrics.json`` by ``record_official.py``, run in
  an environment of its own (lvis-api needs numpy < 1.24); where that environment exists
  (``/work/lvisvenv``, or ``INSTSEG_LVIS_PYTHON``) the recording is also redone live;
- a brute-force float64 re-statement of the federated rules below, written with plain loops
  from the spec (§12.1), IoUs from pycocotools (masks) or a hand-written box IoU.

Hand-made cases pin each federated rule to the AP it must give.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from instseg.evaluation.lvis import (
    COCO_ID_TO_LVIS_SYNSET,
    cocofy_lvis,
    evaluate_lvis,
    is_lvis_dataset,
    limit_detections_per_image,
)
from lvis_cases import CASES, UNKNOWN_CATEGORY, make_case

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lvis"
OFFICIAL = FIXTURES / "official_metrics.json"
LVIS_PYTHON = Path(os.environ.get("INSTSEG_LVIS_PYTHON", "/work/lvisvenv/bin/python"))
IOU_THRS = np.linspace(0.5, 0.95, 10)
REC_THRS = np.linspace(0.0, 1.0, 101)
AREAS = {"all": (0, 1e10), "small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, 1e10)}


# ---------------------------------------------------------------------------------------------
# Brute-force reference
# ---------------------------------------------------------------------------------------------


def _box_iou(d: list[float], g: list[float]) -> float:
    ix = max(0.0, min(d[0] + d[2], g[0] + g[2]) - max(d[0], g[0]))
    iy = max(0.0, min(d[1] + d[3], g[1] + g[3]) - max(d[1], g[1]))
    inter = ix * iy
    union = d[2] * d[3] + g[2] * g[3] - inter
    return inter / union if union > 0 else 0.0


def _gt_rle(ann: dict[str, Any], img: dict[str, Any]) -> dict[str, Any]:
    return mask_utils.merge(
        mask_utils.frPyObjects(ann["segmentation"], img["height"], img["width"])
    )


def _det_rle(r: dict[str, Any]) -> dict[str, Any]:
    return {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}


def brute_force_lvis(
    gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str, cap: int
) -> dict[str, float]:
    images = {img["id"]: img for img in gt["images"]}
    cat_ids = sorted(c["id"] for c in gt["categories"])
    # 1. At most `cap` detections per image, the best-scoring (stable for equal scores).
    per_image = defaultdict(list)
    for r in results:
        per_image[r["image_id"]].append(r)
    dets = []
    for rs in per_image.values():
        order = sorted(range(len(rs)), key=lambda k: (-rs[k]["score"], k))
        dets += [rs[k] for k in order[:cap]]
    # 2. Federated filter: keep category c in image I only if c has GT in I or is negative.
    positives = defaultdict(set)
    for a in gt["annotations"]:
        positives[a["image_id"]].add(a["category_id"])
    dets = [
        d
        for d in dets
        if d["category_id"] in positives[d["image_id"]]
        or d["category_id"] in images[d["image_id"]]["neg_category_ids"]
    ]
    gts_of = defaultdict(list)
    for a in gt["annotations"]:
        gts_of[a["image_id"], a["category_id"]].append(a)

    def det_area(d: dict[str, Any]) -> float:
        if iou_type == "bbox":
            return d["bbox"][2] * d["bbox"][3]
        return float(mask_utils.area(_det_rle(d)))

    # 3. Results of area 0 take no part (nor would ground truth of area 0).
    dets = [d for d in dets if det_area(d) > 0]
    dts_of = defaultdict(list)
    for d in dets:
        dts_of[d["image_id"], d["category_id"]].append(d)

    def iou(d: dict[str, Any], g: dict[str, Any]) -> float:
        if iou_type == "bbox":
            return _box_iou(d["bbox"], g["bbox"])
        img = images[g["image_id"]]
        return float(mask_utils.iou([_det_rle(d)], [_gt_rle(g, img)], [0])[0, 0])

    T, R, K = len(IOU_THRS), len(REC_THRS), len(cat_ids)
    precision = -np.ones((T, R, K, len(AREAS)))
    recall = -np.ones((T, K, len(AREAS)))
    for k, c in enumerate(cat_ids):
        for a, (lo, hi) in enumerate(AREAS.values()):
            scores, matched, ignored, num_gt = [], [], [], 0
            for image_id in sorted(images):
                g = gts_of[image_id, c]
                d = dts_of[image_id, c]
                if not g and not d:
                    continue
                g_ig = [1 if (x["area"] < lo or x["area"] > hi) else 0 for x in g]
                g_order = sorted(range(len(g)), key=lambda j: (g_ig[j], j))
                g = [g[j] for j in g_order]
                g_ig = [g_ig[j] for j in g_order]
                d = [d[j] for j in sorted(range(len(d)), key=lambda j: (-d[j]["score"], j))]
                num_gt += g_ig.count(0)
                ious = [[iou(x, y) for y in g] for x in d]
                m = np.zeros((T, len(d)), bool)
                ig = np.zeros((T, len(d)), bool)
                for t, thr in enumerate(IOU_THRS):
                    taken = [False] * len(g)
                    for i in range(len(d)):
                        best, best_iou = -1, min(thr, 1 - 1e-10)
                        for j in range(len(g)):
                            if taken[j]:
                                continue
                            if best > -1 and g_ig[best] == 0 and g_ig[j] == 1:
                                break
                            if ious[i][j] < best_iou:
                                continue
                            best, best_iou = j, ious[i][j]
                        if best > -1:
                            taken[best] = True
                            m[t, i] = True
                            ig[t, i] = bool(g_ig[best])
                for i, x in enumerate(d):
                    out_of_range = det_area(x) < lo or det_area(x) > hi
                    not_exhaustive = c in images[image_id]["not_exhaustive_category_ids"]
                    ig[:, i] |= ~m[:, i] & (out_of_range or not_exhaustive)
                scores += [x["score"] for x in d]
                matched.append(m)
                ignored.append(ig)
            if num_gt == 0 or not matched:
                continue
            order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
            m = np.concatenate(matched, axis=1)[:, order]
            ig = np.concatenate(ignored, axis=1)[:, order]
            for t in range(T):
                tp = np.cumsum(m[t] & ~ig[t]).astype(np.float64)
                fp = np.cumsum(~m[t] & ~ig[t]).astype(np.float64)
                rc = tp / num_gt
                recall[t, k, a] = rc[-1] if len(tp) else 0.0
                pr = list(tp / (fp + tp + np.spacing(1)))
                for i in range(len(pr) - 1, 0, -1):
                    pr[i - 1] = max(pr[i - 1], pr[i])
                q = np.zeros(R)
                for r_idx, pos in enumerate(np.searchsorted(rc, REC_THRS, side="left")):
                    if pos < len(pr):
                        q[r_idx] = pr[pos]
                precision[t, :, k, a] = q

    def mean(s: np.ndarray) -> float:
        s = s[s > -1]
        return float(s.mean()) * 100 if s.size else -1.0

    freq = [next(x["frequency"] for x in gt["categories"] if x["id"] == c) for c in cat_ids]
    group = {f: [k for k in range(K) if freq[k] == f] for f in "rcf"}
    return {
        "AP": mean(precision[..., 0]),
        "AP50": mean(precision[0, :, :, 0]),
        "AP75": mean(precision[5, :, :, 0]),
        "APs": mean(precision[..., 1]),
        "APm": mean(precision[..., 2]),
        "APl": mean(precision[..., 3]),
        "APr": mean(precision[:, :, group["r"], 0]),
        "APc": mean(precision[:, :, group["c"], 0]),
        "APf": mean(precision[:, :, group["f"], 0]),
        f"AR{cap}": mean(recall[:, :, 0]),
        "ARs": mean(recall[:, :, 1]),
        "ARm": mean(recall[:, :, 2]),
        "ARl": mean(recall[:, :, 3]),
    }


# ---------------------------------------------------------------------------------------------
# Against the references
# ---------------------------------------------------------------------------------------------

RECORDED = [
    (name, iou_type, cap)
    for name, caps in {"small": [300, 3], "medium": [300], "crowded": [300]}.items()
    for cap in caps
    for iou_type in ("bbox", "segm")
]


def _official_key(key: str) -> str:
    """lvis-api's summary names ('AR@300', 'ARs@300') as ours ('AR300', 'ARs')."""
    if key.startswith("AR@"):
        return "AR" + key[3:]
    return key.split("@")[0]


@pytest.mark.parametrize(("name", "iou_type", "cap"), RECORDED)
def test_equals_recorded_official_lvis_api(name: str, iou_type: str, cap: int) -> None:
    recorded = json.loads(OFFICIAL.read_text())["cases"][f"{name}/{iou_type}/{cap}"]
    gt, results = make_case(**CASES[name])
    ours = evaluate_lvis(gt, results, iou_types=(iou_type,), max_dets=cap)[iou_type]
    official = {_official_key(k): v for k, v in recorded.items()}
    assert set(ours) == set(official)
    for key, value in official.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize(("name", "iou_type", "cap"), RECORDED)
def test_equals_brute_force(name: str, iou_type: str, cap: int) -> None:
    gt, results = make_case(**CASES[name])
    ours = evaluate_lvis(gt, copy.deepcopy(results), iou_types=(iou_type,), max_dets=cap)
    reference = brute_force_lvis(gt, results, iou_type, cap)
    assert set(ours[iou_type]) == set(reference)
    for key, value in reference.items():
        assert ours[iou_type][key] == pytest.approx(value, abs=1e-9), key


def test_cases_exercise_every_rule() -> None:
    """The recorded cases are only as good as what they contain."""
    gt, results = make_case(**CASES["crowded"])
    per_image = defaultdict(int)
    for r in results:
        per_image[r["image_id"]] += 1
    assert max(per_image.values()) > 300
    assert any(r["category_id"] == UNKNOWN_CATEGORY for r in results)
    assert any(r["bbox"][2] * r["bbox"][3] == 0 for r in results)
    gt, results = make_case(**CASES["medium"])
    images = {img["id"]: img for img in gt["images"]}
    positives = defaultdict(set)
    for a in gt["annotations"]:
        positives[a["image_id"]].add(a["category_id"])
    kinds = set()
    for r in results:
        img, c = images[r["image_id"]], r["category_id"]
        if c in img["not_exhaustive_category_ids"]:
            kinds.add("not_exhaustive")
        elif c in positives[img["id"]]:
            kinds.add("positive")
        elif c in img["neg_category_ids"]:
            kinds.add("negative")
        else:
            kinds.add("dropped")
    assert kinds == {"not_exhaustive", "positive", "negative", "dropped"}
    assert {c["frequency"] for c in gt["categories"]} == {"r", "c", "f"}


@pytest.mark.skipif(not LVIS_PYTHON.is_file(), reason=f"no lvis-api environment at {LVIS_PYTHON}")
def test_recording_is_reproduced_live(tmp_path: Path) -> None:
    out = tmp_path / "official.json"
    script = FIXTURES / "record_official.py"
    subprocess.run([str(LVIS_PYTHON), str(script), str(out)], check=True, capture_output=True)
    assert json.loads(out.read_text())["cases"] == json.loads(OFFICIAL.read_text())["cases"]


# ---------------------------------------------------------------------------------------------
# The federated rules, one at a time
# ---------------------------------------------------------------------------------------------


def _square(x: float, y: float, s: float = 10.0) -> list[float]:
    return [x, y, x + s, y, x + s, y + s, x, y + s]


def _tiny(neg2: list[int], not_exhaustive1: list[int]) -> dict[str, Any]:
    """Two 40x40 images; image 1 holds one object of category 1 at (5, 5)."""

    def image(i: int, neg: list[int], nel: list[int]) -> dict[str, Any]:
        return {
            "id": i,
            "height": 40,
            "width": 40,
            "neg_category_ids": neg,
            "not_exhaustive_category_ids": nel,
        }

    return {
        "images": [image(1, [], not_exhaustive1), image(2, neg2, [])],
        "categories": [{"id": 1, "frequency": "f"}, {"id": 2, "frequency": "r"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": [_square(5, 5)],
                "bbox": [5.0, 5.0, 10.0, 10.0],
                "area": 100.0,
            }
        ],
    }


def _det(image_id: int, x: float, score: float, category: int = 1) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "category_id": category,
        "bbox": [x, 5.0, 10.0, 10.0],
        "score": score,
    }


def test_negative_category_detection_is_a_false_positive() -> None:
    hit, stray = _det(1, 5.0, 0.5), _det(2, 5.0, 0.9)
    unknown = evaluate_lvis(_tiny([], []), [hit, stray], iou_types=("bbox",))["bbox"]
    assert unknown["AP"] == pytest.approx(100.0)  # image 2 says nothing of category 1: dropped
    negative = evaluate_lvis(_tiny([1], []), [hit, stray], iou_types=("bbox",))["bbox"]
    assert negative["AP"] == pytest.approx(50.0)  # precision 1/2 at the only recall level
    assert negative["APf"] == negative["AP"] and negative["APr"] == -1.0


def test_not_exhaustive_category_ignores_unmatched_detections() -> None:
    hit, stray = _det(1, 5.0, 0.5), _det(1, 25.0, 0.9)  # the stray one overlaps nothing
    exhaustive = evaluate_lvis(_tiny([], []), [hit, stray], iou_types=("bbox",))["bbox"]
    assert exhaustive["AP"] == pytest.approx(50.0)
    not_exhaustive = evaluate_lvis(_tiny([], [1]), [hit, stray], iou_types=("bbox",))["bbox"]
    assert not_exhaustive["AP"] == pytest.approx(100.0)


def test_per_image_cap_keeps_the_best_scores() -> None:
    hit = _det(1, 5.0, 0.5)
    strays = [_det(1, 25.0, 0.6 + 0.01 * k) for k in range(3)]
    assert evaluate_lvis(_tiny([], []), [hit, *strays], ("bbox",), max_dets=3)["bbox"]["AP"] == 0
    kept = limit_detections_per_image([hit, *strays, _det(2, 5.0, 0.1)], 3)
    assert [r["score"] for r in kept] == [0.62, 0.61, 0.6, 0.1]


def test_area_zero_detections_take_no_part() -> None:
    """lvis-api keeps areas strictly above 0: an empty detection is no false positive."""
    hit, empty = _det(1, 5.0, 0.5), {**_det(1, 0.0, 0.9), "bbox": [3.0, 3.0, 0.0, 4.0]}
    assert evaluate_lvis(_tiny([], []), [hit, empty], ("bbox",))["bbox"]["AP"] == 100.0
    thin = {**empty, "bbox": [3.0, 3.0, 0.5, 4.0]}  # area 2 > 0: a false positive
    assert evaluate_lvis(_tiny([], []), [hit, thin], ("bbox",))["bbox"]["AP"] == 50.0


def test_unknown_category_is_dropped_and_empty_results_score_zero() -> None:
    hit = _det(1, 5.0, 0.5)
    metrics = evaluate_lvis(_tiny([], []), [hit, _det(1, 5.0, 0.9, category=7)], ("bbox",))
    assert metrics["bbox"]["AP"] == pytest.approx(100.0)
    assert evaluate_lvis(_tiny([], []), [])["segm"]["AP"] == 0.0


def test_bad_ground_truth_and_results_are_named() -> None:
    gt = _tiny([], [])
    del gt["categories"][0]["frequency"]
    with pytest.raises(ValueError, match="category 1 has frequency None"):
        evaluate_lvis(gt, [])
    gt = _tiny([], [])
    gt["annotations"][0]["iscrowd"] = 1
    with pytest.raises(ValueError, match="annotation 1 sets 'iscrowd'"):
        evaluate_lvis(gt, [])
    gt = _tiny([], [])
    del gt["images"][1]["neg_category_ids"]
    with pytest.raises(ValueError, match="image 2 has no 'neg_category_ids'"):
        evaluate_lvis(gt, [])
    with pytest.raises(ValueError, match="image ids not in the ground truth: \\[5\\]"):
        evaluate_lvis(_tiny([], []), [_det(5, 5.0, 0.5)], ("bbox",))
    with pytest.raises(ValueError, match="'segmentation'"):
        evaluate_lvis(_tiny([], []), [_det(1, 5.0, 0.5)], ("segm",))
    with pytest.raises(ValueError, match="iou_types"):
        evaluate_lvis(_tiny([], []), [], ("boundary",))


def test_is_lvis_dataset() -> None:
    assert is_lvis_dataset(_tiny([], []))
    coco = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], "annotations": []}
    assert not is_lvis_dataset(coco)


# ---------------------------------------------------------------------------------------------
# Cocofied LVIS (AP*)
# ---------------------------------------------------------------------------------------------


def test_cocofy_maps_synsets_to_coco_ids_as_detectron2() -> None:
    """A hand-made LVIS file; the expected json follows prepare_cocofied_lvis.py's rules."""
    lvis = {
        "info": {"v": "0.5"},
        "licenses": [],
        "categories": [
            {"id": 1, "synset": "aardvark.n.01", "frequency": "r"},
            {"id": 2, "synset": "person.n.01", "frequency": "f"},
            {"id": 3, "synset": "bag.n.06", "frequency": "c"},  # suitcase, only in neg lists
            {"id": 4, "synset": "bag.n.04", "frequency": "f"},  # handbag
            {"id": 5, "synset": "necktie.n.01", "frequency": "c"},  # never used: dropped
        ],
        "images": [
            {"id": 7, "neg_category_ids": [1, 3], "not_exhaustive_category_ids": [2]},
            {"id": 9, "neg_category_ids": [], "not_exhaustive_category_ids": [1]},
        ],
        "annotations": [
            {"id": 11, "image_id": 7, "category_id": 1, "area": 3.0},
            {"id": 12, "image_id": 7, "category_id": 2, "area": 4.0},
            {"id": 13, "image_id": 9, "category_id": 4, "area": 5.0},
            {"id": 14, "image_id": 9, "category_id": 2, "area": 6.0},
        ],
    }
    before = copy.deepcopy(lvis)
    out = cocofy_lvis(lvis)
    assert lvis == before
    assert out["info"] == {"v": "0.5"} and out["licenses"] == []
    assert out["annotations"] == [
        {"id": 1, "image_id": 7, "category_id": 1, "area": 4.0},
        {"id": 2, "image_id": 9, "category_id": 31, "area": 5.0},
        {"id": 3, "image_id": 9, "category_id": 1, "area": 6.0},
    ]
    assert out["images"] == [
        {"id": 7, "neg_category_ids": [33], "not_exhaustive_category_ids": [1]},
        {"id": 9, "neg_category_ids": [], "not_exhaustive_category_ids": []},
    ]
    assert out["categories"] == [
        {"id": 1, "synset": "person.n.01", "frequency": "f"},
        {"id": 33, "synset": "bag.n.06", "frequency": "c"},
        {"id": 31, "synset": "bag.n.04", "frequency": "f"},
    ]


def test_coco_synset_table() -> None:
    coco_ids = sorted(COCO_ID_TO_LVIS_SYNSET)
    assert len(coco_ids) == 80 and len(set(COCO_ID_TO_LVIS_SYNSET.values())) == 80
    # COCO's 80 ids: 1..90 without the 10 ids the 2014 release left out.
    assert set(range(1, 91)) - set(coco_ids) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    assert COCO_ID_TO_LVIS_SYNSET[11] == "fireplug.n.01"
    assert COCO_ID_TO_LVIS_SYNSET[37] == "ball.n.06"
    assert COCO_ID_TO_LVIS_SYNSET[46] == "wineglass.n.01"


def test_cocofied_json_scores_coco_results() -> None:
    """AP*: COCO-id results against a cocofied file go through the LVIS rules."""
    gt, results = make_case(**CASES["small"])
    for k, cat in enumerate(gt["categories"]):
        cat["synset"] = list(COCO_ID_TO_LVIS_SYNSET.values())[k]
    cocofied = cocofy_lvis(gt)
    synset_to_coco = {synset: coco_id for coco_id, synset in COCO_ID_TO_LVIS_SYNSET.items()}
    lvis_to_coco = {c["id"]: synset_to_coco[c["synset"]] for c in gt["categories"]}
    coco_results = [
        {**r, "category_id": lvis_to_coco[r["category_id"]]}
        for r in results
        if r["category_id"] in lvis_to_coco
    ]
    ours = evaluate_lvis(cocofied, coco_results)
    lvis = evaluate_lvis(gt, results)
    for key in ("AP", "AP50", "APr", "APc", "APf"):
        assert ours["segm"][key] == pytest.approx(lvis["segm"][key], abs=1e-9)


# ---------------------------------------------------------------------------------------------
# The commands: `instseg score` and `instseg cocofy-lvis`
# ---------------------------------------------------------------------------------------------


def test_score_command_picks_the_protocol_and_iou_types(tmp_path: Path, capsys) -> None:
    from instseg.cli import main

    gt, results = make_case(**CASES["small"])
    gt_path, res_path, out = tmp_path / "gt.json", tmp_path / "res.json", tmp_path / "m.json"
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps(results))
    assert (
        main(["score", "--ann", str(gt_path), "--results", str(res_path), "--out", str(out)]) == 0
    )
    assert "APr" in capsys.readouterr().out
    assert json.loads(out.read_text()) == evaluate_lvis(gt, results)
    # Mask-only results: mask AP only.
    masks_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    res_path.write_text(json.dumps(masks_only))
    assert (
        main(["score", "--ann", str(gt_path), "--results", str(res_path), "--out", str(out)]) == 0
    )
    assert list(json.loads(out.read_text())) == ["segm"]
    # Broken inputs: one line naming the problem, nothing written.
    out.unlink()
    res_path.write_text("[{")
    assert (
        main(["score", "--ann", str(gt_path), "--results", str(res_path), "--out", str(out)]) == 2
    )
    assert f"results file {res_path} is not valid json" in capsys.readouterr().err
    res_path.write_text(json.dumps([{"image_id": 10, "score": 1.0, "bbox": [0, 0, 1, 1]}]))
    assert main(["score", "--ann", str(gt_path), "--results", str(res_path)]) == 2
    assert "result 0 lacks ['category_id']" in capsys.readouterr().err
    assert not out.exists()


def test_cocofy_command(tmp_path: Path, capsys) -> None:
    from instseg.cli import main

    gt, _ = make_case(**CASES["small"])
    coco_synsets = list(COCO_ID_TO_LVIS_SYNSET.values())
    for k, cat in enumerate(gt["categories"]):  # 5 COCO categories (ids 1-5), 5 others
        cat["synset"] = coco_synsets[k] if k < 5 else f"other{k}.n.01"
    src, dst = tmp_path / "lvis.json", tmp_path / "cocofied.json"
    src.write_text(json.dumps(gt))
    assert main(["cocofy-lvis", str(src), str(dst)]) == 0
    assert json.loads(dst.read_text()) == cocofy_lvis(gt)
    assert {c["id"] for c in json.loads(dst.read_text())["categories"]} <= {1, 2, 3, 4, 5}
    src.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1}]}))
    assert main(["cocofy-lvis", str(src), str(dst)]) == 2
    assert "categories[0] needs 'id' and 'synset'" in capsys.readouterr().err
