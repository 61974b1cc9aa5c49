"""Overlays of predictions on images: coloured masks, boxes, class names and scores."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from .structures import Instances


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated bright colours (golden-ratio hues), stable for a given index."""
    colours = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def draw_instances(
    image: np.ndarray,
    instances: Instances,
    class_names: list[str],
    score_thr: float = 0.0,
    alpha: float = 0.45,
) -> Image.Image:
    """Draw the detections scoring at least ``score_thr`` on an ``(H, W, 3)`` uint8 image.

    Colours follow the class; each box is labelled ``name score``.
    """
    keep = (instances.scores >= score_thr).nonzero().flatten()
    shown = instances[keep]
    colours = palette(max(len(class_names), 1))
    canvas = image.astype(np.float32).copy()
    if shown.masks is not None and len(shown):
        for mask, label in zip(shown.masks.numpy(), shown.labels.tolist(), strict=True):
            colour = np.asarray(colours[label % len(colours)], np.float32)
            canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for box, label, score in zip(
        shown.boxes.tolist(), shown.labels.tolist(), shown.scores.tolist(), strict=True
    ):
        colour = colours[label % len(colours)]
        draw.rectangle(box, outline=colour, width=2)
        name = class_names[label] if label < len(class_names) else str(label)
        text = f"{name} {score:.2f}"
        x, y = box[0], max(box[1] - 11, 0)
        left, top, right, bottom = draw.textbbox((x, y), text)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
        draw.text((x, y), text, fill=(0, 0, 0))
    return out
