"""Evaluation: COCO results json and COCO box / mask / Boundary AP (percent, any cap)."""

from instseg.evaluation.coco import (
    encode_masks,
    evaluate_coco,
    format_table,
    instances_to_coco_results,
    load_coco,
    write_json,
    write_results,
)

__all__ = [
    "encode_masks",
    "evaluate_coco",
    "format_table",
    "instances_to_coco_results",
    "load_coco",
    "write_json",
    "write_results",
]
