"""Batched inference over a dataset and COCO evaluation of the results."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..data.coco import CocoDataset
from ..data.loader import build_loader
from ..evaluation import instances_to_coco_results, write_results
from ..evaluation.cityscapes import (
    cityscapes_basename,
    evaluate_cityscapes,
    write_cityscapes_predictions,
)
from ..evaluation.score import evaluate_results
from ..structures import ImageInfo, Instances


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    dataset: CocoDataset,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    size_divisor: int = 32,
) -> Iterator[tuple[ImageInfo, Instances]]:
    """Yield ``(info, detections)`` per image, detections on the CPU in original coordinates.

    Images are batched by orientation to keep padding small; the model runs in eval mode.
    """
    was_training = model.training
    model.eval()
    loader = build_loader(
        dataset, batch_size, train=False, num_workers=num_workers, size_divisor=size_divisor
    )
    try:
        for images, _, infos in loader:
            for info, result in zip(infos, model.predict(images.to(device), infos), strict=True):
                yield info, result.to("cpu")
    finally:
        model.train(was_training)


def evaluate_model(
    model: nn.Module,
    dataset: CocoDataset,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    max_dets: int = 100,
    results_path: str | Path | None = None,
    num_workers: int = 0,
    cityscapes_gt_dir: str | Path | None = None,
    cityscapes_pred_dir: str | Path | None = None,
) -> dict:
    """Metrics (percent) of ``model`` on ``dataset``; optionally writes the results json.

    Box AP always; mask AP (and Boundary AP, COCO only) too when the model predicts masks and
    the dataset has them. The annotation file decides the protocol: LVIS-format files (LVIS,
    cocofied LVIS for AP*) are scored by LVIS's federated rules, others by COCO's; see
    :func:`instseg.evaluation.score.evaluate_results`.

    ``cityscapes_gt_dir`` (a gtFine split folder) adds ``"cityscapes"``: the official
    Cityscapes instance evaluation of the predicted masks, exported image by image as the
    script reads them into ``cityscapes_pred_dir`` (default: a temporary folder); the
    dataset's category ids must be Cityscapes label ids.
    """
    if cityscapes_gt_dir is not None and not Path(cityscapes_gt_dir).is_dir():
        raise FileNotFoundError(
            f"Cityscapes gtFine folder not found: {cityscapes_gt_dir} (eval.cityscapes_gt_dir)"
        )
    if cityscapes_gt_dir is not None and cityscapes_pred_dir is None:
        with tempfile.TemporaryDirectory(prefix="instseg_cityscapes_pred_") as tmp:
            return evaluate_model(
                model,
                dataset,
                batch_size,
                device,
                max_dets,
                results_path,
                num_workers,
                cityscapes_gt_dir,
                tmp,
            )
    category_ids = [c.id for c in dataset.categories]
    results: list[dict] = []
    with_masks = False
    for info, detections in predict_dataset(model, dataset, batch_size, device, num_workers):
        with_masks = with_masks or detections.masks is not None
        results += instances_to_coco_results(detections, info.image_id, category_ids)
        if cityscapes_pred_dir is not None:
            write_cityscapes_predictions(
                cityscapes_pred_dir,
                cityscapes_basename(info.file_name),
                detections,
                label_ids=category_ids,
            )
    if results_path is not None:
        write_results(results_path, results)
    metrics = evaluate_results(
        dataset.ann_file,
        results,
        masks=with_masks and dataset.with_masks,
        max_dets=max_dets,
        image_ids=[r.image_id for r in dataset.records],
    )
    if cityscapes_gt_dir is not None:
        metrics["cityscapes"] = evaluate_cityscapes(cityscapes_pred_dir, cityscapes_gt_dir)
    return metrics
