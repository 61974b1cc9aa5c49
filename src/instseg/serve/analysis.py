"""What the evaluation page shows, computed from a ground truth and a results json.

- Metrics: the run's ``metrics.json`` when there is one, else scored here by the same
  function as ``instseg score`` (:func:`instseg.evaluation.score.evaluate_results`).
- Per-category AP and precision-recall curves: from the accumulated precision array of the
  COCO evaluation (``[T, R, K, A, M]``, pycocotools' layout; computed by faster-coco-eval as
  the metrics are), area "all", the largest ``maxDets``.
- Per-image errors at IoU 0.5, of all categories or one: pycocotools' own matching
  (``COCOeval.evaluate`` with one IoU threshold). A missed object is a non-crowd ground
  truth left unmatched; a false positive is a detection scoring at least the threshold that
  matches nothing (detections matched to a crowd region are ignored, as COCO ignores them).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instseg.data.coco import DataError
from instseg.evaluation.coco import _read_json as read_json
from instseg.evaluation.coco import (
    check_results,
    fast_evaluator,
    fast_gt_copy,
    load_coco,
    load_coco_dict,
    matchable_annotations,
)
from instseg.evaluation.score import evaluate_results

MAX_DETS = 100
# The evaluations below silence pycocotools' printing with redirect_stdout, which swaps the
# process-wide sys.stdout: two at once in the server's threads could leave it swapped for
# good, so they run one at a time.
_QUIET_LOCK = threading.Lock()


@dataclass(frozen=True)
class ImageErrors:
    """One image's matching at IoU 0.5 (see the module docstring)."""

    image_id: int
    num_gt: int
    num_dt: int
    missed: int
    false_positives: int

    @property
    def errors(self) -> int:
        return self.missed + self.false_positives


class EvaluationView:
    """A ground truth, results for it and the metrics of those results, with the analyses
    of the evaluation page (each computed once, on first use)."""

    def __init__(
        self,
        ann: str | Path,
        results: str | Path,
        metrics: str | Path | None = None,
        images_dir: str | Path | None = None,
    ) -> None:
        self.ann_path = Path(ann)
        try:
            self.gt = load_coco(ann)
            self.results = _read_results(Path(results))
            self.iou_types = ("bbox", "segm") if _all_masks(self.results) else ("bbox",)
            check_results(self.results, self.gt, self.iou_types)
        except DataError:
            raise
        except ValueError as exc:  # malformed json, results that do not fit the ground truth
            raise DataError(f"{results} against {ann}: {exc}") from exc
        self.metrics_path = Path(metrics) if metrics is not None else None
        self.images_dir = Path(images_dir) if images_dir is not None else None
        self.categories = {c["id"]: c["name"] for c in self.gt.dataset["categories"]}
        self._by_image: dict[int, list[dict[str, Any]]] = {}
        for r in self.results:
            self._by_image.setdefault(int(r["image_id"]), []).append(r)

    @property
    def default_iou_type(self) -> str:
        return self.iou_types[-1]

    def check_iou_type(self, iou_type: str | None) -> str:
        """``iou_type`` (default: masks when the results have them), or a ``ValueError``."""
        iou_type = iou_type or self.default_iou_type
        if iou_type not in self.iou_types:
            raise ValueError(f"iou_type must be one of {self.iou_types}, got {iou_type!r}")
        return iou_type

    def check_category(self, category: int | None) -> int | None:
        if category is not None and category not in self.categories:
            raise KeyError(f"unknown category id {category}")
        return category

    # ---------------------------------------------------------------------- metrics

    @functools.cached_property
    def metrics(self) -> dict[str, dict[str, float]]:
        """``metrics.json`` as written by the run, or the results scored against the ground
        truth (box and, with masks, mask and Boundary AP)."""
        if self.metrics_path is not None:
            with open(self.metrics_path, encoding="utf-8") as f:
                return json.load(f)
        with _QUIET_LOCK:
            return evaluate_results(self.ann_path, self.results)

    @functools.lru_cache(maxsize=4)  # noqa: B019 - one view per server, a handful of keys
    def _precision(self, iou_type: str) -> tuple[np.ndarray, list[float], list[int]]:
        """Precision ``[T, R, K]`` (area all, largest maxDets), IoU thresholds, category ids."""
        with _QUIET_LOCK, contextlib.redirect_stdout(io.StringIO()):
            evaluator = fast_evaluator(fast_gt_copy(self.gt.dataset), self.results, iou_type)
            evaluator.params.maxDets = [1, 10, MAX_DETS]
            evaluator.evaluate()
            evaluator.accumulate()
        p = evaluator.params
        area = list(p.areaRngLbl).index("all")
        precision = np.asarray(evaluator.eval["precision"])[:, :, :, area, -1]
        return precision, [float(t) for t in p.iouThrs], [int(c) for c in p.catIds]

    def category_ap(self, iou_type: str) -> list[dict[str, Any]]:
        """Per category: AP (0.5:0.95), AP50, AP75 in percent (-1 without ground truth),
        ground-truth and detection counts; worst AP first, categories without ground truth
        last."""
        precision, thresholds, cat_ids = self._precision(iou_type)
        gt_counts = _count(a["category_id"] for a in self.gt.dataset["annotations"])
        dt_counts = _count(r["category_id"] for r in self.results)

        def ap(values: np.ndarray) -> float:
            valid = values[values > -1]
            return float(valid.mean()) * 100 if valid.size else -1.0

        rows = []
        for k, cat in enumerate(cat_ids):
            at = {t: precision[i, :, k] for i, t in enumerate(thresholds)}
            rows.append(
                {
                    "id": cat,
                    "name": self.categories[cat],
                    "AP": ap(precision[:, :, k]),
                    "AP50": ap(_at(at, 0.5)),
                    "AP75": ap(_at(at, 0.75)),
                    "num_gt": gt_counts.get(cat, 0),
                    "num_dt": dt_counts.get(cat, 0),
                }
            )
        return sorted(rows, key=lambda r: (r["AP"] < 0, r["AP"], r["name"]))

    def pr_curves(self, iou_type: str, category: int | None = None) -> dict[str, Any]:
        """Precision at COCO's 101 recall points for every IoU threshold: one category's, or
        the mean over the categories with ground truth (as AP averages them). Recall points
        a curve does not reach are null."""
        precision, thresholds, cat_ids = self._precision(iou_type)
        if category is not None:
            precision = precision[:, :, [cat_ids.index(category)]]
        curves = []
        for i, t in enumerate(thresholds):
            values = precision[i]  # [R, K]
            counted = (values > -1).any(axis=0)
            mean = values[:, counted].mean(axis=1) if counted.any() else np.full(len(values), -1)
            curves.append({"iou": t, "precision": [float(v) if v > -1 else None for v in mean]})
        return {"recall": [r / 100 for r in range(101)], "curves": curves}

    # ---------------------------------------------------------------------- images

    @functools.lru_cache(maxsize=16)  # noqa: B019 - one view per server, a handful of keys
    def image_errors(
        self, iou_type: str, score_thr: float, category: int | None = None
    ) -> dict[int, ImageErrors]:
        """Per image: ground truth and detections (score >= ``score_thr``), missed objects and
        false positives at IoU 0.5, of one category or (None) all."""
        matches = self._matches(iou_type)
        errors = {}
        for image_id in self.gt.getImgIds():
            num_gt = missed = num_dt = false_positives = 0
            for m in matches.get(image_id, []):
                if category is not None and m["category_id"] != category:
                    continue
                gt_real = ~m["gt_ignore"]
                num_gt += int(gt_real.sum())
                missed += int((gt_real & (m["gt_matches"] == 0)).sum())
                shown = (m["dt_scores"] >= score_thr) & ~m["dt_ignore"]
                num_dt += int(shown.sum())
                false_positives += int((shown & (m["dt_matches"] == 0)).sum())
            errors[image_id] = ImageErrors(image_id, num_gt, num_dt, missed, false_positives)
        return errors

    @functools.cached_property
    def _match_gt(self) -> COCO:
        """The ground truth for matching: ``self.gt``, or (annotation ids below 1) a copy
        with matchable ids (:func:`matchable_annotations`), built once for every IoU type;
        ``self.gt`` keeps the file's ids for display."""
        annotations = self.gt.dataset["annotations"]
        matchable = matchable_annotations(annotations)
        if matchable is annotations:
            return self.gt
        return load_coco_dict({**self.gt.dataset, "annotations": matchable}, str(self.ann_path))

    @functools.lru_cache(maxsize=4)  # noqa: B019 - one view per server, a handful of keys
    def _matches(self, iou_type: str) -> dict[int, list[dict[str, np.ndarray]]]:
        """pycocotools' matching at IoU 0.5 (area all, ``MAX_DETS`` per image), per image and
        category: matched ids and ignore flags of ground truth and detections."""
        copies = [
            {k: r[k] for k in ("image_id", "category_id", "score", _geometry(iou_type))}
            for r in self.results
        ]
        with _QUIET_LOCK, contextlib.redirect_stdout(io.StringIO()):
            gt = self._match_gt  # built under the lock: loading swaps stdout too
            dt = gt.loadRes(copies) if copies else _empty_like(gt)
            evaluator = COCOeval(gt, dt, iou_type)
            evaluator.params.iouThrs = np.array([0.5])
            evaluator.params.areaRng = [[0, 1e10]]
            evaluator.params.areaRngLbl = ["all"]
            evaluator.params.maxDets = [MAX_DETS]
            evaluator.evaluate()
        matches: dict[int, list[dict[str, np.ndarray]]] = {}
        for e in evaluator.evalImgs:
            if e is None:
                continue
            matches.setdefault(int(e["image_id"]), []).append(
                {
                    "category_id": int(e["category_id"]),
                    "gt_matches": np.asarray(e["gtMatches"][0]),
                    "gt_ignore": np.asarray(e["gtIgnore"], dtype=bool),
                    "dt_matches": np.asarray(e["dtMatches"][0]),
                    "dt_ignore": np.asarray(e["dtIgnore"][0], dtype=bool),
                    "dt_scores": np.asarray(e["dtScores"], dtype=np.float64),
                }
            )
        return matches

    def images(
        self, iou_type: str, score_thr: float, category: int | None = None
    ) -> list[dict[str, Any]]:
        """Images, most errors first; with a category, the images that have it in ground truth
        or predictions, with that category's counts and errors."""
        errors = self.image_errors(iou_type, score_thr, category)
        keep = None
        if category is not None:
            items = [*self.gt.dataset["annotations"], *self.results]
            keep = {a["image_id"] for a in items if a["category_id"] == category}
        rows = []
        for image_id, e in errors.items():
            if keep is not None and image_id not in keep:
                continue
            info = self.gt.imgs[image_id]
            rows.append(
                {
                    "id": image_id,
                    "file_name": info.get("file_name", ""),
                    "width": info["width"],
                    "height": info["height"],
                    "num_gt": e.num_gt,
                    "num_dt": e.num_dt,
                    "missed": e.missed,
                    "false_positives": e.false_positives,
                }
            )
        return sorted(rows, key=lambda r: (-(r["missed"] + r["false_positives"]), r["id"]))

    def image_detail(self, image_id: int) -> dict[str, Any]:
        """One image: its ground truth (masks as compressed RLE) and its predictions."""
        if image_id not in self.gt.imgs:
            raise KeyError(f"unknown image id {image_id}")
        info = self.gt.imgs[image_id]
        ground_truth = []
        for ann in self.gt.imgToAnns.get(image_id, []):
            item = {
                "id": ann["id"],
                "category_id": ann["category_id"],
                "bbox": ann["bbox"],
                "iscrowd": int(ann.get("iscrowd", 0)),
            }
            if "segmentation" in ann:
                rle = self.gt.annToRLE(ann)
                counts = rle["counts"]
                item["segmentation"] = {
                    "size": list(rle["size"]),
                    "counts": counts.decode() if isinstance(counts, bytes) else counts,
                }
            ground_truth.append(item)
        return {
            "image": {k: info.get(k) for k in ("id", "file_name", "width", "height")},
            "ground_truth": ground_truth,
            "predictions": self._by_image.get(image_id, []),
        }

    def image_file(self, image_id: int) -> Path:
        """The image's file under ``images_dir``; ``FileNotFoundError`` naming what is
        missing, ``PermissionError`` for a file name that leaves the folder."""
        if image_id not in self.gt.imgs:
            raise KeyError(f"unknown image id {image_id}")
        if self.images_dir is None:
            raise FileNotFoundError("no images folder given (--images, or the run's config)")
        root = self.images_dir.resolve()
        path = (root / self.gt.imgs[image_id]["file_name"]).resolve()
        if not path.is_relative_to(root):
            raise PermissionError(f"image {image_id}: file name leaves the images folder")
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        return path


def _read_results(path: Path) -> list[dict[str, Any]]:
    results = read_json(path, "results")
    if not isinstance(results, list):
        raise ValueError(f"results file {path} must hold a list of results")
    return results


def _all_masks(results: list[dict[str, Any]]) -> bool:
    return bool(results) and all("segmentation" in r for r in results)


def _geometry(iou_type: str) -> str:
    return "bbox" if iou_type == "bbox" else "segmentation"


def _count(values) -> dict[int, int]:
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def _at(by_threshold: dict[float, np.ndarray], threshold: float) -> np.ndarray:
    for t, values in by_threshold.items():
        if abs(t - threshold) < 1e-9:
            return values
    raise KeyError(threshold)


def _empty_like(gt):
    """An empty result set for ``gt`` (pycocotools' ``loadRes`` needs one result)."""
    dt = COCO()
    dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"]}
    dt.dataset["annotations"] = []
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


__all__ = ["EvaluationView", "ImageErrors"]
