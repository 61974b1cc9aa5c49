"""Dataset inference and evaluation end to end."""

from pathlib import Path

import pytest
import torch
from torch import nn

from instseg.data import (
    CocoDataset,
    DetectionTransform,
    ShapesConfig,
    TransformConfig,
    decode_masks,
    generate_shapes,
)
from instseg.engine.inference import evaluate_model, predict_dataset
from instseg.modeling.detectors import TwoStageDetector
from instseg.structures import Instances

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class Oracle(nn.Module):
    """Predicts each image's ground truth, to test everything around the model."""

    def __init__(self, dataset: CocoDataset) -> None:
        super().__init__()
        self.by_id = {r.image_id: (r, dataset.labels_of(r)) for r in dataset.records}

    def predict(self, images, infos):
        out = []
        for i, info in enumerate(infos):
            assert images.image_sizes[i] == info.image_size
            record, labels = self.by_id[info.image_id]
            boxes = torch.from_numpy(record.boxes)
            masks = decode_masks(record.segmentations, record.height, record.width)
            labels = torch.from_numpy(labels)
            out.append(Instances(boxes, torch.linspace(1.0, 0.5, len(boxes)), labels, masks))
        return out


@pytest.mark.skipif(not (SHARED / "coco-val-6").is_dir(), reason="shared/data/coco-val-6 absent")
def test_oracle_scores_100_through_the_whole_pipeline(tmp_path):
    transform = DetectionTransform(TransformConfig(scales=((533, 320),)), train=False)
    dataset = CocoDataset(
        SHARED / "coco-val-6" / "annotations.json", SHARED / "coco-val-6" / "images", transform
    )
    metrics = evaluate_model(
        Oracle(dataset), dataset, batch_size=3, results_path=tmp_path / "r.json"
    )
    assert metrics["bbox"]["AP"] == pytest.approx(100.0)
    assert metrics["segm"]["AP"] == pytest.approx(100.0)
    assert metrics["boundary"]["AP"] == pytest.approx(100.0)
    assert (tmp_path / "r.json").read_text().startswith("[")
    seen = [info.image_id for info, _ in predict_dataset(Oracle(dataset), dataset, batch_size=4)]
    assert sorted(seen) == sorted(r.image_id for r in dataset.records)


def test_tiny_detector_trains_and_evaluates_on_shapes(tmp_path):
    from test_models import tiny_config

    ann = generate_shapes(
        tmp_path, ShapesConfig(num_images=6, image_size=(96, 128), max_size=40, seed=3)
    )
    transform = DetectionTransform(TransformConfig(scales=((160, 96),)), train=True)
    dataset = CocoDataset(ann, tmp_path, transform)
    torch.manual_seed(0)
    model = TwoStageDetector(tiny_config(), num_classes=len(dataset.categories))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    from instseg.data import build_loader

    for images, targets, _ in build_loader(dataset, batch_size=3, train=True):
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    dataset.transform = DetectionTransform(TransformConfig(scales=((160, 96),)), train=False)
    metrics = evaluate_model(model, dataset, batch_size=3)
    assert set(metrics) == {"bbox", "segm", "boundary"}
    for iou_type in ("bbox", "segm", "boundary"):
        assert set(metrics[iou_type]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert 0.0 <= metrics[iou_type]["AP"] <= 100.0
