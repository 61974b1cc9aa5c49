"""COCO-format instance datasets: parse and validate the json, decode images and masks.

Every problem in the data is reported with the file, image or annotation it concerns:

- errors (the dataset cannot be trusted): a missing or malformed json, missing top-level
  keys, duplicate image or category ids, an annotation of an unknown image or category, a
  missing image file (checked up front), a corrupt image or one whose size differs from the
  json (checked when the image is read);
- counted skips (common in real data, harmless to drop): annotations whose box has zero or
  negative width/height, and annotations whose polygons are all empty or degenerate. They
  are counted by reason in ``CocoDataset.skipped`` and logged once when the json is read.

Crowd annotations (``iscrowd: 1``) are kept apart as ignore regions, never as targets.
LVIS jsons read the same way: their images name their file by ``coco_url`` (the images
folder is then the COCO root holding ``train2017/`` and ``val2017/``) and their annotations
have no ``iscrowd``; the extra LVIS keys (``neg_category_ids``, ``frequency``...) are
left to the evaluation.
Images of any mode (grayscale, palette, RGBA, 16-bit) are read as 8-bit RGB.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

logger = logging.getLogger("instseg.data")


@dataclass(frozen=True)
class Category:
    id: int
    name: str


@dataclass
class ImageRecord:
    """One image of the json and its valid annotations (boxes xyxy in original pixels)."""

    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # (N, 4) float32 xyxy
    category_ids: np.ndarray  # (N,) int64, dataset category ids
    segmentations: list[Any] = field(default_factory=list)  # polygons or RLE, one per box
    crowd_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))

    @property
    def aspect_ratio(self) -> float:
        return self.width / self.height


class DataError(ValueError):
    """A dataset file or entry that cannot be used; the message names it."""


def load_json(path: str | Path) -> dict:
    """Read a json file with errors that name the file (and the position of a syntax error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: malformed json at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 json file ({exc})") from exc


def _require(obj: dict, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: missing key {key!r}")
    return obj[key]


def _valid_polygons(segmentation: Any) -> bool:
    """True for an RLE dict, or a polygon list with at least one polygon of >= 3 points."""
    if isinstance(segmentation, dict):
        return "counts" in segmentation and "size" in segmentation
    if isinstance(segmentation, list):
        return any(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation)
    return False


def _file_name(img: dict, where: str) -> str:
    """The image's path relative to the images folder: its ``file_name``, or for LVIS (v1 and
    v0.5 images carry only a ``coco_url``) the last two parts of the url,
    ``http://images.cocodataset.org/train2017/000000155379.jpg`` -> ``train2017/000000155379.jpg``
    under the COCO root, as detectron2's ``get_file_name`` and mmdet's ``LVISV1Dataset``."""
    if "file_name" in img:
        return str(img["file_name"])
    url = img.get("coco_url")
    if url is None:
        raise DataError(f"{where}: missing key 'file_name' (or an LVIS 'coco_url')")
    parts = [p for p in str(url).split("/") if p]
    if len(parts) < 2:
        raise DataError(f"{where}: coco_url {url!r} does not end in <split folder>/<image file>")
    return f"{parts[-2]}/{parts[-1]}"


def parse_coco(
    data: dict, source: str, with_masks: bool = True
) -> tuple[list[Category], list[ImageRecord], Counter]:
    """Validate a COCO instances dict; returns categories, image records and skip counts."""
    categories_raw = _require(data, "categories", source)
    images_raw = _require(data, "images", source)
    annotations_raw = _require(data, "annotations", source)
    if not isinstance(categories_raw, list) or not categories_raw:
        raise DataError(f"{source}: 'categories' must be a non-empty list")

    categories: list[Category] = []
    for i, cat in enumerate(categories_raw):
        where = f"{source}: categories[{i}]"
        categories.append(Category(int(_require(cat, "id", where)), str(cat.get("name", ""))))
    duplicates = [c for c, n in Counter(c.id for c in categories).items() if n > 1]
    if duplicates:
        raise DataError(f"{source}: duplicate category ids {sorted(duplicates)}")
    known_categories = {c.id for c in categories}

    records: dict[int, ImageRecord] = {}
    for i, img in enumerate(images_raw):
        where = f"{source}: images[{i}]"
        image_id = int(_require(img, "id", where))
        if image_id in records:
            raise DataError(f"{source}: duplicate image id {image_id}")
        height, width = int(_require(img, "height", where)), int(_require(img, "width", where))
        if height <= 0 or width <= 0:
            raise DataError(f"{where} (id {image_id}): non-positive size {height}x{width}")
        records[image_id] = ImageRecord(
            image_id,
            _file_name(img, f"{where} (id {image_id})"),
            height,
            width,
            np.zeros((0, 4), np.float32),
            np.zeros((0,), np.int64),
        )

    skipped: Counter = Counter()
    boxes: dict[int, list] = {i: [] for i in records}
    cats: dict[int, list] = {i: [] for i in records}
    segs: dict[int, list] = {i: [] for i in records}
    crowd: dict[int, list] = {i: [] for i in records}
    for i, ann in enumerate(annotations_raw):
        ann_id = ann.get("id", f"#{i}") if isinstance(ann, dict) else f"#{i}"
        where = f"{source}: annotation {ann_id}"
        image_id = int(_require(ann, "image_id", where))
        if image_id not in records:
            raise DataError(f"{where} refers to unknown image id {image_id}")
        category_id = int(_require(ann, "category_id", where))
        if category_id not in known_categories:
            raise DataError(f"{where} refers to unknown category id {category_id}")
        bbox = _require(ann, "bbox", where)
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise DataError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if not all(np.isfinite([x, y, w, h])):
            raise DataError(f"{where}: non-finite bbox {bbox!r}")
        if w <= 0 or h <= 0:
            skipped["zero or negative box"] += 1
            continue
        box = [x, y, x + w, y + h]
        if ann.get("iscrowd", 0):
            crowd[image_id].append(box)
            continue
        segmentation = ann.get("segmentation")
        if with_masks:
            if not _valid_polygons(segmentation):
                skipped["empty or degenerate segmentation"] += 1
                continue
            segs[image_id].append(segmentation)
        boxes[image_id].append(box)
        cats[image_id].append(category_id)

    for image_id, record in records.items():
        if boxes[image_id]:
            record.boxes = np.asarray(boxes[image_id], np.float32)
            record.category_ids = np.asarray(cats[image_id], np.int64)
        record.segmentations = segs[image_id]
        if crowd[image_id]:
            record.crowd_boxes = np.asarray(crowd[image_id], np.float32)
    return categories, list(records.values()), skipped


def decode_image(
    source: Path | BinaryIO,
    name: str,
    max_pixels: int | None = None,
    formats: Collection[str] | None = None,
) -> np.ndarray:
    """Decode an image file or file object to an ``(H, W, 3)`` uint8 RGB array.

    16-bit and float images are scaled to 8 bits by their type's range; alpha is dropped.
    ``max_pixels`` and ``formats`` (Pillow format names, e.g. ``"PNG"``) are checked from the
    header, before the pixels are decoded. Errors are ``DataError``s that name ``name``.
    """
    try:
        with Image.open(source) as im:
            if formats is not None and im.format not in formats:
                raise DataError(
                    f"{name}: {im.format} images are not accepted (accepted: "
                    f"{', '.join(sorted(formats))})"
                )
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise DataError(
                    f"{name} is {im.width}x{im.height} = {im.width * im.height} pixels, more "
                    f"than the limit of {max_pixels}"
                )
            im.load()
            if im.mode.startswith("I;16") or im.mode == "I":
                # 16-bit data; a 32-bit "I" image whose values fit 8 bits is taken as 8-bit.
                gray = np.asarray(im).astype(np.float64)
                if im.mode != "I" or gray.max() > 255:
                    gray = gray / 257.0
                return _gray_to_rgb(gray)
            if im.mode == "F":
                gray = np.asarray(im).astype(np.float64)
                peak = float(gray.max())
                return _gray_to_rgb(gray * 255.0 / (peak if peak > 1.0 else 1.0))
            return np.array(im.convert("RGB"))
    except UnidentifiedImageError as exc:
        raise DataError(
            f"corrupt or unreadable image {name}: not in an image format Pillow can read"
        ) from exc
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"corrupt or unreadable image {name}: {exc}") from exc


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    eight_bit = np.clip(gray, 0, 255).round().astype(np.uint8)
    return np.repeat(eight_bit[..., None], 3, axis=2)


def read_image(path: Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array (see :func:`decode_image`)."""
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    rgb = decode_image(path, str(path))
    if expected_size is not None and rgb.shape[:2] != tuple(expected_size):
        raise DataError(
            f"image {path} is {rgb.shape[0]}x{rgb.shape[1]} but the json says "
            f"{expected_size[0]}x{expected_size[1]}"
        )
    return rgb


def decode_masks(
    segmentations: list[Any], height: int, width: int, out_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Rasterise polygons/RLE to ``(N, h, w)`` bool masks, at ``out_size`` if given.

    Polygons are scaled and rasterised at the output size directly (exact); RLE masks are
    decoded at the original size and resized with nearest neighbour in chunks, so memory stays
    bounded with hundreds of instances.
    """
    out_h, out_w = out_size if out_size is not None else (height, width)
    masks = torch.zeros((len(segmentations), out_h, out_w), dtype=torch.bool)
    if not segmentations:
        return masks
    sy, sx = out_h / height, out_w / width
    rle_rows: list[int] = []
    for i, seg in enumerate(segmentations):
        if isinstance(seg, list):
            polys = [
                (np.asarray(p, np.float64).reshape(-1, 2) * (sx, sy)).ravel().tolist()
                for p in seg
                if len(p) >= 6
            ]
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, out_h, out_w))
            masks[i] = torch.from_numpy(mask_utils.decode(rle).astype(bool))
        else:
            rle_rows.append(i)
    for start in range(0, len(rle_rows), 64):
        rows = rle_rows[start : start + 64]
        rles = []
        for i in rows:
            seg = segmentations[i]
            if isinstance(seg["counts"], list):  # uncompressed RLE
                seg = mask_utils.frPyObjects(seg, *seg["size"])
            rles.append(seg)
        decoded = torch.from_numpy(mask_utils.decode(rles))  # (H, W, n) uint8
        if decoded.shape[:2] != (height, width):
            raise DataError(
                f"RLE size {tuple(decoded.shape[:2])} differs from the image size {(height, width)}"
            )
        decoded = decoded.permute(2, 0, 1)
        if (out_h, out_w) != (height, width):
            decoded = torch.nn.functional.interpolate(
                decoded[None], size=(out_h, out_w), mode="nearest"
            )[0]
        masks[rows] = decoded.bool()
    return masks


class CocoDataset(torch.utils.data.Dataset):
    """A COCO-format instances json and its image folder.

    ``categories`` fixes the model's classes (label ``i`` is ``categories[i]``); by default
    they are the json's categories sorted by id. A json whose categories are not all among
    them is an error (``DataError``), so a checkpoint never silently mislabels another dataset.
    An item is ``(image, record)``, or with a transform
    ``transform(image, record, labels, with_masks, rng)``: ``labels`` are the record's
    contiguous class indices (:meth:`labels_of`) and ``rng`` a generator seeded by the item's
    seed, so the transform gets plain values and never calls back into the dataset (see
    :mod:`instseg.data.transforms`).
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        transform: Any = None,
        categories: list[Category] | None = None,
        with_masks: bool = True,
        skip_empty: bool = False,
        check_files: bool = True,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.with_masks = with_masks
        data = load_json(self.ann_file)
        json_categories, records, self.skipped = parse_coco(data, str(self.ann_file), with_masks)
        if sum(self.skipped.values()):
            details = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            logger.warning("%s: skipped %s annotation(s)", self.ann_file, details)
        if categories is None:
            categories = sorted(json_categories, key=lambda c: c.id)
        else:
            model_ids = {c.id for c in categories}
            unknown = sorted(c.id for c in json_categories if c.id not in model_ids)
            if unknown:
                raise DataError(
                    f"{self.ann_file}: category ids {unknown} are not among the model's "
                    f"categories {sorted(model_ids)}"
                )
        self.categories = list(categories)
        self.annotated_category_ids = {c.id for c in json_categories}
        self.label_of = {c.id: i for i, c in enumerate(self.categories)}
        self.empty_images = sum(1 for r in records if len(r.boxes) == 0)
        self.records = [r for r in records if len(r.boxes) > 0] if skip_empty else records
        if not self.records:
            raise DataError(f"{self.ann_file}: no images to use")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        if check_files:
            missing = [r.file_name for r in self.records if not self.path_of(r).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} image file(s) listed in {self.ann_file} are missing from "
                    f"{self.image_dir}, e.g. {missing[:3]}"
                )

    def path_of(self, record: ImageRecord) -> Path:
        return self.image_dir / record.file_name

    def __len__(self) -> int:
        return len(self.records)

    def labels_of(self, record: ImageRecord) -> np.ndarray:
        """The record's category ids as the model's contiguous class indices."""
        return np.asarray([self.label_of[c] for c in record.category_ids.tolist()], np.int64)

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = item if isinstance(item, tuple) else (item, 0)
        record = self.records[index]
        image = read_image(self.path_of(record), (record.height, record.width))
        if self.transform is None:
            return image, record
        rng = torch.Generator().manual_seed(seed)
        return self.transform(image, record, self.labels_of(record), self.with_masks, rng)
