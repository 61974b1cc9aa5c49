"""Cityscapes through the evaluation paths: ``evaluate_model``, ``instseg train`` and
``instseg eval`` with ``eval.cityscapes_gt_dir`` / ``--cityscapes-gt``.

The converter and the official evaluation on their own are tested in test_cityscapes.py;
here a model that predicts the ground truth must score 100 by both the COCO-style and the
official Cityscapes evaluation, and a tiny trained model must get a ``cityscapes`` entry in
``metrics.json`` from the command line.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch import nn

from instseg.cli import main
from instseg.configs import get_config
from instseg.data import CocoDataset
from instseg.data.cityscapes import convert_cityscapes
from instseg.engine.inference import evaluate_model
from instseg.runner import eval_transform
from instseg.structures import Instances
from test_cli import TINY

pytest.importorskip(
    "cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling",
    reason="cityscapesscripts is not installed (pip install instseg[cityscapes])",
)

_spec = importlib.util.spec_from_file_location(
    "cityscapes_tree", Path(__file__).parent / "fixtures" / "cityscapes" / "tree.py"
)
tree = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tree)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cityscapes")
    tree.make_tree(root)
    convert_cityscapes(root, root / "annotations", ("train", "val"))
    return root


class GroundTruthModel(nn.Module):
    """Predicts each image's non-crowd ground truth with score 1 (original coordinates)."""

    def __init__(self, coco: dict, label_of: dict[int, int]) -> None:
        super().__init__()
        self.by_file = {img["file_name"]: img for img in coco["images"]}
        self.anns = coco["annotations"]
        self.label_of = label_of

    def predict(self, images, infos) -> list[Instances]:
        out = []
        for info in infos:
            img = self.by_file[info.file_name]
            anns = [a for a in self.anns if a["image_id"] == img["id"] and not a["iscrowd"]]
            masks = np.stack([mask_utils.decode(a["segmentation"]).astype(bool) for a in anns])
            boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
            boxes[:, 2:] += boxes[:, :2]
            out.append(
                Instances(
                    boxes,
                    torch.ones(len(anns)),
                    torch.tensor([self.label_of[a["category_id"]] for a in anns]),
                    torch.from_numpy(masks),
                )
            )
        return out


def test_ground_truth_scores_100_both_ways(converted: Path, tmp_path: Path) -> None:
    ann = converted / "annotations" / "instancesonly_filtered_gtFine_val.json"
    dataset = CocoDataset(
        ann,
        converted / "leftImg8bit" / "val",
        eval_transform(get_config("mask_rcnn_r18_fpn_small")),
    )
    label_of = {c.id: i for i, c in enumerate(dataset.categories)}
    model = GroundTruthModel(json.loads(ann.read_text()), label_of)
    pred_dir = tmp_path / "pred"
    metrics = evaluate_model(
        model,
        dataset,
        cityscapes_gt_dir=converted / "gtFine" / "val",
        cityscapes_pred_dir=pred_dir,
    )
    assert metrics["cityscapes"]["AP"] == pytest.approx(100.0)
    assert metrics["cityscapes"]["AP50"] == pytest.approx(100.0)
    for iou_type in ("bbox", "segm", "boundary"):
        assert metrics[iou_type]["AP"] == pytest.approx(100.0), iou_type
    assert sorted(p.name for p in pred_dir.glob("*_pred.txt")) == sorted(
        f"{Path(img['file_name']).name[: -len('_leftImg8bit.png')]}_pred.txt"
        for img in json.loads(ann.read_text())["images"]
    )
    # Without a prediction folder the files go to a temporary one: same numbers.
    again = evaluate_model(model, dataset, cityscapes_gt_dir=converted / "gtFine" / "val")
    assert again == metrics
    with pytest.raises(FileNotFoundError, match=r"eval\.cityscapes_gt_dir"):
        evaluate_model(model, dataset, cityscapes_gt_dir=tmp_path / "missing")


def test_train_and_eval_commands_add_the_official_metrics(converted: Path, tmp_path: Path) -> None:
    ann_dir, images = converted / "annotations", converted / "leftImg8bit"
    gt_dir = converted / "gtFine" / "val"
    work = tmp_path / "work"
    argv = [
        "train",
        "mask_rcnn_r18_fpn_small",
        "--work-dir",
        str(work),
        "--train-ann",
        str(ann_dir / "instancesonly_filtered_gtFine_train.json"),
        "--train-images",
        str(images / "train"),
        "--val-ann",
        str(ann_dir / "instancesonly_filtered_gtFine_val.json"),
        "--val-images",
        str(images / "val"),
        "--max-iters",
        "1",
        "--set",
        *TINY,
        f"eval.cityscapes_gt_dir={gt_dir}",
    ]
    assert main(argv) == 0
    metrics = json.loads((work / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm", "boundary", "cityscapes"}
    assert {"AP", "AP50", "AP_car"} <= set(metrics["cityscapes"])
    assert (work / "cityscapes_results").is_dir()

    out, pred = tmp_path / "eval.json", tmp_path / "pred"
    weights = str(work / "model_final.safetensors")
    argv = [
        "eval",
        "--checkpoint",
        weights,
        "--ann",
        str(ann_dir / "instancesonly_filtered_gtFine_val.json"),
        "--images",
        str(images / "val"),
        "--cityscapes-gt",
        str(gt_dir),
        "--cityscapes-out",
        str(pred),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert json.loads(out.read_text()) == metrics
    val_images = json.loads((ann_dir / "instancesonly_filtered_gtFine_val.json").read_text())
    assert len(list(pred.glob("*_pred.txt"))) == len(val_images["images"])
