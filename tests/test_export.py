"""ONNX export (``instseg.export``): each detector family exported with random weights,
checked by ``onnx.checker`` and run by onnxruntime against the model's own ``predict``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx
import onnxruntime as ort

from instseg.configs import apply_overrides, get_config
from instseg.export import ExportError, compare, export_graph, export_onnx
from instseg.runner import build_model

CATEGORY_IDS = [3, 7, 11]  # dataset ids of classes 0, 1, 2
SIZE = (160, 224)

# Random weights score every box about alike: low thresholds keep detections to compare,
# and a cap of 20 keeps the mask heads (and the test) fast.
RCNN = ["model.roi_head.score_thr=0.0", "model.roi_head.max_per_image=20"]
FCOS = ["model.bbox_head.score_thr=0.01", "model.bbox_head.max_per_image=20"]
# CondInst is exported through the command line (test_export_command_...).
CASES = {
    "mask_rcnn_r18_fpn_small": (RCNN, {"dynamic": True, "pasted_masks": True}),
    "refinemask_r18_fpn_small": (RCNN, {}),
}


def _model(name: str, overrides: list[str]):
    cfg = apply_overrides(get_config(name), overrides)
    torch.manual_seed(0)
    return build_model(cfg, len(CATEGORY_IDS)).eval(), cfg


@pytest.mark.parametrize("name", list(CASES))
def test_export_matches_predict(name, tmp_path):
    overrides, options = CASES[name]
    model, cfg = _model(name, overrides)
    path = tmp_path / f"{name}.onnx"
    dynamic = options.get("dynamic", False)
    report = export_onnx(
        model,
        cfg,
        CATEGORY_IDS,
        path,
        image_size=SIZE,
        num_validation_images=3 if dynamic else 1,
        **options,
    )

    # Three images of three sizes when the graph is dynamic (one for a fixed size), each
    # compared with predict: same count and labels, boxes/scores/mask probabilities within
    # 1e-3, binary masks equal but where the probability ties the threshold.
    assert len({c.size for c in report.checks}) == len(report.checks) == (3 if dynamic else 1)
    for check in report.checks:
        assert check.detections > 0, "nothing to compare: lower the score threshold"
        assert check.ok, report.summary()
    pasted = options.get("pasted_masks", False)
    _check_graph(path, model.with_masks, pasted, None if dynamic else SIZE)


def _check_graph(path, with_masks: bool, pasted: bool, fixed_size) -> None:
    """``onnx.checker`` passes; the graph's interface is the documented one; a fixed-size
    graph refuses another size."""
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    names = [o.name for o in session.get_outputs()]
    assert names == ["boxes", "scores", "labels"] + (["masks"] if with_masks else [])
    if fixed_size is not None:
        assert session.get_inputs()[0].shape == [3, *fixed_size]
        with pytest.raises(Exception, match=r"(?i)dimension|shape"):
            session.run(None, {"image": np.zeros((3, SIZE[0] + 32, SIZE[1]), np.float32)})
    image = np.random.default_rng(1).uniform(0, 255, (3, *SIZE)).astype(np.float32)
    outputs = dict(zip(names, session.run(None, {"image": image}), strict=True))
    n = len(outputs["boxes"])
    assert outputs["boxes"].shape == (n, 4) and outputs["scores"].shape == (n,)
    assert outputs["labels"].dtype == np.int64 and set(outputs["labels"]) <= set(CATEGORY_IDS)
    if with_masks:
        masks = outputs["masks"]
        assert masks.shape[0] == n
        assert masks.shape[1:] == (SIZE if pasted else (masks.shape[1],) * 2)
        assert masks.min() >= 0 and masks.max() <= 1


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("faster_rcnn_r18_fpn_small", [*RCNN, "model.roi_head.box_extractor=generic"]),
        ("cascade_mask_rcnn_r18_fpn_small", RCNN),
    ],
)
def test_graph_module_matches_predict(name, overrides):
    """The graph module run by PyTorch (the custom ops' eager kernels) gives predict's
    detections and masks: cheap cover (no ONNX export, which costs 10-20 s a model) for
    the rest of the wrappers: Faster R-CNN (no masks) with GRoIE's box extractor, and
    Cascade Mask R-CNN's stages and per-stage mask heads."""
    model, cfg = _model(name, overrides)
    graph = export_graph(model, cfg, CATEGORY_IDS)
    image = torch.rand(3, 150, 230, generator=torch.Generator().manual_seed(2)) * 255
    with torch.no_grad():
        outputs = graph(image)
    assert len(outputs) == (4 if model.with_masks else 3)
    check = compare(model, cfg, image, outputs, CATEGORY_IDS, False)
    assert check.detections == 20 and check.ok, check


@pytest.mark.parametrize(
    ("name", "part"),
    [
        ("mask_rcnn_r18_fpn_ifr_small", "'ifr' mask head"),
        ("grid_rcnn_r18_fpn_small", "'grid' RoI head"),
        ("mask_rcnn_r18_fpn_small", "'prroi_pool'"),
    ],
)
def test_unsupported_part_is_named(name, part):
    overrides = ["model.roi_head.mask_extractor.op=prroi_pool"] if "prroi" in part else []
    model, cfg = _model(name, overrides)
    with pytest.raises(ExportError, match=part):
        export_graph(model, cfg, CATEGORY_IDS)


def test_category_count_must_match_model():
    model, cfg = _model("faster_rcnn_r18_fpn_small", [])
    with pytest.raises(ValueError, match="category ids"):
        export_graph(model, cfg, CATEGORY_IDS[:2])


def _checkpoint(tmp_path, name: str, overrides: list[str]):
    from instseg.configs import to_dict
    from instseg.engine.checkpoint import save_checkpoint

    model, cfg = _model(name, overrides)
    state = {"config": to_dict(cfg), "categories": [[i, f"c{i}"] for i in CATEGORY_IDS]}
    save_checkpoint(tmp_path, "model", model, None, state)
    return tmp_path / "model.safetensors"


def test_export_command_writes_a_validated_graph(tmp_path, capsys):
    """CondInst through ``instseg export``, validated against predict (the command fails
    otherwise)."""
    from instseg.cli import main

    weights = _checkpoint(tmp_path, "condinst_r18_fpn_small", FCOS)
    out = tmp_path / "condinst.onnx"
    argv = ["export", "--checkpoint", str(weights), "--out", str(out)]
    assert main([*argv, "--image-size", *map(str, SIZE)]) == 0
    printed = capsys.readouterr().out
    assert " ok" in printed and "MISMATCH" not in printed and f"wrote {out}" in printed
    assert " 0 detections" not in printed
    _check_graph(out, True, True, SIZE)  # CondInst's masks are full-image


def test_export_command_names_the_part_it_cannot_export(tmp_path, capsys):
    from instseg.cli import main

    weights = _checkpoint(tmp_path, "mask_rcnn_r18_fpn_ifr_small", [])
    out = tmp_path / "ifr.onnx"
    assert main(["export", "--checkpoint", str(weights), "--out", str(out)]) == 2
    assert "'ifr' mask head cannot be exported" in capsys.readouterr().err
    assert not out.exists()
