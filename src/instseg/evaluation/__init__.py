"""Evaluation: COCO results json and COCO box / mask / Boundary AP (percent, any cap); LVIS
federated AP (APr / APc / APf), AP* and the cocofied LVIS json."""

from instseg.evaluation.coco import (
    encode_masks,
    evaluate_coco,
    format_table,
    instances_to_coco_results,
    load_coco,
    write_json,
    write_results,
)
from instseg.evaluation.lvis import (
    LVIS_MAX_DETS,
    cocofy_lvis,
    evaluate_lvis,
    is_lvis_dataset,
    load_lvis,
)

__all__ = [
    "LVIS_MAX_DETS",
    "cocofy_lvis",
    "encode_masks",
    "evaluate_coco",
    "evaluate_lvis",
    "format_table",
    "instances_to_coco_results",
    "is_lvis_dataset",
    "load_coco",
    "load_lvis",
    "write_json",
    "write_results",
]
