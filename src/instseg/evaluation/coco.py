"""COCO results json and COCO box / mask / Boundary AP.

Three pieces: ``instances_to_coco_results`` turns one image's ``Instances`` into COCO result
dicts (compressed RLE masks, encoded in one pycocotools call per chunk of masks),
``write_results`` writes them atomically, and ``evaluate_coco`` runs the COCO evaluation and
reads the metrics from its accumulated precision / recall arrays itself. The last point
matters: pycocotools' ``summarize()`` looks AP up at ``maxDets=100`` only, so with a raised
detection cap (nuclei images hold up to 369 instances) it reports -1; reading the arrays with
the same averaging rules gives the right number for any cap.

Three iou types ("metric families"):

- ``bbox`` and ``segm``: box and mask AP with pycocotools' rules (``COCOeval``), computed by
  faster-coco-eval's C++ re-implementation of it (``COCOeval_faster``), several times faster
  on large sets (``benchmarks/evaluation.py``); the tests compare every metric with
  pycocotools' own on the same results.
- ``boundary``: Boundary AP (Cheng et al., "Boundary IoU", CVPR 2021). It is mask AP with the
  detection / ground-truth IoU replaced by min(mask IoU, boundary IoU). The boundary of a
  mask is the mask minus its erosion by d = max(1, round(0.02 * image diagonal)) pixels
  (dilation ratio 0.02; pixels outside the image count as background), and boundary IoU is
  the IoU of the two boundaries. Crowd regions keep plain mask IoU. It is computed by
  faster-coco-eval too (iouType "boundary"). It uses the same results as ``segm`` and mask
  areas for the area ranges.

faster-coco-eval's precision / recall arrays have pycocotools' layout, so AP / AR of every
type are read with the same rules.

Metrics are in percent (0-100); a metric with nothing to average (e.g. APs on a set without
small objects) is -1, as in pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import faster_coco_eval
import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO

from instseg.fileio import atomic_write_json
from instseg.structures import Instances

IOU_TYPES = ("bbox", "segm", "boundary")
# What ``evaluate_coco`` computes unless told otherwise; "boundary" costs extra time per mask.
DEFAULT_IOU_TYPES = ("bbox", "segm")
# The iou types that compare masks, so need 'segmentation' in results and ground truth.
MASK_IOU_TYPES = ("segm", "boundary")
# Boundary width as a fraction of the image diagonal, as in the Boundary IoU paper.
BOUNDARY_DILATION_RATIO = 0.02
# Pixels (N * H * W) encoded per pycocotools call: bounds the uint8 Fortran copy to 64 MiB.
_ENCODE_CHUNK_PIXELS = 1 << 26


# ---------------------------------------------------------------------------------------------
# Results json
# ---------------------------------------------------------------------------------------------


def encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Compressed RLEs (``counts`` as str) of ``masks (N, H, W)`` bool, one per mask.

    pycocotools encodes a Fortran-ordered ``(H, W, N)`` uint8 array in one call; masks go
    through in chunks so the copy stays bounded with hundreds of large masks.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
    if masks.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"masks must be bool (binarise soft masks first), got {masks.dtype}")
    n, h, w = masks.shape
    if n == 0:
        return []
    masks = masks.detach().to("cpu", torch.uint8)
    chunk = max(1, _ENCODE_CHUNK_PIXELS // max(1, h * w))
    rles: list[dict[str, Any]] = []
    for start in range(0, n, chunk):
        block = np.asfortranarray(masks[start : start + chunk].permute(1, 2, 0).numpy())
        rles.extend(mask_utils.encode(block))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def instances_to_coco_results(
    instances: Instances, image_id: int, category_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO result dicts for one image's predictions (original image coordinates).

    ``category_ids[label]`` maps contiguous labels back to dataset category ids; ``bbox`` is
    ``[x, y, w, h]``; ``segmentation`` (compressed RLE) is present when ``instances.masks`` is.
    """
    n = len(instances)
    if instances.scores.shape != (n,) or instances.labels.shape != (n,):
        raise ValueError(
            f"Instances fields disagree: boxes {tuple(instances.boxes.shape)}, "
            f"scores {tuple(instances.scores.shape)}, labels {tuple(instances.labels.shape)}"
        )
    if instances.masks is not None and instances.masks.shape[0] != n:
        raise ValueError(f"Instances has {n} boxes but {instances.masks.shape[0]} masks")
    if n == 0:
        return []
    labels = instances.labels.detach().cpu().long().tolist()
    bad = sorted({lab for lab in labels if not 0 <= lab < len(category_ids)})
    if bad:
        raise ValueError(
            f"image {image_id}: labels {bad} are outside 0..{len(category_ids) - 1} "
            f"({len(category_ids)} category ids given)"
        )
    boxes = instances.boxes.detach().cpu().double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = instances.scores.detach().cpu().double().tolist()
    rles = encode_masks(instances.masks) if instances.masks is not None else None
    results = []
    for i in range(n):
        result: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": int(category_ids[labels[i]]),
            "bbox": xywh[i],
            "score": scores[i],
        }
        if rles is not None:
            result["segmentation"] = rles[i]
        results.append(result)
    return results


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as json atomically (see :mod:`instseg.fileio`); NaN is an error.

    An interrupted or failed write (e.g. a non-serialisable value, NaN) leaves the previous
    file untouched and no temp file behind.
    """
    atomic_write_json(path, obj)


def write_results(path: str | Path, results: list[dict[str, Any]]) -> None:
    """Write a COCO results json (a list of result dicts) atomically."""
    if not isinstance(results, list):
        raise TypeError(f"results must be a list of dicts, got {type(results).__name__}")
    write_json(path, results)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{what} file {path} is not valid json: {e.msg} at line {e.lineno} column {e.colno} "
            f"(char {e.pos})"
        ) from e


def _quiet() -> contextlib.redirect_stdout[io.StringIO]:
    """pycocotools prints progress on every call; keep it off the user's terminal."""
    return contextlib.redirect_stdout(io.StringIO())


def load_coco(path: str | Path) -> COCO:
    """Open a COCO-format ground-truth json as a pycocotools ``COCO``, with errors that name
    the file (missing, malformed json, missing ``images`` / ``annotations`` / ``categories``)."""
    return load_coco_dict(_read_json(path, "COCO annotation"), str(path))


def load_coco_dict(dataset: Any, source: str) -> COCO:
    """A loaded COCO-format json (``source`` names it in errors) as a pycocotools ``COCO``."""
    if not isinstance(dataset, dict):
        raise ValueError(f"COCO annotation file {source}: top level must be an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ValueError(f"COCO annotation file {source}: '{key}' must be a list")
    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _preview(values: Iterable[Any], limit: int = 10) -> str:
    values = sorted(values)
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return f"{values[:limit]}{more}"


def _type_names(iou_types: Sequence[str]) -> str:
    """``iou type 'segm'`` / ``iou types 'segm', 'boundary'``, for error messages."""
    quoted = ", ".join(f"'{t}'" for t in iou_types)
    return f"iou type{'s' if len(iou_types) > 1 else ''} {quoted}"


def check_result_fields(
    results: list[dict[str, Any]], images: dict[Any, dict[str, Any]], iou_types: Sequence[str]
) -> None:
    """Reject results the evaluators would mis-handle or fail on with an opaque assert:
    non-dicts, missing keys, images not in ``images`` (ground-truth image dicts by id), a
    missing 'bbox' / 'segmentation' for the requested iou types, masks that are not
    compressed RLEs of the image's size."""
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise ValueError(f"result {i} is a {type(r).__name__}, not a dict")
        missing = [k for k in ("image_id", "category_id", "score") if k not in r]
        if missing:
            raise ValueError(f"result {i} lacks {missing}")
    unknown_images = {r["image_id"] for r in results} - set(images)
    if unknown_images:
        raise ValueError(
            f"results reference image ids not in the ground truth: {_preview(unknown_images)}"
        )
    if "bbox" in iou_types:
        lacking = [i for i, r in enumerate(results) if "bbox" not in r]
        if lacking:
            raise ValueError(
                f"bbox evaluation needs 'bbox' in every result; {len(lacking)} "
                f"lack it (first: result {lacking[0]})"
            )
    mask_types = [t for t in iou_types if t in MASK_IOU_TYPES]
    if mask_types:
        names = _type_names(mask_types)
        lacking = [i for i, r in enumerate(results) if "segmentation" not in r]
        if results and len(lacking) == len(results):
            raise ValueError(
                f"{names} requested but the results have no 'segmentation' "
                "(box-only predictions): evaluate with iou_types=('bbox',)"
            )
        if lacking:
            raise ValueError(
                f"{names} evaluation needs 'segmentation' in every result; "
                f"{len(lacking)} of {len(results)} lack it (first: result "
                f"{lacking[0]})"
            )
        for i, r in enumerate(results):
            seg = r["segmentation"]
            if not (
                isinstance(seg, dict)
                and "size" in seg
                and isinstance(seg.get("counts"), str | bytes)
            ):
                raise ValueError(
                    f"result {i}: 'segmentation' must be a compressed RLE "
                    "{'size': [h, w], 'counts': str}"
                )
            img = images[r["image_id"]]
            if list(seg["size"]) != [img["height"], img["width"]]:
                raise ValueError(
                    f"result {i}: mask size {list(seg['size'])} differs from image "
                    f"{r['image_id']} size [{img['height']}, {img['width']}] (masks must be "
                    "in original image coordinates)"
                )


def check_results(results: list[dict[str, Any]], gt: COCO, iou_types: Sequence[str]) -> None:
    """:func:`check_result_fields`, and every category must be a ground-truth category."""
    check_result_fields(results, gt.imgs, iou_types)
    unknown_cats = {r["category_id"] for r in results} - set(gt.getCatIds())
    if unknown_cats:
        raise ValueError(
            f"results reference category ids not in the ground truth: {_preview(unknown_cats)}"
        )


def _result_copies(results: list[dict[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """Copies of the results with the keys ``iou_type`` evaluates (``loadRes`` mutates its
    input). Mask types leave out 'bbox': ``loadRes`` then takes the instance area from the
    mask, so the area ranges of mask and Boundary AP refer to mask areas, like the GT's."""
    geometry = "bbox" if iou_type == "bbox" else "segmentation"
    keys = ("image_id", "category_id", geometry, "score")
    return [{k: r[k] for k in keys} for r in results]


def _silent(*args: Any, **kwargs: Any) -> None:
    """faster-coco-eval's ``print_function``: no progress output."""


def matchable_annotations(annotations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``annotations`` with every id at least 1, for matching.

    pycocotools and faster-coco-eval record a detection's match as the matched annotation's
    id, 0 meaning "unmatched": a detection matched to annotation 0 counts as a false positive
    and lowers AP (mmdet's Cityscapes json numbers annotations from 0). When an id is below 1,
    copies with every id shifted up by the same amount are returned (distinct, same order);
    otherwise ``annotations`` itself."""
    lowest = min((ann["id"] for ann in annotations), default=1)
    if lowest >= 1:
        return annotations
    return [{**ann, "id": ann["id"] + 1 - lowest} for ann in annotations]


def fast_gt_copy(dataset: dict[str, Any]) -> faster_coco_eval.COCO:
    """The ground truth ``dataset`` as a faster-coco-eval ``COCO``, built from copies of
    every image, category and annotation dict (its ``evaluate`` writes ``rle`` /
    ``boundary`` / ``ignore`` into the annotation dicts), annotation ids made matchable
    (:func:`matchable_annotations`)."""
    fast_gt = faster_coco_eval.COCO(print_function=_silent)
    annotations = matchable_annotations(dataset.get("annotations", []))
    fast_gt.dataset = {
        "images": [dict(img) for img in dataset["images"]],
        "categories": [dict(cat) for cat in dataset["categories"]],
        "annotations": [dict(ann) for ann in annotations],
    }
    fast_gt.createIndex()
    return fast_gt


def empty_results(gt: faster_coco_eval.COCO) -> faster_coco_eval.COCO:
    """An empty result set for ``gt`` (``loadRes`` indexes its first result)."""
    dt = faster_coco_eval.COCO(print_function=_silent)
    dt.dataset = {
        "images": list(gt.dataset["images"]),
        "categories": list(gt.dataset["categories"]),
        "annotations": [],
    }
    dt.createIndex()
    return dt


def fast_evaluator(
    fast_gt: faster_coco_eval.COCO,
    results: list[dict[str, Any]],
    iou_type: str,
    lvis_style: bool = False,
) -> faster_coco_eval.COCOeval_faster:
    """A faster-coco-eval ``COCOeval_faster`` of ``results`` against ``fast_gt`` (see
    :func:`fast_gt_copy`) for ``iou_type``; ``lvis_style`` applies LVIS's federated rules.
    The results are copied (:func:`_result_copies`): ``loadRes`` writes ``id`` / ``area`` /
    ``bbox`` into the result dicts."""
    copies = _result_copies(results, iou_type)
    fast_dt = fast_gt.loadRes(copies) if copies else empty_results(fast_gt)
    extra = {"boundary_dilation_ratio": BOUNDARY_DILATION_RATIO} if iou_type == "boundary" else {}
    return faster_coco_eval.COCOeval_faster(
        fast_gt, fast_dt, iou_type, print_function=_silent, lvis_style=lvis_style, **extra
    )


def _mean_valid(values: np.ndarray) -> float:
    """summarize()'s rule: mean over entries > -1, or -1 when there are none."""
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def ap_summary(ap: Callable[..., float]) -> dict[str, float]:
    """The AP entries of summarize() (all IoUs, 0.5, 0.75; small, medium, large objects) from
    ``ap(thr=None, rng="all")``, the mean precision over that IoU threshold and area range."""
    return {
        "AP": ap(),
        "AP50": ap(0.5),
        "AP75": ap(0.75),
        "APs": ap(rng="small"),
        "APm": ap(rng="medium"),
        "APl": ap(rng="large"),
    }


def _metrics_from_eval(E: faster_coco_eval.COCOeval_faster, max_dets: int) -> dict[str, float]:
    """AP/AR as summarize() defines them, read from the accumulated arrays for any maxDets.

    pycocotools' and faster-coco-eval's ``params`` and ``eval`` arrays share one layout.
    """
    p = E.params
    precision = E.eval["precision"]  # [T, R, K, A, M]
    recall = E.eval["recall"]  # [T, K, A, M]

    def area(label: str) -> list[int]:
        return [i for i, lbl in enumerate(p.areaRngLbl) if lbl == label]

    def dets(m: int) -> list[int]:
        return [i for i, d in enumerate(p.maxDets) if d == m]

    def iou(thr: float | None) -> np.ndarray | slice:
        return slice(None) if thr is None else np.flatnonzero(np.isclose(p.iouThrs, thr))

    def ap(thr: float | None = None, rng: str = "all") -> float:
        s = precision[iou(thr)][:, :, :, area(rng)][..., dets(max_dets)]
        return _mean_valid(s)

    def ar(m: int, rng: str = "all") -> float:
        s = recall[:, :, area(rng)][..., dets(m)]
        return _mean_valid(s)

    raw = {
        **ap_summary(ap),
        "AR1": ar(1),
        "AR10": ar(10),
        f"AR{max_dets}": ar(max_dets),
        "ARs": ar(max_dets, "small"),
        "ARm": ar(max_dets, "medium"),
        "ARl": ar(max_dets, "large"),
    }
    return {k: (v * 100.0 if v > -1 else -1.0) for k, v in raw.items()}


def evaluate_coco(
    gt: str | Path | COCO,
    results: list[dict[str, Any]] | str | Path,
    iou_types: Sequence[str] = DEFAULT_IOU_TYPES,
    max_dets: int = 100,
    image_ids: Sequence[int] | None = None,
    summarize: bool = False,
) -> dict[str, dict[str, float]]:
    """COCO AP/AR per iou type, in percent: ``{"bbox": {"AP": .., "AP50": .., ...}, ...}``.

    ``iou_types`` is a subset of ``IOU_TYPES`` ("bbox", "segm", "boundary"); the default
    leaves out "boundary" (Boundary AP, see the module docstring), which costs more time.
    ``max_dets`` is the per-image detection cap (pycocotools ``maxDets = [1, 10, max_dets]``);
    AP and APs/m/l are taken at that cap. ``image_ids`` restricts the evaluation to those
    images (results on other images are dropped). Empty results give AP 0; ``gt`` and
    ``results`` are not modified. ``summarize=True`` prints ``format_table`` of the metrics;
    the evaluators' own output is always silenced.
    """
    iou_types = tuple(dict.fromkeys(iou_types))
    bad = [t for t in iou_types if t not in IOU_TYPES]
    if bad or not iou_types:
        raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {iou_types}")
    if isinstance(max_dets, bool) or not isinstance(max_dets, int) or max_dets < 10:
        raise ValueError(
            f"max_dets must be an int >= 10 (maxDets = [1, 10, max_dets]), got {max_dets!r}"
        )
    coco_gt = gt if isinstance(gt, COCO) else load_coco(gt)
    if isinstance(results, str | Path):
        results = _read_json(results, "COCO results")
    if not isinstance(results, list):
        raise ValueError(f"results must be a list of dicts, got {type(results).__name__}")

    if image_ids is not None:
        image_ids = [int(i) for i in image_ids]
        if not image_ids:
            raise ValueError("image_ids is empty: pass None to evaluate every image")
        unknown = set(image_ids) - set(coco_gt.getImgIds())
        if unknown:
            raise ValueError(f"image_ids not in the ground truth: {_preview(unknown)}")
    check_results(results, coco_gt, iou_types)
    if image_ids is not None:
        keep = set(image_ids)
        results = [r for r in results if r["image_id"] in keep]
    mask_types = [t for t in iou_types if t in MASK_IOU_TYPES]
    if mask_types:
        no_mask = [
            a["id"] for a in coco_gt.dataset.get("annotations", []) if "segmentation" not in a
        ]
        if no_mask:
            raise ValueError(
                f"{_type_names(mask_types)} requested but ground-truth annotations "
                f"{_preview(no_mask)} have no 'segmentation'"
            )

    metrics: dict[str, dict[str, float]] = {}
    fast_gt = fast_gt_copy(coco_gt.dataset)
    for iou_type in iou_types:
        E = fast_evaluator(fast_gt, results, iou_type)
        E.params.maxDets = [1, 10, max_dets]
        if image_ids is not None:
            E.params.imgIds = sorted(set(image_ids))
        with _quiet():
            E.evaluate()
            E.accumulate()
        metrics[iou_type] = _metrics_from_eval(E, max_dets)
    if summarize:
        print(format_table(metrics))
    return metrics


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """A fixed-width text table, one row per iou type; undefined metrics (-1) print as '-'.
    Per-class entries (``AP_<class>``, e.g. Cityscapes') stay in the json, out of the table."""
    columns: list[str] = []
    for row in metrics.values():
        columns.extend(k for k in row if k not in columns and "_" not in k)
    width = max([8, *(len(c) + 2 for c in columns)])
    label = max([6, *(len(t) + 1 for t in metrics)])  # "boundary" is longer than "type"
    lines = ["type".ljust(label) + "".join(c.rjust(width) for c in columns)]
    for iou_type, row in metrics.items():
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(("-" if v is None or v < 0 else f"{v:.2f}").rjust(width))
        lines.append(iou_type.ljust(label) + "".join(cells))
    return "\n".join(lines)
