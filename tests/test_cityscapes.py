"""Cityscapes: the gtFine -> COCO converter against mmdetection's, and the official evaluation.

The tiny tree (tests/fixtures/cityscapes/tree.py) has individuals, crowd groups, caravan and
trailer pixels (ignored class), instances in two separate parts, a one-pixel-wide part, a
one-pixel instance, a hole and a label without instances. References:

- mmdetection 3.3's own converter: its json for this tree is recorded in
  tests/fixtures/cityscapes (make_fixture.py) and, where /work/mmdetvenv exists, run live;
- the instance-id PNG pixels themselves, read by loops in this file;
- cityscapesScripts' official evaluation, which must give AP 100 to the ground truth.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from instseg.cli import main as cli_main
from instseg.data import CocoDataset, DataError
from instseg.data.cityscapes import (
    THING_LABEL_IDS,
    cityscapes_to_coco,
    convert_cityscapes,
    json_name,
)
from instseg.evaluation.cityscapes import (
    cityscapes_basename,
    evaluate_cityscapes,
    write_cityscapes_predictions,
)
from instseg.structures import Instances

FIXTURES = Path(__file__).parent / "fixtures" / "cityscapes"
MMDET_PYTHON = Path("/work/mmdetvenv/bin/python")
_spec = importlib.util.spec_from_file_location("cityscapes_tree", FIXTURES / "tree.py")
tree = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tree)

CLASS_NAMES = {
    24: "person",
    25: "rider",
    26: "car",
    27: "truck",
    28: "bus",
    31: "train",
    32: "motorcycle",
    33: "bicycle",
}


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    written = tree.make_tree(root)
    converted = {split: cityscapes_to_coco(root, split) for split in ("train", "val")}
    return root, written, converted


def canonical(coco: dict) -> dict:
    """mmdet numbers images in glob order (the file system's): renumber them in file-name
    order, and annotations in that image order, keeping everything else as written."""
    images = sorted(coco["images"], key=lambda im: im["file_name"])
    new_id = {im["id"]: i for i, im in enumerate(images)}
    for im in images:
        im["id"] = new_id[im["id"]]
    anns = sorted(coco.get("annotations", []), key=lambda a: (new_id[a["image_id"]], a["id"]))
    for i, ann in enumerate(anns):
        ann["image_id"], ann["id"] = new_id[ann["image_id"]], i
    out = dict(coco)
    out["images"] = images
    if "annotations" in coco:
        out["annotations"] = anns
    return out


def assert_same_json(ours: dict, mmdet: dict) -> None:
    # json text equality: same values and types, same key order.
    assert json.dumps(ours) == json.dumps(canonical(mmdet))


@pytest.mark.parametrize("split", ["train", "val"])
def test_equals_recorded_mmdet_json(cityscapes, split):
    _, _, converted = cityscapes
    recorded = json.loads((FIXTURES / f"mmdet_{json_name(split)}").read_text())
    assert_same_json(converted[split].coco, recorded)


def test_equals_live_mmdet_converter(cityscapes, tmp_path):
    if not MMDET_PYTHON.exists():
        pytest.skip("no mmdetection environment at /work/mmdetvenv")
    run = subprocess.run(
        [str(MMDET_PYTHON), str(FIXTURES / "make_fixture.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if run.returncode and "No module named" in run.stderr:
        pytest.skip(f"mmdetection environment incomplete: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr
    _, _, converted = cityscapes
    for split in ("train", "val"):
        mmdet = json.loads((tmp_path / f"mmdet_{json_name(split)}").read_text())
        assert_same_json(converted[split].coco, mmdet)


def test_round_trip_every_instance_id(cityscapes):
    """Each thing-class pixel value is one annotation whose RLE decodes to exactly its pixels;
    nothing else is annotated."""
    _, written, converted = cityscapes
    for split, images in written.items():
        coco = converted[split].coco
        assert [im["file_name"] for im in coco["images"]] == sorted(
            f"{city}/{stem}_leftImg8bit.png" for city, stem, _ in images
        )
        assert [im["id"] for im in coco["images"]] == list(range(len(images)))
        assert [a["id"] for a in coco["annotations"]] == list(range(len(coco["annotations"])))
        assert [c["id"] for c in coco["categories"]] == list(THING_LABEL_IDS)
        for city, stem, ids in images:
            image = next(
                im for im in coco["images"] if im["file_name"] == f"{city}/{stem}_leftImg8bit.png"
            )
            assert (image["height"], image["width"]) == ids.shape
            assert image["segm_file"] == f"{city}/{stem}_gtFine_labelIds.png"
            anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            expected = []
            for value in sorted(set(ids.ravel().tolist())):
                label = value // 1000 if value >= 1000 else value
                if label in CLASS_NAMES:
                    expected.append((value, label))
            assert len(anns) == len(expected)
            for ann, (value, label) in zip(anns, expected, strict=True):
                truth = ids == value
                assert ann["category_id"] == label
                assert ann["iscrowd"] == int(value < 1000)
                decoded = mask_utils.decode(ann["segmentation"]).astype(bool)
                assert np.array_equal(decoded, truth), (stem, value)
                ys, xs = np.nonzero(truth)
                assert ann["area"] == len(xs)
                x0, y0 = xs.min(), ys.min()
                assert ann["bbox"] == [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1]
                assert all(isinstance(v, float) for v in ann["bbox"])
    # Skips: caravan 29000 and trailer group 30 in train, caravan in val, road 7001.
    assert converted["train"].skipped == {
        "caravan (ignored in evaluation)": 1,
        "trailer (ignored in evaluation)": 1,
        "label without instances": 1,
    }
    assert converted["val"].skipped == {"caravan (ignored in evaluation)": 1}


def test_workers_give_the_same_json(cityscapes):
    root, _, converted = cityscapes
    assert cityscapes_to_coco(root, "train", num_workers=2).coco == converted["train"].coco


def test_cli_writes_the_jsons(cityscapes, tmp_path, capsys):
    root, _, converted = cityscapes
    out = tmp_path / "annotations"
    assert cli_main(["cityscapes-to-coco", str(root), "--out", str(out)]) == 0
    for split in ("train", "val"):
        assert json.loads((out / json_name(split)).read_text()) == converted[split].coco
    dataset = CocoDataset(out / json_name("val"), root / "leftImg8bit" / "val")
    (record,) = dataset.records
    assert [c.id for c in dataset.categories] == list(THING_LABEL_IDS)
    assert len(record.segmentations) == 6 and len(record.crowd_boxes) == 1
    image, _ = dataset[0]
    assert image.shape == (tree.H, tree.W, 3)
    printed = capsys.readouterr().out
    assert "train: 2 images, 13 annotations (1 crowd)" in printed
    assert "val: 1 images, 7 annotations (1 crowd)" in printed
    assert cli_main(["cityscapes-to-coco", str(root), "--out", str(out), "--splits", "test"]) == 2
    assert "image folder not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _small_tree(root: Path, ids: np.ndarray | None = None) -> tuple[Path, Path]:
    image = root / "leftImg8bit" / "val" / "ulm" / "ulm_000000_000019_leftImg8bit.png"
    gt = root / "gtFine" / "val" / "ulm" / "ulm_000000_000019_gtFine_instanceIds.png"
    image.parent.mkdir(parents=True)
    gt.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    if ids is None:
        ids = np.full((8, 8), 26000, np.uint16)
    Image.fromarray(ids).save(gt)
    return image, gt


def test_errors_name_the_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        cityscapes_to_coco(tmp_path, "val")

    image, gt = _small_tree(tmp_path / "a")
    assert cityscapes_to_coco(tmp_path / "a", "val").num_annotations == 1

    gt.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"has no instanceIds PNG {gt}")):
        cityscapes_to_coco(tmp_path / "a", "val")

    gt.write_bytes(b"not a png")
    with pytest.raises(DataError, match=re.escape(f"unreadable instanceIds PNG {gt}")):
        cityscapes_to_coco(tmp_path / "a", "val")

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(gt)
    with pytest.raises(DataError, match=r"single-channel.*'RGB'"):
        cityscapes_to_coco(tmp_path / "a", "val")

    Image.fromarray(np.full((8, 8), 34001, np.uint16)).save(gt)
    with pytest.raises(DataError, match=r"\[34001\] are not Cityscapes instance ids"):
        cityscapes_to_coco(tmp_path / "a", "val")
    Image.fromarray(np.full((8, 8), 500, np.uint16)).save(gt)
    with pytest.raises(DataError, match=re.escape(str(gt))):
        cityscapes_to_coco(tmp_path / "a", "val")

    (image.parent / "notes.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"notes\.png: not a Cityscapes image name"):
        cityscapes_to_coco(tmp_path / "a", "val")

    _small_tree(tmp_path / "b")
    shutil_rmtree(tmp_path / "b" / "gtFine" / "val")
    with pytest.raises(FileNotFoundError, match="gtFine folder not found"):
        cityscapes_to_coco(tmp_path / "b", "val")

    (tmp_path / "c" / "leftImg8bit" / "val" / "ulm").mkdir(parents=True)
    (tmp_path / "c" / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no \*_leftImg8bit\.png images"):
        cityscapes_to_coco(tmp_path / "c", "val")


def test_a_failing_split_writes_nothing(tmp_path):
    _small_tree(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError):
        convert_cityscapes(tmp_path, out, ["val", "train"])
    assert not out.exists() or not any(out.iterdir())


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------
# Official evaluation
# ---------------------------------------------------------------------------------------------


def ground_truth_instances(coco: dict, image: dict, drop: set[int] = frozenset()) -> Instances:
    """The image's non-crowd annotations as predictions of score 1."""
    label_of = {cid: i for i, cid in enumerate(THING_LABEL_IDS)}
    anns = [
        a
        for a in coco["annotations"]
        if a["image_id"] == image["id"] and not a["iscrowd"] and a["id"] not in drop
    ]
    masks = np.zeros((len(anns), image["height"], image["width"]), bool)
    for i, ann in enumerate(anns):
        masks[i] = mask_utils.decode(ann["segmentation"]).astype(bool)
    return Instances(
        boxes=torch.zeros(len(anns), 4),
        scores=torch.ones(len(anns)),
        labels=torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64),
        masks=torch.from_numpy(masks),
    )


def test_export_layout(tmp_path):
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[2, 4:, :] = True  # masks[1] is empty: left out
    instances = Instances(
        torch.zeros(3, 4), torch.tensor([0.9, 0.8, 0.25]), torch.tensor([2, 0, 7]), masks
    )
    basename = cityscapes_basename("lindau/lindau_000001_000019_leftImg8bit.png")
    assert basename == "lindau_000001_000019"
    txt = write_cityscapes_predictions(tmp_path, basename, instances)
    assert txt == tmp_path / "lindau_000001_000019_pred.txt"
    lines = txt.read_text().splitlines()
    assert lines == [
        "lindau_000001_000019_0_car.png 26 0.8999999761581421",
        "lindau_000001_000019_2_bicycle.png 33 0.25",
    ]
    for line, mask in zip(lines, (masks[0], masks[2]), strict=True):
        with Image.open(tmp_path / line.split()[0]) as im:
            assert im.size == (8, 6)
            assert np.array_equal(np.array(im.convert("L")) != 0, mask.numpy())
    empty = write_cityscapes_predictions(tmp_path, "ulm_000000_000019", instances[:0])
    assert empty.read_text() == ""

    with pytest.raises(ValueError, match="not a Cityscapes image name"):
        cityscapes_basename("frankfurt/foo.png")
    with pytest.raises(ValueError, match=r"labels \[7\] have no Cityscapes label id"):
        write_cityscapes_predictions(tmp_path, basename, instances, label_ids=(24, 25, 26))
    with pytest.raises(ValueError, match="needs masks"):
        no_masks = Instances(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
        write_cityscapes_predictions(tmp_path, basename, no_masks)


@pytest.fixture(scope="module")
def official():
    return pytest.importorskip(
        "cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling",
        reason="cityscapesscripts is not installed (pip install instseg[cityscapes])",
    )


def export(coco: dict, out: Path, drop: set[int] = frozenset()) -> None:
    for image in coco["images"]:
        basename = cityscapes_basename(image["file_name"])
        write_cityscapes_predictions(out, basename, ground_truth_instances(coco, image, drop))


def test_official_evaluation_of_the_ground_truth(cityscapes, official, tmp_path):
    root, _, converted = cityscapes
    coco = converted["val"].coco
    gt_dir = root / "gtFine" / "val"
    before = sorted(p.name for p in gt_dir.rglob("*"))

    export(coco, tmp_path / "exact")
    metrics = evaluate_cityscapes(tmp_path / "exact", gt_dir)
    assert metrics["AP"] == pytest.approx(100.0)
    assert metrics["AP50"] == pytest.approx(100.0)
    for name in ("person", "rider", "car"):
        assert metrics[f"AP_{name}"] == pytest.approx(100.0)
    # bicycle's only instance has 30 px (< 100): no counted ground truth, like the other four.
    for name in ("bicycle", "truck", "bus", "train", "motorcycle"):
        assert metrics[f"AP_{name}"] == -1.0

    # One of the two counted cars missed: car AP 50 (precision 1 up to recall 0.5).
    car = next(a["id"] for a in coco["annotations"] if a["category_id"] == 26 and a["area"] == 144)
    export(coco, tmp_path / "one_car_missed", drop={car})
    metrics = evaluate_cityscapes(tmp_path / "one_car_missed", gt_dir)
    assert metrics["AP_car"] == pytest.approx(50.0)
    assert metrics["AP"] == pytest.approx(250.0 / 3)
    assert metrics["AP50"] == pytest.approx(250.0 / 3)

    assert sorted(p.name for p in gt_dir.rglob("*")) == before  # nothing written there


def perturbed(coco: dict) -> Instances:
    """The ground truth with a shifted person (IoU 2/3), a lower rider score and a false car
    as confident as the true ones."""
    image = coco["images"][0]
    instances = ground_truth_instances(coco, image)
    labels = instances.labels.tolist()
    masks, scores = instances.masks.clone(), instances.scores.clone()
    person = labels.index(0)
    masks[person] = torch.roll(masks[person], 2, dims=1)
    scores[labels.index(1)] = 0.7
    false_car = torch.zeros_like(masks[:1])
    false_car[0, 0:5, 30:60] = True  # sky
    return Instances(
        torch.zeros(len(labels) + 1, 4),
        torch.cat([scores, torch.tensor([1.0])]),
        torch.tensor([*labels, 2]),
        torch.cat([masks, false_car]),
    )


def test_official_evaluation_equals_the_unmodified_script(cityscapes, official, tmp_path):
    """evaluate_cityscapes (in1d supplied where numpy 2.4 lacks it, evaluateImgLists' steps
    without its matches.json) against the script's own evaluateImgLists, run unmodified with
    numpy 1.26 (/work/cityscapesvenv, see fixtures/cityscapes/official_eval.py)."""
    side_python = Path("/work/cityscapesvenv/bin/python")
    if not side_python.exists():
        pytest.skip("no numpy 1.x environment with cityscapesscripts at /work/cityscapesvenv")
    root, _, converted = cityscapes
    coco = converted["val"].coco
    gt_dir = root / "gtFine" / "val"
    basename = cityscapes_basename(coco["images"][0]["file_name"])
    write_cityscapes_predictions(tmp_path / "perturbed", basename, perturbed(coco))
    export(coco, tmp_path / "exact")
    results = {}
    for folder in ("perturbed", "exact"):
        ours = results[folder] = evaluate_cityscapes(tmp_path / folder, gt_dir)
        run = subprocess.run(
            [str(side_python), str(FIXTURES / "official_eval.py"), str(tmp_path / folder), gt_dir],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        official_averages = json.loads(run.stdout)

        def percent(value):
            return -1.0 if value is None else 100.0 * value

        assert ours["AP"] == pytest.approx(percent(official_averages["allAp"]), abs=1e-12)
        assert ours["AP50"] == pytest.approx(percent(official_averages["allAp50%"]), abs=1e-12)
        for name, value in official_averages["classes"].items():
            assert ours[f"AP_{name}"] == pytest.approx(percent(value["ap"]), abs=1e-12)
    assert results["exact"]["AP"] == pytest.approx(100.0)
    assert 50 < results["perturbed"]["AP"] < results["perturbed"]["AP50"] < 100


def test_official_evaluation_errors(cityscapes, official, tmp_path):
    root, _, _ = cityscapes
    (tmp_path / "preds").mkdir()
    with pytest.raises(ValueError, match="Found no prediction for ground truth"):
        evaluate_cityscapes(tmp_path / "preds", root / "gtFine" / "val")
    with pytest.raises(FileNotFoundError, match="prediction folder not found"):
        evaluate_cityscapes(tmp_path / "missing", root / "gtFine" / "val")
    with pytest.raises(FileNotFoundError, match=r"no <city>/\*_gtFine_instanceIds\.png"):
        evaluate_cityscapes(tmp_path / "preds", tmp_path / "preds")


def test_missing_cityscapesscripts_is_a_clear_error(cityscapes, tmp_path, monkeypatch):
    root, _, _ = cityscapes
    monkeypatch.setitem(sys.modules, "cityscapesscripts", None)
    monkeypatch.setitem(sys.modules, "cityscapesscripts.evaluation", None)
    (tmp_path / "preds").mkdir()
    with pytest.raises(ImportError, match=r"pip install instseg\[cityscapes\]"):
        evaluate_cityscapes(tmp_path / "preds", root / "gtFine" / "val")
