"""Cityscapes fine annotations to a COCO instances json, as mmdetection converts them.

The official layout is ``ROOT/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png``
with ``ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png`` beside it. In an
instanceIds PNG a pixel holds ``labelId * 1000 + k`` for the k-th individual object of a class
with instances, and the plain ``labelId`` (< 1000) for a group region ("cargroup") or a class
without instances.

:func:`cityscapes_to_coco` writes what mmdetection 3.3's
``tools/dataset_converters/cityscapes.py`` writes (the ``instancesonly_filtered_gtFine_<split>
.json`` behind mmdet's and RefineMask's COCO-style Cityscapes numbers):

- categories: the 8 classes with instances that are evaluated (caravan and trailer are not),
  with their Cityscapes label ids as category ids (24, 25, 26, 27, 28, 31, 32, 33) and
  Cityscapes names, in id order;
- one annotation per distinct pixel value >= 24 of such a class, in increasing value order:
  ``iscrowd = value < 1000`` (group regions are crowd), ``segmentation`` the whole-image
  compressed RLE of the pixels with that value (pycocotools, ``counts`` as str), ``area`` and
  ``bbox`` (xywh floats, tight around the pixels) as pycocotools computes them from that RLE;
- per image ``file_name = "<city>/<name>_leftImg8bit.png"`` (relative to
  ``leftImg8bit/<split>``), height and width of the instanceIds PNG, ``segm_file`` (the
  ``gtFine_labelIds.png`` name beside it, not read), ids 0, 1, 2, ... for images and for
  annotations (counted over the whole split), keys in mmdet's order.

Two differences, both deliberate: images are taken in sorted path order (mmdet takes
``glob``'s order, which is the file system's and not defined), so ids equal mmdet's when its
glob returns sorted paths; and a split without annotations keeps ``"annotations": []`` where
mmdet drops the key (our loader and pycocotools read both alike otherwise).

Pixel values whose label is caravan or trailer (instances, but ignored in evaluation), or a
known label without instances, are skipped and counted; a value whose label id is not a
Cityscapes label (above 33) is an error naming the file, as are a missing gtFine folder, an
image without its instanceIds PNG and an unreadable PNG.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from instseg.data.coco import DataError

logger = logging.getLogger("instseg.data")

# The classes that have instances and are evaluated (``hasInstances and not ignoreInEval`` in
# cityscapesscripts' labels table), by Cityscapes label id, in id order.
THING_LABEL_IDS: tuple[int, ...] = (24, 25, 26, 27, 28, 31, 32, 33)
THING_NAMES: tuple[str, ...] = (
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
# Classes with instances that the benchmark ignores: their pixels are skipped.
IGNORED_INSTANCE_LABELS: dict[int, str] = {29: "caravan", 30: "trailer"}
# Label ids 0..33 are Cityscapes labels; values below 24 are stuff or void.
MAX_LABEL_ID = 33
FIRST_INSTANCE_LABEL_ID = 24

IMAGE_SUFFIX = "_leftImg8bit.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def json_name(split: str) -> str:
    """The file name mmdet gives the converted json of ``split``."""
    return f"instancesonly_filtered_gtFine_{split}.json"


def coco_categories() -> list[dict[str, Any]]:
    """The json's categories: Cityscapes label id and name of each evaluated thing class."""
    return [{"id": i, "name": n} for i, n in zip(THING_LABEL_IDS, THING_NAMES, strict=True)]


@dataclass
class CityscapesSplit:
    """One converted split: the COCO dict, the folder its ``file_name``s are relative to, and
    the pixel values skipped, counted by reason."""

    split: str
    coco: dict[str, Any]
    image_dir: Path
    skipped: Counter

    @property
    def num_images(self) -> int:
        return len(self.coco["images"])

    @property
    def num_annotations(self) -> int:
        return len(self.coco["annotations"])

    @property
    def num_crowd(self) -> int:
        return sum(a["iscrowd"] for a in self.coco["annotations"])


def read_instance_ids(path: Path) -> np.ndarray:
    """An instanceIds PNG as a 2-D integer array; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"instanceIds PNG not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            ids = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"corrupt or unreadable instanceIds PNG {path}: {exc}") from exc
    if not (mode in ("L", "I") or mode.startswith("I;16")) or ids.ndim != 2:
        raise DataError(
            f"{path}: an instanceIds PNG must be single-channel 8/16/32-bit integers, "
            f"got PIL mode {mode!r}"
        )
    return ids


def instance_annotations(ids: np.ndarray, source: str) -> tuple[list[dict[str, Any]], Counter]:
    """The annotations of one instanceIds array (without ``image_id``/``id``) and the values
    skipped by reason. ``source`` names the file in errors."""
    values = np.unique(ids[ids >= FIRST_INSTANCE_LABEL_ID])
    labels = np.where(values >= 1000, values // 1000, values)
    unknown = values[labels > MAX_LABEL_ID]
    if unknown.size:
        raise DataError(
            f"{source}: pixel values {unknown[:10].tolist()} are not Cityscapes instance ids "
            f"(labelId*1000+k or labelId, with labelId <= {MAX_LABEL_ID})"
        )
    category_of = dict(zip(THING_LABEL_IDS, range(len(THING_LABEL_IDS)), strict=True))
    skipped: Counter = Counter()
    annotations: list[dict[str, Any]] = []
    for value, label in zip(values.tolist(), labels.tolist(), strict=True):
        if label not in category_of:
            name = IGNORED_INSTANCE_LABELS.get(label)
            skipped[f"{name} (ignored in evaluation)" if name else "label without instances"] += 1
            continue
        mask = np.asfortranarray(ids == value, dtype=np.uint8)
        rle = mask_utils.encode(mask)
        annotations.append(
            {
                "iscrowd": int(value < 1000),
                "category_id": label,
                "bbox": mask_utils.toBbox(rle).tolist(),
                "area": int(mask_utils.area(rle)),
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            }
        )
    return annotations, skipped


def _image_entry(task: tuple[Path, Path, str]) -> tuple[dict[str, Any], list[dict], Counter]:
    """Read one image's instanceIds PNG: its ``images`` entry, annotations and skips."""
    instance_file, _, file_name = task
    ids = read_instance_ids(instance_file)
    annotations, skipped = instance_annotations(ids, str(instance_file))
    city, name = file_name.split("/")
    image = {
        "file_name": file_name,
        "height": int(ids.shape[0]),
        "width": int(ids.shape[1]),
        "segm_file": f"{city}/{name[: -len(IMAGE_SUFFIX)]}{LABEL_SUFFIX}",
    }
    return image, annotations, skipped


def list_split(root: str | Path, split: str) -> list[tuple[Path, Path, str]]:
    """``(instanceIds PNG, image, file_name)`` of every image of ``split``, sorted by path.

    Like mmdet's ``glob('<split>/**/*.png')`` (non-recursive): the PNGs one folder (a city)
    below ``leftImg8bit/<split>``, hidden names left out; each must be a ``*_leftImg8bit.png``.
    """
    root = Path(root)
    image_root = root / "leftImg8bit" / split
    gt_root = root / "gtFine" / split
    if not image_root.is_dir():
        raise FileNotFoundError(f"Cityscapes image folder not found: {image_root}")
    if not gt_root.is_dir():
        raise FileNotFoundError(f"Cityscapes gtFine folder not found: {gt_root}")
    tasks = []
    for image in sorted(image_root.glob("*/*.png")):
        if image.name.startswith(".") or image.parent.name.startswith("."):
            continue
        if not image.name.endswith(IMAGE_SUFFIX):
            raise DataError(f"{image}: not a Cityscapes image name (*{IMAGE_SUFFIX})")
        city = image.parent.name
        stem = image.name[: -len(IMAGE_SUFFIX)]
        instance_file = gt_root / city / f"{stem}{INSTANCE_SUFFIX}"
        if not instance_file.is_file():
            raise FileNotFoundError(f"image {image} has no instanceIds PNG {instance_file}")
        tasks.append((instance_file, image, f"{city}/{image.name}"))
    if not tasks:
        raise DataError(f"no *{IMAGE_SUFFIX} images in the city folders of {image_root}")
    return tasks


def cityscapes_to_coco(root: str | Path, split: str, num_workers: int = 0) -> CityscapesSplit:
    """Convert one split of a Cityscapes tree (see the module docstring); ``num_workers > 0``
    reads the PNGs in that many processes (same result)."""
    tasks = list_split(root, split)
    if num_workers > 0:
        with ProcessPoolExecutor(num_workers) as pool:
            entries = list(pool.map(_image_entry, tasks, chunksize=4))
    else:
        entries = [_image_entry(t) for t in tasks]

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    for image_id, (image, image_annotations, image_skipped) in enumerate(entries):
        image["id"] = image_id
        images.append(image)
        for ann in image_annotations:
            ann["image_id"] = image_id
            ann["id"] = len(annotations)
            annotations.append(ann)
        skipped.update(image_skipped)
    if skipped:
        details = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        logger.info("Cityscapes %s: skipped %s instance id(s)", split, details)
    coco = {"images": images, "categories": coco_categories(), "annotations": annotations}
    return CityscapesSplit(split, coco, Path(root) / "leftImg8bit" / split, skipped)


def convert_cityscapes(
    root: str | Path,
    out_dir: str | Path,
    splits: Sequence[str] = ("train", "val"),
    num_workers: int = 0,
) -> list[tuple[CityscapesSplit, Path]]:
    """Convert ``splits`` and write ``out_dir/instancesonly_filtered_gtFine_<split>.json``.

    Every split is converted before anything is written, and each json is written atomically,
    so an error leaves the folder as it was.
    """
    from instseg.fileio import atomic_write_json

    converted = [cityscapes_to_coco(root, split, num_workers) for split in dict.fromkeys(splits)]
    written = []
    for result in converted:
        path = Path(out_dir) / json_name(result.split)
        atomic_write_json(path, result.coco)
        written.append((result, path))
    return written


__all__ = [
    "THING_LABEL_IDS",
    "THING_NAMES",
    "CityscapesSplit",
    "cityscapes_to_coco",
    "coco_categories",
    "convert_cityscapes",
    "instance_annotations",
    "json_name",
    "list_split",
    "read_instance_ids",
]
