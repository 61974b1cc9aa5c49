"""Score a results json against an annotation file, COCO or LVIS as the file says.

One entry point for ``instseg eval``, ``instseg score`` and training's final evaluation, so
results from any tool are scored the same way: an LVIS-format file (images with negative /
not-exhaustive category lists, categories with a frequency: LVIS v0.5 / v1 and the cocofied
LVIS of AP*) gets the LVIS protocol (:mod:`instseg.evaluation.lvis`), any other file the
COCO protocol (:mod:`instseg.evaluation.coco`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from instseg.evaluation.coco import _read_json, evaluate_coco, format_table, load_coco_dict
from instseg.evaluation.lvis import (
    LVIS_MAX_DETS,
    check_lvis_dataset,
    evaluate_lvis,
    is_lvis_dataset,
)

COCO_MAX_DETS = 100


def iou_types_of(results: list[dict[str, Any]], lvis: bool) -> tuple[str, ...]:
    """What ``results`` allow: box AP when every result has a 'bbox'; mask AP (and, for COCO,
    Boundary AP) when every result has a 'segmentation'."""
    types: tuple[str, ...] = ()
    if all("bbox" in r for r in results):
        types += ("bbox",)
    if results and all("segmentation" in r for r in results):
        types += ("segm",) if lvis else ("segm", "boundary")
    if not types:
        raise ValueError(
            "the results can be scored neither as boxes nor as masks: some lack 'bbox' and "
            "some lack 'segmentation'"
        )
    return types


def evaluate_results(
    ann: str | Path,
    results: list[dict[str, Any]] | str | Path,
    masks: bool | None = None,
    max_dets: int | None = None,
    image_ids: Sequence[int] | None = None,
    summarize: bool = False,
) -> dict[str, dict[str, float]]:
    """Metrics in percent per iou type, by the protocol of the annotation file ``ann``.

    ``masks``: score masks too (mask AP, and Boundary AP for COCO); None decides from the
    results (:func:`iou_types_of`). ``max_dets`` is the per-image detection cap (default: the
    protocol's, COCO 100 / LVIS 300). ``image_ids`` restricts COCO evaluation to those images;
    LVIS evaluation always covers every image of the file, as lvis-api does.
    """
    dataset = _read_json(ann, "annotation")
    if isinstance(results, str | Path):
        results = _read_json(results, "results")
    if not isinstance(results, list):
        raise ValueError(f"results must be a list of dicts, got {type(results).__name__}")
    lvis = isinstance(dataset, dict) and is_lvis_dataset(dataset)
    if masks is None:
        iou_types = iou_types_of(results, lvis)
    else:
        iou_types = ("bbox", "segm") if masks else ("bbox",)
        if masks and not lvis:
            iou_types += ("boundary",)
    if lvis:
        return evaluate_lvis(
            check_lvis_dataset(dataset, str(ann)),
            results,
            iou_types=iou_types,
            max_dets=max_dets or LVIS_MAX_DETS,
            summarize=summarize,
        )
    return evaluate_coco(
        load_coco_dict(dataset, str(ann)),
        results,
        iou_types=iou_types,
        max_dets=max_dets or COCO_MAX_DETS,
        image_ids=image_ids,
        summarize=summarize,
    )


__all__ = ["evaluate_results", "format_table", "iou_types_of"]
