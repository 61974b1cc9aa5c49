"""Issue 11: detectors composed of typed parts.

Saved configs and checkpoints of the first format load (and predict as they did), tagged
variants are chosen and validated by the override parser, and the runner trains and
evaluates any detector that follows the protocol (here a toy one-stage detector defined in
this file, which the two-stage code knows nothing about).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import reference_cases as ref
from instseg.cli import load_config
from instseg.configs import (
    ZOO,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    from_dict,
    get_config,
    to_dict,
)
from instseg.data import ShapesConfig, generate_shapes
from instseg.modeling.roi import FCNMaskHeadConfig, GRoIEConfig, RefineMaskHeadConfig
from instseg.runner import load_trained, run_train
from instseg.structures import Instances

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHECKPOINT_V1 = FIXTURES / "checkpoint_v1"


# ---------------------------------------------------------------- the first format loads


def test_every_first_format_zoo_config_upgrades_to_todays():
    """``configs_v1.json``: ``to_dict`` of every zoo config, written by the code before
    the refactor. Each upgrades to exactly today's config of the same name."""
    old = json.loads((FIXTURES / "configs_v1.json").read_text())
    # Every config that existed then; the one-stage detectors, the cascades, IFR's
    # detectron2/cvpods recipes, Grid R-CNN, the LVIS/Cityscapes and torchvision recipes came
    # later.
    two_stage = {n for n in ZOO if get_config(n).model.kind == "two_stage"}
    later = {n for n in two_stage if n.startswith(("cascade", "grid")) or "ifr" in n}
    later |= {n for n in two_stage if ".res50." in n}
    later |= {n for n in two_stage if n.endswith(("_lvis_v1", "_cityscapes"))}
    later |= {n for n in two_stage if n.startswith("torchvision_")}
    assert len(later) == 20
    assert set(old) == two_stage - later
    for name, data in old.items():
        assert "kind" not in data["model"]
        assert config_from_dict(data) == get_config(name), name


def test_upgrade_rejects_values_the_model_no_longer_takes_from_the_config():
    old = json.loads((FIXTURES / "configs_v1.json").read_text())["mask_rcnn_r18_fpn_small"]
    old["model"]["rpn"]["in_channels"] = 32  # the neck gives 64
    with pytest.raises(ConfigError, match=r"model\.rpn\.in_channels is 32.*derives it"):
        config_from_dict(old)


def test_first_format_checkpoint_loads_and_predicts_as_before():
    """A checkpoint written by the code before the refactor (``make_checkpoint_v1.py``):
    its config is upgraded, its weights load key for key, and its detections on fixed
    inputs equal those recorded then."""
    stored = json.loads((CHECKPOINT_V1 / "model_final.json").read_text())["state"]["config"]
    assert "kind" not in stored["model"] and stored["model"]["roi_head"]["with_mask"]
    trained = load_trained(CHECKPOINT_V1 / "model_final.safetensors")
    assert trained.cfg.model.roi_head.mask_head == FCNMaskHeadConfig(num_convs=2)
    assert [c.id for c in trained.categories] == [1, 3, 7]
    images, _, infos = ref.make_inputs()
    # The recording was made with NCHW maps; channels-last (the default since, for every
    # config) only reorders float sums, which test_backbone and test_mask_targets check.
    assert trained.model.backbone.cfg.channels_last
    trained.model.backbone.cfg.channels_last = False
    with torch.no_grad():
        results = trained.model.predict(images, infos)
    recorded = load_file(str(CHECKPOINT_V1 / "old_predictions.safetensors"))
    # Float32 predictions recorded as float64: float32 tolerances (another CPU may round the
    # last bit differently).
    for i, result in enumerate(results):
        torch.testing.assert_close(result.boxes, recorded[f"{i}/boxes"].float())
        torch.testing.assert_close(result.scores, recorded[f"{i}/scores"].float())
        assert torch.equal(result.labels, recorded[f"{i}/labels"])
        assert torch.equal(result.masks.flatten(1).sum(1), recorded[f"{i}/mask_area"])
    # The run's config.json of the first format loads as a CONFIG file too.
    assert load_config(str(CHECKPOINT_V1 / "config.json"), []) == trained.cfg


# ------------------------------------------------------------------ typed variants


def test_tagged_sections_switch_by_name_and_keep_their_own_keys():
    cfg = get_config("mask_rcnn_r18_fpn_small")
    apply_overrides(
        cfg,
        [
            "model.roi_head.mask_head=refinemask",
            "model.roi_head.mask_head.conv_channels=64",
            "model.roi_head.box_extractor=generic",
            "model.roi_head.box_extractor.aggregation=concat",
        ],
    )
    roi = cfg.model.roi_head
    assert roi.mask_head == RefineMaskHeadConfig(conv_channels=64)
    assert roi.box_extractor == GRoIEConfig(aggregation="concat")
    # Naming the variant a section already is keeps its settings; `kind` is the same switch.
    apply_overrides(cfg, ["model.roi_head.mask_head=refinemask", "model.kind=two_stage"])
    assert roi.mask_head.conv_channels == 64 and cfg.model.roi_head is roi
    apply_overrides(cfg, ["model.roi_head.mask_head.kind=fcn"])
    assert cfg.model.roi_head.mask_head == FCNMaskHeadConfig()
    apply_overrides(cfg, ["model.roi_head.mask_head=none"])
    assert cfg.model.roi_head.mask_head is None and not cfg.model.with_masks
    with pytest.raises(ConfigError, match=r"mask_head is none; choose one first"):
        apply_overrides(cfg, ["model.roi_head.mask_head.num_convs=2"])
    with pytest.raises(ConfigError, match=r"box_extractor: unknown choice 'none'"):
        apply_overrides(cfg, ["model.roi_head.box_extractor=none"])  # not optional
    # A saved dict picks its variant by "kind", and round-trips.
    assert from_dict(ExperimentConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    data = to_dict(get_config("refinemask_r18_fpn_small"))
    data["model"]["roi_head"]["mask_head"]["kind"] = "pointrend"
    with pytest.raises(ConfigError, match=r"'kind' must be one of fcn, refinemask"):
        from_dict(ExperimentConfig, data)


def test_a_narrow_model_is_a_few_width_keys():
    """The widths of the RPN, the extractors and the heads follow the neck: three keys
    narrow any zoo model (RefineMask adds its own stage width)."""
    from test_training import NARROW, narrow

    assert len(NARROW) == 3 and len(narrow("refinemask_r50_fpn_1x_coco")) == 4
    model = ref.build_case("gcnet_groie_r50")
    widths = {m.in_channels for m in model.rpn_head.modules() if isinstance(m, nn.Conv2d)}
    assert widths == {16}
    assert model.roi_head.mask_head.convs[0].conv.in_channels == 16
    assert model.roi_head.bbox_head.shared_fcs[0].in_features == 16 * 7 * 7


# ---------------------------------------------------- the runner speaks to the protocol


class _ToyOneStage(nn.Module):
    """A whole-image 'detector': one learnable box per class, scored by a global feature.
    It returns a diagnostic next to its loss and records the contexts it is given."""

    with_masks = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.score = nn.Linear(3, num_classes)
        self.box = nn.Parameter(torch.tensor([0.1, 0.1, 0.9, 0.9]))
        self.contexts: list = []

    def forward(self, images, targets, context=None):
        self.contexts.append(context)
        logits = self.score(images.tensor.mean(dim=(2, 3)))
        present = torch.zeros_like(logits)
        for i, t in enumerate(targets):
            present[i, t.labels] = 1.0
        loss = nn.functional.binary_cross_entropy_with_logits(logits, present)
        return {"loss_cls": loss, "accuracy": ((logits > 0) == present.bool()).float().mean()}

    def predict(self, images, infos=None):
        scores = self.score(images.tensor.mean(dim=(2, 3))).sigmoid()
        results = []
        for i, (h, w) in enumerate(images.image_sizes):
            if infos is not None:
                h, w = infos[i].original_size
            box = self.box.detach().clamp(0, 1) * torch.tensor([w, h, w, h])
            boxes = box.expand(self.num_classes, 4)
            results.append(Instances(boxes, scores[i], torch.arange(self.num_classes)))
        return results


@dataclass
class _ToyOneStageConfig:
    kind: Literal["toy_one_stage"] = "toy_one_stage"
    max_per_image: int = 100

    @property
    def with_masks(self) -> bool:
        return False

    def build(self, num_classes: int) -> _ToyOneStage:
        return _ToyOneStage(num_classes)

    def raise_detection_cap(self, max_dets: int) -> None:
        self.max_per_image = max(self.max_per_image, max_dets)


def test_runner_trains_and_evaluates_any_detector_of_the_protocol(tmp_path, monkeypatch):
    ann = generate_shapes(
        tmp_path / "data", ShapesConfig(num_images=4, image_size=(64, 96), max_size=32, seed=2)
    )
    cfg = ExperimentConfig(model=_ToyOneStageConfig())  # type: ignore[arg-type]
    cfg = apply_overrides(
        cfg,
        [
            "train.max_iters=3",
            "train.batch_size=2",
            "train.log_every=1",
            "train.schedule.warmup_iters=0",
            "data.train_scales=((96,64),)",
            "data.test_scale=(96,64)",
        ],
    )
    cfg.data.train_ann = cfg.data.val_ann = str(ann)
    cfg.data.train_images = cfg.data.val_images = str(tmp_path / "data")
    built: list[_ToyOneStage] = []
    original = _ToyOneStageConfig.build
    monkeypatch.setattr(
        _ToyOneStageConfig, "build", lambda self, n: built.append(original(self, n)) or built[-1]
    )
    metrics = run_train(cfg, tmp_path / "work")
    assert set(metrics) == {"bbox"}  # no masks: box AP only
    model = built[0]
    assert [(c.iteration, c.max_iters) for c in model.contexts] == [(0, 3), (1, 3), (2, 3)]
    log = [json.loads(x) for x in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert all("accuracy" in r and r["total"] == pytest.approx(r["loss_cls"]) for r in log)
