"""Batched inference over a dataset and COCO evaluation of the results."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..data.coco import CocoDataset
from ..data.loader import GroupedBatchSampler, make_loader
from ..evaluation import instances_to_coco_results, write_results
from ..evaluation.cityscapes import (
    cityscapes_basename,
    evaluate_cityscapes,
    write_cityscapes_predictions,
)
from ..evaluation.score import evaluate_results
from ..structures import ImageInfo, Instances
from .distributed import barrier, broadcast_from_main, gather_to_main, rank_and_world

logger = logging.getLogger(__name__)


def eval_batches(dataset: CocoDataset, batch_size: int) -> list[list[tuple[int, int]]]:
    """The test-time batches of ``dataset``: images grouped by orientation, in a fixed order
    (``(index, seed)`` pairs, as the training sampler yields them)."""
    sampler = GroupedBatchSampler(
        [r.aspect_ratio for r in dataset.records], batch_size, shuffle=False
    )
    return sampler.batches(0)


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    dataset: CocoDataset,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    size_divisor: int = 32,
    batches: Sequence[list[tuple[int, int]]] | None = None,
) -> Iterator[tuple[ImageInfo, Instances]]:
    """Yield ``(info, detections)`` per image, detections on the CPU in original coordinates.

    Images are batched by orientation to keep padding small: ``batches`` (default: all of
    :func:`eval_batches`) are some of those batches (a rank's share), so an image is always
    predicted in the same padded batch, whoever predicts it. The model runs in eval mode.
    """
    was_training = model.training
    model.eval()
    if batches is None:
        batches = eval_batches(dataset, batch_size)
    loader = make_loader(dataset, batches, size_divisor=size_divisor, num_workers=num_workers)
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

    In a process group of several ranks, rank r predicts batches r, r + world, ... of
    :func:`eval_batches`; rank 0 gathers the results in single-process order, writes the
    results json and scores them, and every rank returns rank 0's metrics: the same as one
    process. The Cityscapes prediction folder must then be one all ranks see (rank 0's
    temporary folder on one node; pass one on a shared file system across nodes).
    """
    rank, world = rank_and_world()
    if cityscapes_gt_dir is not None and not Path(cityscapes_gt_dir).is_dir():
        raise FileNotFoundError(
            f"Cityscapes gtFine folder not found: {cityscapes_gt_dir} (eval.cityscapes_gt_dir)"
        )
    with contextlib.ExitStack() as stack:
        if cityscapes_gt_dir is not None and cityscapes_pred_dir is None:
            tmp = None
            if rank == 0:
                prefix = "instseg_cityscapes_pred_"
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix))
            cityscapes_pred_dir = broadcast_from_main(tmp)
        category_ids = [c.id for c in dataset.categories]
        all_batches = eval_batches(dataset, batch_size)
        mine = list(range(rank, len(all_batches), world))
        batch_of = {dataset.records[i].image_id: k for k in mine for i, _ in all_batches[k]}
        per_batch: dict[int, list[dict]] = {k: [] for k in mine}
        with_masks = False
        for info, detections in predict_dataset(
            model, dataset, batch_size, device, num_workers, batches=[all_batches[k] for k in mine]
        ):
            with_masks = with_masks or detections.masks is not None
            per_batch[batch_of[info.image_id]] += instances_to_coco_results(
                detections, info.image_id, category_ids
            )
            if cityscapes_pred_dir is not None:
                write_cityscapes_predictions(
                    cityscapes_pred_dir,
                    cityscapes_basename(info.file_name),
                    detections,
                    label_ids=category_ids,
                )
        gathered = gather_to_main((per_batch, with_masks))
        metrics = None
        if gathered is not None:
            merged = {k: v for part, _ in gathered for k, v in part.items()}
            results = [r for k in sorted(merged) for r in merged[k]]
            results = _annotated_categories_only(results, dataset)
            with_masks = any(masks for _, masks in gathered)
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
            barrier()  # every rank's Cityscapes files are written
            if metrics is not None:
                metrics["cityscapes"] = evaluate_cityscapes(cityscapes_pred_dir, cityscapes_gt_dir)
        return broadcast_from_main(metrics)


def _annotated_categories_only(results: list[dict], dataset: CocoDataset) -> list[dict]:
    """The results of categories the annotation file has. A model may know more (torchvision's
    COCO weights keep 10 unused "N/A" ids); COCO's evaluation ignores those categories, so
    leaving their detections out changes no metric. The count is logged."""
    known = dataset.annotated_category_ids
    kept = [r for r in results if r["category_id"] in known]
    if len(kept) < len(results):
        other = sorted({r["category_id"] for r in results} - known)
        logger.warning(
            "left out %d detection(s) of categories %s that %s does not have",
            len(results) - len(kept),
            other,
            dataset.ann_file,
        )
    return kept
