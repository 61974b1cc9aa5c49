"""Deterministic synthetic "shapes" instance-segmentation data, written as a COCO dataset.

What: images of squares/rectangles, circles/ellipses and triangles in random colours on a
textured background (a colour gradient, low-frequency waves and pixel noise), with one COCO
annotation per visible object. It is the built-in data of the demo: colour says nothing about
the class, so a small Mask R-CNN has to learn shape and occlusion, yet trains on CPU in minutes.

How, and why:

- Every shape is a polygon (an ellipse is a 32-gon) rasterised by pycocotools' own polygon
  rasteriser, so a polygon annotation decodes to exactly the pixels that were painted.
- Objects are painted in order and later ones occlude earlier ones; an annotation's mask is the
  visible part. An object whose visible part is below ``min_visible_fraction`` of its full area
  or below ``min_visible_pixels`` is removed from the image altogether (not only from the
  annotations) and visibility is recomputed, so nothing unannotated is ever painted.
- Segmentation format: an unoccluded object is written as its polygon, an occluded one as
  compressed RLE of its visible pixels (``counts`` a str). Both decode exactly to the visible
  mask, and a loader gets exercised on both paths. ``bbox`` is the tight box ``[x, y, w, h]`` of
  the visible mask and ``area`` its pixel count (for polygons too, not the geometric area).
- Category ids are non-contiguous (1, 3, 7) on purpose, to exercise label mapping.
- About ``empty_fraction`` of the images have no object (a valid image entry, no annotation).
- Determinism: image ``i`` draws only from its own ``Generator(PCG64(SeedSequence(seed,
  spawn_key=(i,))))`` (no global RNG), so one config gives byte-identical PNGs and json, and the
  first ``k`` images do not depend on ``num_images``.
- Layout: ``<out_dir>/<split>.json`` and ``<out_dir>/images/<split>_<index:05d>.png``; an image's
  ``file_name`` is relative to the json's directory (``images/<split>_<index:05d>.png``).
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..fileio import atomic_write_bytes, atomic_write_text

__all__ = ["CATEGORIES", "ShapesConfig", "generate_shapes", "make_demo_splits"]

# (id, name); the ids are non-contiguous on purpose.
CATEGORIES: tuple[tuple[int, str], ...] = ((1, "square"), (3, "circle"), (7, "triangle"))

_ELLIPSE_VERTICES = 32
_NOISE_SIGMA = 6.0  # per-pixel Gaussian noise over the whole image
_WAVE_AMPLITUDE = 12.0  # per-channel amplitude of each background wave
_SHADING = 12.0  # half-range of the linear shading across an object
_MIN_BACKGROUND_DISTANCE = 80.0  # RGB distance of an object colour from the background ramp
_MIN_OBJECT_DISTANCE = 60.0  # RGB distance between object colours of one image
_COLOUR_CANDIDATES = 64
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _check_int(name: str, value: Any, low: int | None = None) -> int:
    """``value`` as an int (bools refused), at least ``low``; errors name the field."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"ShapesConfig.{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"ShapesConfig.{name} must be >= {low}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, low: float, high: float, high_open: bool) -> float:
    """``value`` as a float in ``[low, high]`` (or ``[low, high)``); errors name the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"ShapesConfig.{name} must be a number, got {value!r}")
    value = float(value)
    if not (low <= value < high if high_open else low <= value <= high):
        bracket = ")" if high_open else "]"
        raise ValueError(f"ShapesConfig.{name} must be in [{low}, {high}{bracket}, got {value!r}")
    return value


@dataclass
class ShapesConfig:
    """What to generate.

    ``image_size`` is the nominal ``(height, width)``; each image's height and width are scaled
    independently by a factor in ``[1 - size_jitter, 1 + size_jitter]``, so sizes and aspect
    ratios vary. ``min_size``/``max_size`` bound an object's longest extent in pixels and must fit
    into the smallest possible image. An image has ``min_objects..max_objects`` objects before
    occlusion culling, or none with probability ``empty_fraction``.
    """

    num_images: int = 200
    image_size: tuple[int, int] = (192, 256)
    size_jitter: float = 0.25
    min_objects: int = 1
    max_objects: int = 6
    min_size: int = 16
    max_size: int = 96
    empty_fraction: float = 0.03
    min_visible_fraction: float = 0.4
    min_visible_pixels: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        self.num_images = _check_int("num_images", self.num_images, 1)
        size = self.image_size
        if not isinstance(size, (tuple, list)) or len(size) != 2:
            raise TypeError(f"ShapesConfig.image_size must be (height, width), got {size!r}")
        self.image_size = (
            _check_int("image_size", size[0], 16),
            _check_int("image_size", size[1], 16),
        )
        self.size_jitter = _check_float("size_jitter", self.size_jitter, 0.0, 0.9, False)
        self.min_objects = _check_int("min_objects", self.min_objects, 0)
        self.max_objects = _check_int("max_objects", self.max_objects, self.min_objects)
        self.min_size = _check_int("min_size", self.min_size, 4)
        self.max_size = _check_int("max_size", self.max_size, self.min_size)
        if self.max_size > self.smallest_side:
            raise ValueError(
                f"ShapesConfig.max_size must fit into the smallest possible image side "
                f"({self.smallest_side} px for image_size={self.image_size} and "
                f"size_jitter={self.size_jitter}), got {self.max_size}"
            )
        self.empty_fraction = _check_float("empty_fraction", self.empty_fraction, 0.0, 1.0, False)
        self.min_visible_fraction = _check_float(
            "min_visible_fraction", self.min_visible_fraction, 0.0, 1.0, False
        )
        self.min_visible_pixels = _check_int("min_visible_pixels", self.min_visible_pixels, 1)
        self.seed = _check_int("seed", self.seed, 0)

    @property
    def smallest_side(self) -> int:
        """The shortest image side the size jitter can produce."""
        return math.floor(min(self.image_size) * (1.0 - self.size_jitter))


@dataclass
class _Shape:
    """One sampled object: its category id, polygon (flat x, y list in pixels) and colour."""

    category_id: int
    polygon: list[float]
    colour: np.ndarray  # (3,) float RGB
    shading: np.ndarray  # (3,) = (dx, dy, amplitude): linear brightness ramp over the object


def _image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``: independent of every other image and of the count."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(index,))))


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth colour ramp plus two low-frequency waves, ``(h, w, 3)`` float32.

    Also returns the ramp's two end colours ``(2, 3)``, which object colours must avoid. Each
    channel is its offset plus a weighted sum of three scalar fields (ramp, wave, wave); a wave
    is built from row and column sines (``sin(a + b) = sin a cos b + cos a sin b``), so no
    transcendental function runs per pixel.
    """
    ends = rng.uniform(40.0, 215.0, size=(2, 3))
    ys = np.arange(h, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float64)[None, :] + 0.5
    fields = np.empty((3, h, w), dtype=np.float32)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    proj = xs * math.cos(angle) + ys * math.sin(angle)
    fields[0] = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-9)
    weights = [ends[1] - ends[0]]
    scale = float(max(h, w))
    for k in (1, 2):
        cycles = rng.uniform(1.0, 4.0)
        direction = rng.uniform(0.0, 2.0 * math.pi)
        phase = rng.uniform(0.0, 2.0 * math.pi)
        weights.append(rng.uniform(-_WAVE_AMPLITUDE, _WAVE_AMPLITUDE, size=3))
        along_x = 2.0 * math.pi * cycles * math.cos(direction) / scale * xs
        along_y = 2.0 * math.pi * cycles * math.sin(direction) / scale * ys + phase
        fields[k] = np.sin(along_x) * np.cos(along_y) + np.cos(along_x) * np.sin(along_y)
    image = np.empty((h, w, 3), dtype=np.float32)
    for c in range(3):  # scalar weights per channel: far cheaper than a (h*w, 3) matmul
        image[..., c] = float(ends[0, c])
        for weight, field in zip(weights, fields, strict=True):
            image[..., c] += float(weight[c]) * field
    return image, ends


def _pick_colour(rng: np.random.Generator, ends: np.ndarray, taken: list[np.ndarray]) -> np.ndarray:
    """An RGB colour far from the background ramp and from the image's other objects.

    Draws a fixed batch of candidates and takes the first that clears both distances, else the
    one with the largest margin, so the draw count (and thus determinism) never depends on luck.
    """
    candidates = rng.uniform(0.0, 255.0, size=(_COLOUR_CANDIDATES, 3))
    span = ends[1] - ends[0]
    t = np.clip((candidates - ends[0]) @ span / max(float(span @ span), 1e-9), 0.0, 1.0)
    ramp_distance = np.linalg.norm(candidates - (ends[0] + t[:, None] * span), axis=1)
    margin = ramp_distance / _MIN_BACKGROUND_DISTANCE
    if taken:
        others = np.linalg.norm(candidates[:, None, :] - np.stack(taken)[None], axis=2).min(1)
        margin = np.minimum(margin, others / _MIN_OBJECT_DISTANCE)
    good = np.flatnonzero(margin >= 1.0)
    return candidates[good[0] if good.size else int(np.argmax(margin))]


def _outline(rng: np.random.Generator, category_id: int, size: float) -> np.ndarray:
    """Vertices ``(K, 2)`` of one shape around the origin whose extent is at most ``size``."""
    if category_id == 1:  # axis-aligned square or rectangle
        long, short = size, size * rng.uniform(0.55, 1.0)
        width, height = (long, short) if rng.random() < 0.5 else (short, long)
        return np.array([[0.0, 0.0], [width, 0.0], [width, height], [0.0, height]])
    if category_id == 3:  # circle or rotated ellipse
        a, b = size / 2.0, size / 2.0 * rng.uniform(0.6, 1.0)
        rotation = rng.uniform(0.0, math.pi)
        theta = np.linspace(0.0, 2.0 * math.pi, _ELLIPSE_VERTICES, endpoint=False)
        x, y = a * np.cos(theta), b * np.sin(theta)
        c, s = math.cos(rotation), math.sin(rotation)
        return np.stack([c * x - s * y, s * x + c * y], axis=1)
    # Triangle in any orientation: jittered vertices on a circle of diameter ``size``.
    angles = rng.uniform(0.0, 2.0 * math.pi) + np.array([0.0, 2.0, 4.0]) * math.pi / 3.0
    angles = angles + rng.uniform(-0.35, 0.35, size=3)
    radii = size / 2.0 * rng.uniform(0.8, 1.0, size=3)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _sample_shape(
    rng: np.random.Generator,
    cfg: ShapesConfig,
    h: int,
    w: int,
    ends: np.ndarray,
    taken: list[np.ndarray],
) -> _Shape:
    """A random shape placed wholly inside the ``h x w`` image, with colour and shading."""
    category_id = CATEGORIES[int(rng.integers(len(CATEGORIES)))][0]
    size = rng.uniform(cfg.min_size, cfg.max_size)
    points = _outline(rng, category_id, size)
    low, high = points.min(0), points.max(0)
    offset = np.array(
        [rng.uniform(-low[0], w - high[0]), rng.uniform(-low[1], h - high[1])], dtype=np.float64
    )
    points = np.clip(np.round(points + offset, 2), 0.0, [w, h])
    colour = _pick_colour(rng, ends, taken)
    direction = rng.uniform(0.0, 2.0 * math.pi)
    amplitude = rng.uniform(-_SHADING, _SHADING)
    shading = np.array([math.cos(direction), math.sin(direction), amplitude])
    polygon = [round(float(v), 2) for v in points.reshape(-1)]
    return _Shape(category_id, polygon, colour, shading)


def _rasterise(polygon: list[float], h: int, w: int) -> np.ndarray:
    """Boolean ``(h, w)`` mask of a polygon, exactly as pycocotools decodes the annotation."""
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], h, w))
    return mask_utils.decode(rle).astype(bool)


def _resolve_occlusion(
    masks: list[np.ndarray], cfg: ShapesConfig
) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Which objects survive, and who owns each pixel.

    Paints the surviving objects in order into an owner map (-1 = background) and removes the
    worst object whose visible part is too small, until every survivor is visible enough;
    removing an object only uncovers others, so this ends after at most ``len(masks)`` rounds.
    Returns the survivors, the owner map and the visible and full pixel counts per object.
    """
    n = len(masks)
    full = np.array([m.sum() for m in masks], dtype=np.int64)
    alive = list(range(n))
    shape = masks[0].shape if masks else (0, 0)
    while True:
        owner = np.full(shape, -1, dtype=np.int16)
        for k in alive:
            owner[masks[k]] = k
        visible = np.bincount(owner.reshape(-1) + 1, minlength=n + 1)[1:]
        bad = [
            k
            for k in alive
            if visible[k] < cfg.min_visible_pixels
            or visible[k] < cfg.min_visible_fraction * full[k]
        ]
        if not bad:
            return alive, owner, visible, full
        alive.remove(min(bad, key=lambda k: (visible[k] / max(int(full[k]), 1), k)))


def _tight_box(mask: np.ndarray) -> list[float]:
    """``[x, y, w, h]`` of the smallest pixel box containing a non-empty mask."""
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    x0, y0 = int(cols[0]), int(rows[0])
    return [float(x0), float(y0), float(cols[-1] + 1 - x0), float(rows[-1] + 1 - y0)]


def _render(
    cfg: ShapesConfig, index: int
) -> tuple[np.ndarray, list[tuple[_Shape, np.ndarray, bool]]]:
    """Image ``index``: the ``(h, w, 3)`` uint8 pixels and, per surviving object in paint
    order, ``(shape, visible mask, occluded)``."""
    rng = _image_rng(cfg.seed, index)
    low, high = 1.0 - cfg.size_jitter, 1.0 + cfg.size_jitter
    h = max(round(cfg.image_size[0] * rng.uniform(low, high)), cfg.smallest_side)
    w = max(round(cfg.image_size[1] * rng.uniform(low, high)), cfg.smallest_side)
    image, ends = _background(rng, h, w)
    empty = rng.random() < cfg.empty_fraction
    count = 0 if empty else int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    shapes: list[_Shape] = []
    for _ in range(count):
        shapes.append(_sample_shape(rng, cfg, h, w, ends, [s.colour for s in shapes]))
    masks = [_rasterise(s.polygon, h, w) for s in shapes]
    alive, owner, visible, full = _resolve_occlusion(masks, cfg)

    objects = []
    for k in alive:
        shape, mask = shapes[k], owner == k
        ys, xs = np.nonzero(mask)
        dx, dy, amplitude = shape.shading
        along = (xs - xs.mean()) * dx + (ys - ys.mean()) * dy
        ramp = along / max(float(np.abs(along).max()), 1.0) * amplitude
        image[ys, xs] = shape.colour + ramp[:, None]
        objects.append((shape, mask, bool(visible[k] < full[k])))
    image += rng.standard_normal(size=image.shape, dtype=np.float32) * _NOISE_SIGMA
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects


def _segmentation(shape: _Shape, mask: np.ndarray, occluded: bool) -> Any:
    """The polygon of an unoccluded object, else compressed RLE of its visible pixels."""
    if not occluded:
        return [shape.polygon]
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def generate_shapes(out_dir: Path, cfg: ShapesConfig, split_name: str = "train") -> Path:
    """Write one split: PNGs under ``out_dir/images`` and ``out_dir/<split_name>.json``.

    Image ids run from 1 in order, annotation ids from 1 over the split. Files are written
    atomically and the json last, so an existing json always points at complete images.
    Returns the json path.
    """
    if not isinstance(split_name, str) or not _SPLIT_NAME.fullmatch(split_name):
        raise ValueError(f"split_name must match [A-Za-z0-9_-]+, got {split_name!r}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(cfg.num_images):
        pixels, objects = _render(cfg, index)
        file_name = f"images/{split_name}_{index:05d}.png"
        atomic_write_bytes(out_dir / file_name, _png_bytes(pixels))
        image_id = index + 1
        h, w = pixels.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for shape, mask, occluded in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": shape.category_id,
                    "segmentation": _segmentation(shape, mask, occluded),
                    "area": float(mask.sum()),
                    "bbox": _tight_box(mask),
                    "iscrowd": 0,
                }
            )

    dataset = {
        "info": {
            "description": "instseg synthetic shapes",
            "version": "1",
            "split": split_name,
            "config": asdict(cfg),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": "shape"} for i, n in CATEGORIES],
    }
    text = json.dumps(dataset, separators=(",", ":"))
    json_path = out_dir / f"{split_name}.json"
    atomic_write_text(json_path, text)
    return json_path


def make_demo_splits(
    out_dir: Path,
    seed: int = 0,
    num_train: int = 300,
    num_val: int = 100,
    cfg: ShapesConfig | None = None,
) -> tuple[Path, Path]:
    """Write the demo's ``train.json`` (seed ``seed``) and held-out ``val.json`` (seed
    ``seed + 1``) under ``out_dir``; other settings come from ``cfg`` (default
    ``ShapesConfig()``). The different seeds give every val image its own random stream, so
    the splits share no image. Returns ``(train_json, val_json)``.
    """
    base = cfg if cfg is not None else ShapesConfig()
    train = generate_shapes(out_dir, replace(base, num_images=num_train, seed=seed), "train")
    val = generate_shapes(out_dir, replace(base, num_images=num_val, seed=seed + 1), "val")
    return train, val
