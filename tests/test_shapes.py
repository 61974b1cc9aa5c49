"""Tests for the synthetic shapes dataset (``instseg.data.shapes``).

The written files are read back only through pycocotools and PIL, the way a user would: the
annotations must load as COCO, decode to sane masks and agree with the pixels of the PNGs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from instseg.data.shapes import CATEGORIES, ShapesConfig, generate_shapes, make_demo_splits


def load(json_path: Path) -> COCO:
    """A pycocotools COCO object for ``json_path``, without its progress prints."""
    coco = COCO()
    coco.dataset = json.loads(json_path.read_text())
    coco.createIndex()
    return coco


def pixels(json_path: Path, image: dict) -> np.ndarray:
    """The ``(h, w, 3)`` uint8 pixels of a COCO image entry (file_name is relative to the json)."""
    return np.asarray(Image.open(json_path.parent / image["file_name"]).convert("RGB"))


def tight_box(mask: np.ndarray) -> list[float]:
    """``[x, y, w, h]`` of the smallest pixel box around ``mask``."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, COCO]:
    """120 images with the default settings: enough for every path (empty images included)."""
    out = tmp_path_factory.mktemp("shapes")
    json_path = generate_shapes(out, ShapesConfig(num_images=120, seed=0), "train")
    return json_path, load(json_path)


def test_layout_and_coco_entries(dataset: tuple[Path, COCO]) -> None:
    json_path, coco = dataset
    assert json_path.name == "train.json"
    assert sorted(coco.getImgIds()) == list(range(1, 121))
    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(ann_ids) == len(set(ann_ids)) > 120
    sizes = set()
    for image in coco.dataset["images"]:
        assert image["file_name"] == f"images/train_{image['id'] - 1:05d}.png"
        assert pixels(json_path, image).shape == (image["height"], image["width"], 3)
        sizes.add((image["height"], image["width"]))
    assert len(sizes) > 60  # size jitter: heights and widths vary independently
    assert len({round(w / h, 2) for h, w in sizes}) > 30
    # Temporary files of the atomic writes are all gone.
    assert not [p for p in json_path.parent.rglob("*") if p.name.endswith(".tmp")]


def test_categories_are_non_contiguous(dataset: tuple[Path, COCO]) -> None:
    _, coco = dataset
    assert [(c["id"], c["name"]) for c in coco.dataset["categories"]] == list(CATEGORIES)
    assert sorted(coco.getCatIds()) == [1, 3, 7]
    used = {a["category_id"] for a in coco.dataset["annotations"]}
    assert used == {1, 3, 7}


def test_masks_boxes_and_areas_agree(dataset: tuple[Path, COCO]) -> None:
    _, coco = dataset
    cfg = ShapesConfig()
    kinds = set()
    for ann in coco.dataset["annotations"]:
        image = coco.imgs[ann["image_id"]]
        mask = coco.annToMask(ann).astype(bool)
        assert mask.shape == (image["height"], image["width"])
        assert mask.any()
        assert ann["iscrowd"] == 0
        assert ann["bbox"] == tight_box(mask)
        assert ann["area"] == mask.sum() >= cfg.min_visible_pixels
        # The longest side of a visible part never exceeds the largest object.
        assert max(ann["bbox"][2:]) <= cfg.max_size + 1
        segmentation = ann["segmentation"]
        if isinstance(segmentation, dict):
            assert isinstance(segmentation["counts"], str)
            assert segmentation["size"] == [image["height"], image["width"]]
            kinds.add("rle")
        else:
            assert len(segmentation) == 1 and len(segmentation[0]) >= 6
            kinds.add("polygon")
    assert kinds == {"rle", "polygon"}


def test_visible_masks_do_not_overlap(dataset: tuple[Path, COCO]) -> None:
    _, coco = dataset
    for image_id in coco.getImgIds():
        anns = coco.imgToAnns[image_id]
        if not anns:
            continue
        count = sum(coco.annToMask(a).astype(np.int32) for a in anns)
        assert count.max() == 1


def test_image_and_annotations_agree(dataset: tuple[Path, COCO]) -> None:
    """Under each mask the PNG shows one flat-ish colour, far from the background's."""
    json_path, coco = dataset
    for image_id in coco.getImgIds():
        anns = coco.imgToAnns[image_id]
        if not anns:
            continue
        rgb = pixels(json_path, coco.imgs[image_id]).astype(np.float64)
        masks = [coco.annToMask(a).astype(bool) for a in anns]
        background = ~np.logical_or.reduce(masks)
        background_mean = rgb[background].mean(0)
        for mask in masks:
            inside = rgb[mask]
            assert np.linalg.norm(inside.mean(0) - background_mean) > 40.0
            assert inside.std(0).max() < 20.0  # one object colour (+ shading and noise)


def test_polygons_are_the_shapes(dataset: tuple[Path, COCO]) -> None:
    """Polygon annotations are whole shapes inside the image: 4 corners of an axis-aligned
    rectangle, a 32-gon ellipse or a triangle."""
    _, coco = dataset
    vertex_counts = {1: 4, 3: 32, 7: 3}
    for ann in coco.dataset["annotations"]:
        if not isinstance(ann["segmentation"], list):
            continue
        polygon = ann["segmentation"][0]
        xs, ys = polygon[0::2], polygon[1::2]
        assert len(xs) == vertex_counts[ann["category_id"]]
        image = coco.imgs[ann["image_id"]]
        assert min(xs) >= 0 and max(xs) <= image["width"]
        assert min(ys) >= 0 and max(ys) <= image["height"]
        if ann["category_id"] == 1:
            assert len(set(xs)) == 2 and len(set(ys)) == 2


def test_some_images_are_empty(dataset: tuple[Path, COCO]) -> None:
    _, coco = dataset
    empty = [i for i in coco.getImgIds() if not coco.imgToAnns[i]]
    assert 1 <= len(empty) <= 15


def test_all_empty_is_valid_coco(tmp_path: Path) -> None:
    json_path = generate_shapes(tmp_path, ShapesConfig(num_images=4, empty_fraction=1.0), "e")
    coco = load(json_path)
    assert len(coco.getImgIds()) == 4
    assert coco.dataset["annotations"] == []


def test_deterministic(tmp_path: Path) -> None:
    cfg = ShapesConfig(num_images=8, seed=5)
    generate_shapes(tmp_path / "a", cfg)
    generate_shapes(tmp_path / "b", cfg)
    a, b = file_digests(tmp_path / "a"), file_digests(tmp_path / "b")
    assert len(a) == 9 and a == b
    # Re-running into the same directory rewrites the same bytes.
    generate_shapes(tmp_path / "a", cfg)
    assert file_digests(tmp_path / "a") == a
    # The first images do not depend on how many are generated.
    generate_shapes(tmp_path / "c", ShapesConfig(num_images=3, seed=5))
    c = file_digests(tmp_path / "c")
    assert all(c[name] == a[name] for name in c if name.startswith("images/"))


def test_seed_changes_everything(tmp_path: Path) -> None:
    generate_shapes(tmp_path / "a", ShapesConfig(num_images=6, seed=1))
    generate_shapes(tmp_path / "b", ShapesConfig(num_images=6, seed=2))
    a, b = file_digests(tmp_path / "a"), file_digests(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[name] != b[name] for name in a)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_images": 0}, "num_images"),
        ({"num_images": 2.5}, "num_images"),
        ({"image_size": (192,)}, "image_size"),
        ({"image_size": (8, 256)}, "image_size"),
        ({"size_jitter": -0.1}, "size_jitter"),
        ({"size_jitter": 0.95}, "size_jitter"),
        ({"min_objects": -1}, "min_objects"),
        ({"min_objects": 4, "max_objects": 3}, "max_objects"),
        ({"min_size": 2}, "min_size"),
        ({"min_size": 40, "max_size": 30}, "max_size"),
        ({"max_size": 150}, "max_size"),  # the smallest image side is 192 * 0.75 = 144
        ({"empty_fraction": 1.5}, "empty_fraction"),
        ({"min_visible_fraction": -0.5}, "min_visible_fraction"),
        ({"min_visible_pixels": 0}, "min_visible_pixels"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
def test_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises((ValueError, TypeError), match=rf"ShapesConfig\.{field}\b"):
        ShapesConfig(**kwargs)


def test_split_name_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split_name"):
        generate_shapes(tmp_path, ShapesConfig(num_images=1), "../escape")


def test_demo_splits_are_disjoint_and_valid(tmp_path: Path) -> None:
    train_json, val_json = make_demo_splits(tmp_path, seed=3, num_train=12, num_val=6)
    assert (train_json.name, val_json.name) == ("train.json", "val.json")
    train, val = load(train_json), load(val_json)
    assert len(train.getImgIds()) == 12 and len(val.getImgIds()) == 6
    assert train.dataset["info"]["config"]["seed"] != val.dataset["info"]["config"]["seed"]

    def digests(json_path: Path, coco: COCO) -> set[str]:
        return {
            hashlib.sha256(pixels(json_path, im).tobytes()).hexdigest()
            for im in coco.dataset["images"]
        }

    train_names = {im["file_name"] for im in train.dataset["images"]}
    val_names = {im["file_name"] for im in val.dataset["images"]}
    assert not train_names & val_names
    assert not digests(train_json, train) & digests(val_json, val)
    for coco in (train, val):
        assert coco.dataset["annotations"]
        for ann in coco.dataset["annotations"]:
            assert coco.annToMask(ann).sum() == ann["area"]
