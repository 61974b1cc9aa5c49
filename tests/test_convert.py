"""``instseg convert``: checkpoints of mmdetection in, instseg checkpoints out (issue 18).

The references are independent of the converter: the state dicts of
``tests/fixtures/{cascade,grid,condinst}_mmdet`` were written by mmdetection 3.3's own models
(their make_fixture.py scripts), with mmdet's detections on the same input. Here they are
wrapped as mmdetection's runners and ``publish_model.py`` write checkpoints (3.x ``meta`` with
``dataset_meta``, 2.x ``CLASSES``, a DDP ``module.`` prefix, ``data_preprocessor`` keys),
converted through the command line with a zoo config narrowed by ``--set``, loaded as
``instseg eval`` loads a checkpoint, and must give mmdet's detections.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instseg.cli import main
from instseg.convert import categories_for
from instseg.data.coco_categories import COCO_CATEGORIES
from instseg.runner import load_trained
from mmdet_fixtures import assert_detections_equal, mmdet_batch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
COCO_VAL6 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-val-6"
CLASSES = ("a", "b", "c", "d", "e")  # the fixtures' 5 classes
NARROW_TWO_STAGE = [
    "model.backbone.depth=18",
    "model.backbone.base_width=8",
    "model.neck.out_channels=16",
    "model.roi_head.box_head.fc_channels=32",
]
CASES = {
    # fixture: (zoo config, --set, how the checkpoint is wrapped)
    "cascade": ("cascade_mask_rcnn_r50_fpn_1x_coco", NARROW_TWO_STAGE, "mmdet3"),
    "grid": (
        "grid_rcnn_r50_fpn_gn-head_2x_coco",
        [*NARROW_TWO_STAGE, "model.roi_head.grid_head.point_feat_channels=8"],
        "mmdet2",
    ),
    "condinst": (
        "condinst_r50_fpn_ms-poly-90k_coco_instance",
        [
            "model.backbone.depth=18",
            "model.backbone.base_width=8",
            "model.neck.out_channels=16",
            "model.bbox_head.stacked_convs=2",
            "model.bbox_head.feat_channels=16",
            "model.bbox_head.num_groups=4",
            "model.mask_head.branch_channels=16",
            "model.mask_head.branch_convs=2",
        ],
        "ddp",
    ),
}


def _fixture(name: str) -> tuple[dict, torch.Tensor, dict, dict]:
    folder = FIXTURES / f"{name}_mmdet"
    if not (folder / f"{name}_state.safetensors").is_file():
        pytest.skip(f"mmdet {name} fixture absent")
    state = load_file(folder / f"{name}_state.safetensors")
    # The Grid fixture was made on the Cascade fixture's input batch.
    inputs_folder = FIXTURES / "cascade_mmdet" if name == "grid" else folder
    inputs = load_file(inputs_folder / "inputs.safetensors")["inputs_x32"].float() / 32
    io = load_file(folder / f"{name}_io.safetensors")
    meta = json.loads((folder / f"{name}_meta.json").read_text())
    return state, inputs, io, meta


def _write_mmdet_checkpoint(state: dict, style: str, path: Path) -> None:
    """``state`` saved as mmdetection saves checkpoints, in one of three layouts."""
    weights = OrderedDict(state)
    if style == "mmdet3":  # mmengine runner, after publish_model.py: meta + state_dict
        weights["data_preprocessor.mean"] = torch.tensor([123.675, 116.28, 103.53])
        meta = {
            "epoch": 12,
            "iter": 87960,
            "mmengine_version": "0.10.4",
            "dataset_meta": {"classes": CLASSES, "palette": [(220, 20, 60)] * 5},
            "cfg": "model = dict(type='CascadeRCNN')",
        }
        checkpoint = {"meta": meta, "state_dict": weights}
    elif style == "mmdet2":  # mmcv runner: CLASSES in meta, an optimizer beside
        meta = {"mmdet_version": "2.25.0", "CLASSES": CLASSES, "epoch": 24, "config": "..."}
        optimizer = {"state": {}, "param_groups": [{"lr": 0.02, "params": [0, 1]}]}
        checkpoint = {"meta": meta, "state_dict": weights, "optimizer": optimizer}
    else:  # a bare state dict saved from a DDP-wrapped model
        checkpoint = OrderedDict((f"module.{k}", v) for k, v in weights.items())
    torch.save(checkpoint, path)


@pytest.mark.parametrize("name", list(CASES))
def test_mmdet_checkpoints_convert_and_predict_as_mmdet(name, tmp_path, capsys):
    state, inputs, io, meta = _fixture(name)
    config, overrides, style = CASES[name]
    source = tmp_path / f"{name}.pth"
    _write_mmdet_checkpoint(state, style, source)
    out = tmp_path / "converted" / "model.safetensors"
    argv = ["convert", str(source), "--format", "mmdet", "--config", config, "--out", str(out)]
    if style == "ddp":  # no class names in the file: take them from an annotation file
        ann = tmp_path / "ann.json"
        cats = [{"id": 10 + i, "name": n} for i, n in enumerate(CLASSES)]
        ann.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
        argv += ["--categories", str(ann)]
    assert main([*argv, "--set", *overrides]) == 0, capsys.readouterr().err

    converted = load_file(out)
    expected = {k: v for k, v in state.items() if k in converted}
    assert expected.keys() == converted.keys() == state.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    record = json.loads(out.with_suffix(".json").read_text())["state"]
    source_facts = record["converted_from"]
    assert source_facts["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert source_facts["format"] == "mmdet"
    if style == "mmdet3":
        assert source_facts["dropped_keys"] == ["data_preprocessor.mean"]
        assert source_facts["meta"] == {"mmengine_version": "0.10.4", "epoch": 12, "iter": 87960}
    ids = [c[0] for c in record["categories"]]
    assert [c[1] for c in record["categories"]] == list(CLASSES)
    assert ids == ([10, 11, 12, 13, 14] if style == "ddp" else [1, 2, 3, 4, 5])

    trained = load_trained(out)  # as instseg eval / predict load it
    images, infos = mmdet_batch(inputs, meta)
    with torch.no_grad():
        results = trained.model.predict(images, infos)
    assert_detections_equal(results, io, meta["img_metas"])


def test_a_config_that_does_not_match_is_refused_with_the_keys(tmp_path, capsys):
    state, *_ = _fixture("cascade")
    source = tmp_path / "cascade.pth"
    _write_mmdet_checkpoint(state, "mmdet3", source)
    out = tmp_path / "model.safetensors"
    base = ["convert", str(source), "--format", "mmdet", "--out", str(out)]
    # Not narrowed: every conv of the backbone has another shape.
    assert main([*base, "--config", "cascade_mask_rcnn_r50_fpn_1x_coco"]) == 2
    err = capsys.readouterr().err
    assert "does not match the model of the config" in err
    assert "of another shape: backbone.conv1.weight (file (8, 3, 7, 7), model (64, 3, 7, 7))" in err
    # Another detector: keys on both sides that the other lacks.
    grid = ["--config", "grid_rcnn_r50_fpn_gn-head_2x_coco", "--set", *NARROW_TWO_STAGE]
    assert main([*base, *grid]) == 2
    err = capsys.readouterr().err
    assert "236 missing from the file: roi_head.bbox_head.shared_fcs.0.weight" in err
    assert "roi_head.grid_head.convs.0.conv.weight" in err
    assert "60 not in the model: roi_head.bbox_head.0.fc_cls.bias" in err
    assert not out.exists() and not out.with_suffix(".json").exists()


class _RunsCode:
    """Unpickling this would call os.system (a checkpoint that runs code when loaded)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    source = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": _RunsCode(marker)}, source)
    out = tmp_path / "model.safetensors"
    argv = ["convert", str(source), "--format", "mmdet", "--config", "mask_rcnn_r18_fpn_small"]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "never runs code from a checkpoint" in err
    assert "system" in err  # the object it asked for is named
    assert not marker.exists() and not out.exists()


def test_unreadable_and_malformed_checkpoints_are_named(tmp_path, capsys):
    argv = ["convert", "--format", "mmdet", "--config", "mask_rcnn_r18_fpn_small"]
    out = ["--out", str(tmp_path / "m.safetensors")]
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    assert main([*argv, str(corrupt), *out]) == 2
    assert "corrupt.pth: not a readable torch checkpoint" in capsys.readouterr().err
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    assert main([*argv, str(listed), *out]) == 2
    assert "list.pth: expected a dict, found list" in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "absent.pth"), *out]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    wrong = ["--out", str(tmp_path / "m.pth")]
    torch.save({"state_dict": {"w": torch.zeros(1)}}, corrupt)
    assert main([*argv, str(corrupt), *wrong]) == 2
    assert "--out must name a .safetensors file" in capsys.readouterr().err


def test_coco_class_names_get_cocos_ids():
    names = [n for _, n in COCO_CATEGORIES]
    assert [(c.id, c.name) for c in categories_for(names)] == COCO_CATEGORIES
    assert [(c.id, c.name) for c in categories_for(None)] == COCO_CATEGORIES
    assert [(c.id, c.name) for c in categories_for(["x", "y"])] == [(1, "x"), (2, "y")]


def test_coco_categories_are_coco_2017s():
    if not (COCO_VAL6 / "annotations.json").is_file():
        pytest.skip("shared/data/coco-val-6 absent")
    data = json.loads((COCO_VAL6 / "annotations.json").read_text())
    assert sorted((c["id"], c["name"]) for c in data["categories"]) == COCO_CATEGORIES


def _official_keys() -> dict:
    path = FIXTURES / "mmdet_keys" / "mmdet_keys.json"
    return json.loads(path.read_text())["models"] if path.is_file() else {}


@pytest.mark.parametrize("name", sorted(_official_keys()) or ["absent"])
def test_official_mmdet_models_map_key_for_key(name):
    """The state dicts of mmdetection 3.3's own full-size models of every mmdet recipe in the
    zoo (Faster/Mask R-CNN R-50/R-101, GRoIE, GCNet, Grid, Cascade Mask, CondInst, LVIS,
    Cityscapes; names and shapes recorded by tests/fixtures/mmdet_keys/make_fixture.py)
    match the zoo config of the same name: the mmdet format needs no renaming for them."""
    from instseg.configs import get_config
    from instseg.convert import match_state
    from instseg.runner import build_model

    if name == "absent":
        pytest.skip("tests/fixtures/mmdet_keys/mmdet_keys.json absent")
    shapes = _official_keys()[name]["keys"]
    # The class count of the official model (COCO 80, LVIS 1203, Cityscapes 8).
    # A box head's fc_cls is (classes + 1 background, C); a dense head's conv_cls has no
    # background row.
    ends = ("fc_cls.weight", "conv_cls.weight")
    cls = next(shape for k, shape in sorted(shapes.items()) if k.endswith(ends))
    num_classes = cls[0] - 1 if len(cls) == 2 else cls[0]
    model = build_model(get_config(name), num_classes)
    state = {k: torch.empty(shape) for k, shape in shapes.items()}
    matched = match_state(model, state, name)
    assert matched.keys() == model.state_dict().keys()
    counters = {k for k in shapes if k.endswith("num_batches_tracked")}
    assert set(shapes) - counters == set(model.state_dict()) - counters


def _official_refinemask_head(num_classes: int = 80) -> dict[str, tuple[int, ...]]:
    """The ``roi_head.mask_head`` keys and shapes of the official ``RefineMaskHead`` with its
    COCO settings, written down from its module definitions (zhanggang001/RefineMask,
    refine_mask_head.py): 2 instance and 4 semantic 3x3 ConvModules of 256 channels (no norm:
    with bias); 3 SFMStages whose width halves from 256 (stage k: in c, out c / 2), each with
    1x1 semantic_transform_in (256 -> c) and _out (c -> c), instance_logits (c -> classes),
    fuse_conv = [1x1 conv (2c + 2 -> c), MultiBranchFusion (three dilated 3x3 ConvModules
    and a 1x1 merge_conv)], fuse_transform_out (c -> c / 2 - 2); final_instance_logits
    (32 -> classes) and semantic_logits (256 -> 1)."""
    keys: dict[str, tuple[int, ...]] = {}

    def conv(name: str, out: int, inp: int, k: int) -> None:
        keys[f"roi_head.mask_head.{name}.weight"] = (out, inp, k, k)
        keys[f"roi_head.mask_head.{name}.bias"] = (out,)

    for i in range(2):
        conv(f"instance_convs.{i}.conv", 256, 256, 3)
    for i in range(4):
        conv(f"semantic_convs.{i}.conv", 256, 256, 3)
    c = 256
    for k in range(3):
        stage = f"stages.{k}"
        conv(f"{stage}.semantic_transform_in", c, 256, 1)
        conv(f"{stage}.semantic_transform_out", c, c, 1)
        conv(f"{stage}.instance_logits", num_classes, c, 1)
        conv(f"{stage}.fuse_conv.0", c, 2 * c + 2, 1)
        for d in (1, 2, 3):
            conv(f"{stage}.fuse_conv.1.dilation_conv_{d}.conv", c, c, 3)
        conv(f"{stage}.fuse_conv.1.merge_conv.conv", c, c, 1)
        conv(f"{stage}.fuse_transform_out", c // 2 - 2, c, 1)
        c //= 2
    conv("final_instance_logits", num_classes, 32, 1)
    conv("semantic_logits", 1, 256, 1)
    return keys


def test_official_refinemask_checkpoints_map_key_for_key(tmp_path):
    """An official RefineMask R-50 checkpoint: mmdetection's Mask R-CNN R-50 keys (recorded
    from mmdet) for everything but the mask head, the official head's keys (above) for it,
    in mmdet 2.x's file layout; it converts into refinemask_r50_fpn_1x_coco."""
    models = _official_keys()
    if "mask_rcnn_r50_fpn_1x_coco" not in models:
        pytest.skip("tests/fixtures/mmdet_keys/mmdet_keys.json absent")
    shapes = {
        k: tuple(v)
        for k, v in models["mask_rcnn_r50_fpn_1x_coco"]["keys"].items()
        if not k.startswith("roi_head.mask_head.")
    }
    shapes |= _official_refinemask_head()
    torch.manual_seed(0)
    state = OrderedDict((k, torch.randn(s) if s else torch.tensor(0)) for k, s in shapes.items())
    source = tmp_path / "refinemask_r50.pth"
    names = tuple(n for _, n in COCO_CATEGORIES)
    meta = {"mmdet_version": "2.3.0", "CLASSES": names, "epoch": 12}
    torch.save({"meta": meta, "state_dict": state}, source)
    out = tmp_path / "refinemask.safetensors"
    argv = ["convert", str(source), "--format", "refinemask", "--out", str(out)]
    assert main([*argv, "--config", "refinemask_r50_fpn_1x_coco"]) == 0
    converted = load_file(out)
    floating = [k for k in state if state[k].is_floating_point()]
    assert all(torch.equal(converted[k], state[k]) for k in floating)
    record = json.loads(out.with_suffix(".json").read_text())["state"]
    assert [tuple(c) for c in record["categories"]] == COCO_CATEGORIES
    assert record["converted_from"]["format"] == "refinemask"


def test_the_command_lines_formats_are_the_converters():
    from instseg.cli import FORMAT_CHOICES
    from instseg.convert import FORMATS

    assert FORMAT_CHOICES == FORMATS


# ------------------------------------------------------------------ detectron2 / cvpods


def _detectron2_ifr_model(
    cascade: bool, weight_sharing: bool = False
) -> list[tuple[str, str | None, tuple[int, ...]]]:
    """``(detectron2 name, our name or None if dropped, shape)`` of cvpods' IFR R-50-FPN
    models, written out from the module definitions (spec §13.7; detectron2's
    ``build_resnet_fpn_backbone`` with FrozenBN, ``StandardRPNHead``, ``FastRCNNConvFCHead``
    with two fcs, ``FastRCNNOutputLayers`` per cascade stage, IFR's mask head with its block
    registered four times, or the weight-sharing head's one plain block) beside the names
    our modules have."""
    entries: list[tuple[str, str | None, tuple[int, ...]]] = []

    def norm(d2: str, ours: str, channels: int) -> None:
        for buf in ("weight", "bias", "running_mean", "running_var"):
            entries.append((f"{d2}.{buf}", f"{ours}.{buf}", (channels,)))

    def conv(d2: str, ours: str | None, shape: tuple[int, ...], bias: bool = True) -> None:
        entries.append((f"{d2}.weight", ours and f"{ours}.weight", shape))
        if bias:
            entries.append((f"{d2}.bias", ours and f"{ours}.bias", (shape[0],)))

    bu = "backbone.bottom_up"
    conv(f"{bu}.stem.conv1", "backbone.conv1", (64, 3, 7, 7), bias=False)
    norm(f"{bu}.stem.conv1.norm", "backbone.bn1", 64)
    in_ch = 64
    for stage, (blocks, mid) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        out_ch = mid * 4
        for b in range(blocks):
            d2, ours = f"{bu}.res{stage + 2}.{b}", f"backbone.layer{stage + 1}.{b}"
            block_in = in_ch if b == 0 else out_ch
            if b == 0:
                conv(f"{d2}.shortcut", f"{ours}.downsample.0", (out_ch, in_ch, 1, 1), False)
                norm(f"{d2}.shortcut.norm", f"{ours}.downsample.1", out_ch)
            shapes = [(mid, block_in, 1, 1), (mid, mid, 3, 3), (out_ch, mid, 1, 1)]
            for i, shape in enumerate(shapes, start=1):
                conv(f"{d2}.conv{i}", f"{ours}.conv{i}", shape, bias=False)
                norm(f"{d2}.conv{i}.norm", f"{ours}.bn{i}", shape[0])
        in_ch = out_ch
    for level, c in zip((2, 3, 4, 5), (256, 512, 1024, 2048), strict=True):
        conv(f"backbone.fpn_lateral{level}", f"neck.lateral_convs.{level - 2}.conv", (256, c, 1, 1))
        conv(f"backbone.fpn_output{level}", f"neck.fpn_convs.{level - 2}.conv", (256, 256, 3, 3))
    rpn = "proposal_generator.rpn_head"
    conv(f"{rpn}.conv", "rpn_head.rpn_conv", (256, 256, 3, 3))
    conv(f"{rpn}.objectness_logits", "rpn_head.rpn_cls", (3, 256, 1, 1))
    conv(f"{rpn}.anchor_deltas", "rpn_head.rpn_reg", (12, 256, 1, 1))
    for stage in range(3) if cascade else [None]:
        d2 = "" if stage is None else f"{stage}."
        ours = "roi_head.bbox_head." + ("" if stage is None else f"{stage}.")
        conv(f"roi_heads.box_head.{d2}fc1", f"{ours}shared_fcs.0", (1024, 256 * 7 * 7))
        conv(f"roi_heads.box_head.{d2}fc2", f"{ours}shared_fcs.1", (1024, 1024))
        conv(f"roi_heads.box_predictor.{d2}cls_score", f"{ours}fc_cls", (81, 1024))
        deltas = 4 if cascade else 320  # cascade stages regress class-agnostic boxes
        conv(f"roi_heads.box_predictor.{d2}bbox_pred", f"{ours}fc_reg", (deltas, 1024))
    head = "roi_heads.mask_head"
    if weight_sharing:  # the block unrolled: plain convs, registered once
        for i in (1, 2):
            ours = f"roi_head.mask_head.repeat_block.conv{i}"
            conv(f"{head}.repeat_block.conv{i}", ours, (256, 256, 3, 3), bias=False)
        for i in (1, 2, 3):
            conv(f"{head}.repeat_block.gn{i}", f"roi_head.mask_head.repeat_block.gn{i}", (256,))
    else:
        for registered in ("repeat_block", "deq.func"):  # one module, two paths
            kept = registered == "repeat_block"
            for i in (1, 2):
                name = f"{head}.{registered}.conv{i}"
                ours = f"roi_head.mask_head.repeat_block.conv{i}" if kept else None
                entries.append((f"{name}.weight_g", ours and f"{ours}.weight_g", (256, 1, 1, 1)))
                entries.append((f"{name}.weight_v", ours and f"{ours}.weight_v", (256, 256, 3, 3)))
            for i in (1, 2, 3):
                ours = f"roi_head.mask_head.repeat_block.gn{i}" if kept else None
                conv(f"{head}.{registered}.gn{i}", ours, (256,))
        for copy in ("repeat_block_copy", "deq.func_copy"):  # the copy for the backward solve
            for i in (1, 2):
                conv(f"{head}.{copy}.conv{i}", None, (256, 256, 3, 3), bias=False)
            for i in (1, 2, 3):
                conv(f"{head}.{copy}.gn{i}", None, (256,))
    conv(f"{head}.deconv", "roi_head.mask_head.deconv", (256, 256, 2, 2))
    conv(f"{head}.predictor", "roi_head.mask_head.predictor", (80, 256, 1, 1))
    entries.append(("pixel_mean", None, (3, 1, 1)))
    entries.append(("pixel_std", None, (3, 1, 1)))
    return entries


@pytest.mark.parametrize(
    ("config", "cascade", "container"),
    [
        ("mask_rcnn.ifr.res50.fpn.coco.multiscale.1x", False, "pkl"),
        ("cascade_rcnn.ifr.res50.fpn.coco.800size.1x", True, "pth"),
        ("mask_rcnn.res50.fpn.coco.multiscale.weight_sharing.1x", False, "pth"),
    ],
)
def test_cvpods_ifr_checkpoints_convert_name_for_name(config, cascade, container, tmp_path):
    """A detectron2 model-zoo ``.pkl`` (numpy arrays) and a cvpods ``.pth`` of IFR's R-50
    models: every tensor lands under the name our module has, the duplicates and buffers
    are dropped and recorded."""
    import pickle

    entries = _detectron2_ifr_model(cascade, weight_sharing="weight_sharing" in config)
    generator = torch.Generator().manual_seed(0)
    source = {d2: torch.randn(shape, generator=generator) for d2, _, shape in entries}
    path = tmp_path / f"model_final.{container}"
    if container == "pkl":
        arrays = {k: v.numpy() for k, v in source.items()}
        with path.open("wb") as f:
            pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, f)
    else:
        torch.save({"model": source, "iteration": 90000}, path)
    out = tmp_path / "ifr.safetensors"
    argv = ["convert", str(path), "--format", "detectron2", "--config", config]
    assert main([*argv, "--out", str(out)]) == 0
    converted = load_file(out)
    kept = [(d2, ours) for d2, ours, _ in entries if ours is not None]
    assert sorted(converted) == sorted(ours for _, ours in kept)
    assert all(torch.equal(converted[ours], source[d2]) for d2, ours in kept)
    facts = json.loads(out.with_suffix(".json").read_text())["state"]["converted_from"]
    assert sorted(facts["dropped_keys"]) == sorted(d2 for d2, ours, _ in entries if ours is None)
    assert facts["format"] == "detectron2"


def test_a_detectron2_pickle_with_other_objects_is_refused(tmp_path, capsys):
    import pickle

    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pkl"
    with path.open("wb") as f:
        pickle.dump({"model": {"w": _RunsCode(marker)}}, f)
    argv = ["convert", str(path), "--format", "detectron2", "--config", "mask_rcnn_r18_fpn_small"]
    assert main([*argv, "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "system" in err and not marker.exists()
