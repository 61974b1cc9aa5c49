"""What the ``instseg`` commands do: train, evaluate and predict from a config.

Kept apart from argument parsing so that scripts and tests can call the same functions.
A trained model's checkpoint json (``model_final.json`` next to ``model_final.safetensors``)
records the config and the categories (dataset id and name per label); eval and predict
read both from there, so labels always map back to the right category ids.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .configs import ExperimentConfig, config_from_dict, to_dict
from .data import Category, CocoDataset, DetectionTransform, TransformConfig, read_image
from .data.coco import DataError
from .data.loader import pad_images
from .engine import load_weights_only, train
from .engine.distributed import barrier, gather_to_main, is_main_process, rank_and_world, shard
from .engine.inference import evaluate_model
from .evaluation import format_table, instances_to_coco_results, write_json, write_results
from .modeling.detectors import Detector
from .structures import Instances
from .visualize import draw_instances

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def build_model(cfg: ExperimentConfig, num_classes: int) -> Detector:
    """The detector of ``cfg`` with ``num_classes`` classes (the config is not modified)."""
    return copy.deepcopy(cfg.model).build(num_classes)


def with_detection_cap(cfg: ExperimentConfig, max_dets: int) -> ExperimentConfig:
    """A copy of ``cfg`` whose model keeps at least ``max_dets`` detections (and proposals)
    per image, so that evaluating with a raised COCO ``maxDets`` can see them. Only test-time
    settings change; the weights are unaffected."""
    cfg = copy.deepcopy(cfg)
    cfg.model.raise_detection_cap(max_dets)
    return cfg


def eval_transform(cfg: ExperimentConfig) -> DetectionTransform:
    tcfg = TransformConfig(
        scales=(cfg.data.test_scale,),
        flip_prob=0.0,
        size_divisor=cfg.train.size_divisor,
        size_rounding=cfg.data.size_rounding,
        **_normalisation(cfg),
    )
    return DetectionTransform(tcfg, train=False)


def _train_transform(cfg: ExperimentConfig) -> DetectionTransform:
    tcfg = TransformConfig(
        scales=cfg.data.train_scales,
        scale_mode=cfg.data.train_scale_mode,
        flip_prob=cfg.data.flip_prob,
        size_divisor=cfg.train.size_divisor,
        size_rounding=cfg.data.size_rounding,
        **_normalisation(cfg),
    )
    return DetectionTransform(tcfg, train=True)


def _normalisation(cfg: ExperimentConfig) -> dict:
    data = cfg.data
    return {"mean": tuple(data.pixel_mean), "std": tuple(data.pixel_std), "bgr": data.bgr}


@dataclass
class TrainedModel:
    """A model with its config and categories, loaded from a weights file."""

    model: Detector
    cfg: ExperimentConfig
    categories: list[Category]


def _checkpoint_state(weights: Path) -> tuple[Path, dict]:
    """The checkpoint json next to ``weights`` and the training state it stores."""
    meta_path = weights.with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found: it records the categories and config the weights "
            f"{weights.name} were trained with (written by `instseg train`)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{meta_path}: malformed json ({exc})") from exc
    state = meta.get("state") if isinstance(meta, dict) else None
    if not isinstance(state, dict):
        raise DataError(f"{meta_path}: not an instseg checkpoint json (no 'state')")
    return meta_path, state


def checkpoint_config(weights: str | Path) -> ExperimentConfig:
    """The config stored in the checkpoint json next to ``weights`` (``model_final.json``
    beside ``model_final.safetensors``): what the weights were trained with, so eval and
    predict need no config file. Configs saved in the first format are upgraded."""
    return _stored_config(*_checkpoint_state(Path(weights)))


def _stored_config(meta_path: Path, state: dict) -> ExperimentConfig:
    if "config" not in state:
        raise DataError(f"{meta_path} records no config: name one (a zoo name or a .json file)")
    return config_from_dict(state["config"])


def load_trained(
    weights: str | Path, cfg: ExperimentConfig | None = None, max_dets: int | None = None
) -> TrainedModel:
    """Load ``weights`` (``.safetensors``) with the config and categories of its checkpoint
    json. ``cfg``, when given, replaces the stored config (e.g. to change test settings);
    the detection cap is raised to ``max_dets`` (default: the config's ``eval.max_dets``)."""
    weights = Path(weights)
    meta_path, state = _checkpoint_state(weights)
    if cfg is None:
        cfg = _stored_config(meta_path, state)
    if "categories" not in state:
        raise DataError(f"{meta_path} records no categories")
    categories = [Category(int(i), str(n)) for i, n in state["categories"]]
    cfg = with_detection_cap(cfg, max_dets or cfg.eval.max_dets)
    model = build_model(cfg, len(categories))
    load_weights_only(weights, model)
    model.eval()
    return TrainedModel(model, cfg, categories)


def run_train(
    cfg: ExperimentConfig,
    work_dir: str | Path,
    resume: bool = False,
    device: str = "cpu",
) -> dict:
    """Train on ``cfg.data`` train paths; evaluate on the val paths when given.

    Writes checkpoints, ``log.jsonl``, ``config.json`` and (after evaluation)
    ``metrics.json`` into ``work_dir``; returns the metrics (empty without val data).
    """
    if not cfg.data.train_ann or not cfg.data.train_images:
        raise ValueError(
            "training needs data.train_ann and data.train_images (--train-ann/--train-images)"
        )
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    with_masks = cfg.model.with_masks
    dataset = CocoDataset(
        cfg.data.train_ann,
        cfg.data.train_images,
        _train_transform(cfg),
        with_masks=with_masks,
        skip_empty=cfg.data.skip_empty,
    )
    categories = dataset.categories
    num_classes = cfg.num_classes or len(categories)
    if num_classes < len(categories):
        raise DataError(
            f"num_classes={num_classes} is pinned but {cfg.data.train_ann} has "
            f"{len(categories)} categories"
        )
    cfg = with_detection_cap(cfg, cfg.eval.max_dets)
    # The initial weights are a function of the seed too, not of whatever drew from the
    # global RNG earlier in the process (two runs with one config end with equal weights).
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, num_classes).to(device)
    if is_main_process():  # data-parallel runs: rank 0 writes, as it writes checkpoints
        write_json(work_dir / "config.json", to_dict(cfg))
    extra = {"config": to_dict(cfg), "categories": [[c.id, c.name] for c in categories]}
    result = train(
        model,
        dataset,
        cfg.train,
        work_dir,
        resume=resume,
        extra_state=extra,
        repeat_threshold=cfg.data.repeat_threshold,
    )
    if result.status != "finished":
        if is_main_process():
            print(
                f"stopped at iteration {result.iteration}; checkpoint in {work_dir} (use --resume)"
            )
        return {}
    if not (cfg.data.val_ann and cfg.data.val_images):
        return {}
    val = CocoDataset(
        cfg.data.val_ann,
        cfg.data.val_images,
        eval_transform(cfg),
        categories=categories,
        with_masks=with_masks,
    )
    metrics = evaluate_model(
        model,
        val,
        cfg.eval.batch_size,
        device,
        cfg.eval.max_dets,
        work_dir / "results.json",
        cityscapes_gt_dir=cfg.eval.cityscapes_gt_dir,
        cityscapes_pred_dir=work_dir / "cityscapes_results" if cfg.eval.cityscapes_gt_dir else None,
    )
    if is_main_process():
        write_json(work_dir / "metrics.json", metrics)
        print(format_table(metrics))
    return metrics


def run_eval(
    weights: str | Path,
    ann: str | Path,
    images: str | Path,
    cfg: ExperimentConfig | None = None,
    max_dets: int | None = None,
    out: str | Path | None = None,
    results: str | Path | None = None,
    device: str = "cpu",
    cityscapes_out: str | Path | None = None,
) -> dict:
    """Metrics of trained ``weights`` on a dataset whose categories the model knows (COCO or
    LVIS protocol, as the annotation file says; plus the official Cityscapes evaluation when
    the config's ``eval.cityscapes_gt_dir`` is set, its prediction files written to
    ``cityscapes_out``, default a temporary folder). ``max_dets`` (default: the config's
    ``eval.max_dets``) also raises the model's per-image detection cap when it is lower."""
    trained = load_trained(weights, cfg, max_dets)
    max_dets = max_dets or trained.cfg.eval.max_dets
    dataset = CocoDataset(
        ann,
        images,
        eval_transform(trained.cfg),
        categories=trained.categories,
        with_masks=trained.cfg.model.with_masks,
    )
    metrics = evaluate_model(
        trained.model.to(device),
        dataset,
        trained.cfg.eval.batch_size,
        device,
        max_dets,
        results,
        cityscapes_gt_dir=trained.cfg.eval.cityscapes_gt_dir,
        cityscapes_pred_dir=cityscapes_out,
    )
    if is_main_process():  # under torchrun every rank holds the metrics; one reports them
        print(format_table(metrics))
        if out is not None:
            write_json(out, metrics)
    return metrics


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Image files named directly or found (sorted) in the named folders."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    if not files:
        raise FileNotFoundError(f"no images found in {[str(i) for i in inputs]}")
    return files


@torch.no_grad()
def predict_image(
    model: Detector,
    cfg: ExperimentConfig,
    transform: DetectionTransform,
    image: np.ndarray,
    image_id: int,
    file_name: str,
) -> Instances:
    """One ``(H, W, 3)`` uint8 RGB image through the test transform and ``model`` (on its
    device): detections in original image coordinates, on the CPU. What ``instseg predict``
    and ``instseg serve`` run per image."""
    device = next(model.parameters()).device
    tensor, info = transform.prepare_image(image, image_id, file_name)
    batch = pad_images([tensor], cfg.train.size_divisor).to(device)
    return model.predict(batch, [info])[0].to("cpu")


@torch.no_grad()
def run_predict(
    weights: str | Path,
    inputs: list[str | Path],
    out_dir: str | Path,
    score_thr: float = 0.3,
    cfg: ExperimentConfig | None = None,
    device: str = "cpu",
) -> Path:
    """Predict on image files/folders; writes ``results.json`` (COCO results, image ids in
    ``images.json``) and one overlay PNG per image into ``out_dir``. Returns the results path.

    In a data-parallel launch rank r predicts images r, r + world, ... (and writes their
    overlays); rank 0 gathers the results and writes the two json files, the same as one
    process writes."""
    trained = load_trained(weights, cfg)
    model = trained.model.to(device)
    transform = eval_transform(trained.cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in trained.categories]
    category_ids = [c.id for c in trained.categories]
    results, images_index = [], []
    rank, world = rank_and_world()
    numbered = list(enumerate(list_images(inputs), start=1))
    for image_id, path in shard(numbered, rank, world):
        image = read_image(path)
        detections = predict_image(model, trained.cfg, transform, image, image_id, str(path))
        kept = detections[(detections.scores >= score_thr).nonzero().flatten()]
        results += instances_to_coco_results(kept, image_id, category_ids)
        images_index.append(
            {
                "id": image_id,
                "file_name": str(path),
                "height": image.shape[0],
                "width": image.shape[1],
            }
        )
        overlay = draw_instances(image, kept, names)
        overlay.save(out_dir / f"{path.stem}_pred.png")
    gathered = gather_to_main((results, images_index))
    if gathered is not None:
        results = sorted((r for part, _ in gathered for r in part), key=lambda r: r["image_id"])
        images_index = sorted((i for _, part in gathered for i in part), key=lambda i: i["id"])
        write_results(out_dir / "results.json", results)
        write_json(out_dir / "images.json", images_index)
    barrier()  # every process returns once the files exist
    return out_dir / "results.json"
