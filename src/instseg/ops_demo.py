"""A small end-to-end tour of the operators, the main command until the detector lands.

It draws a synthetic scene, then:
1. refines a deliberately misplaced box by gradient descent on its four coordinates through
   ``prroi_pool2d`` (the IoU-Net use of Precise RoI Pooling: the pooled features are
   differentiable in the box), matching the pooled features of a template box;
2. pools the same boxes with ``roi_align`` and ``roi_pool``;
3. suppresses jittered duplicate detections with ``batched_nms``;
4. pastes 28x28 masks of the kept boxes into the image and writes an overlay PNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .fileio import atomic_write_json
from .ops import batched_nms, box_iou, paste_masks_in_image, prroi_pool2d, roi_align, roi_pool

IMAGE_SIZE = 192
STRIDE = 2


@dataclass
class Scene:
    image: torch.Tensor  # (3, H, W) in [0, 1]
    boxes: torch.Tensor  # (N, 4) xyxy of the objects
    labels: torch.Tensor  # (N,)
    masks: torch.Tensor  # (N, H, W) bool


def make_scene(seed: int = 0) -> Scene:
    """A rectangle and an ellipse on a smooth background, deterministic by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(
        torch.arange(IMAGE_SIZE, dtype=torch.float32),
        torch.arange(IMAGE_SIZE, dtype=torch.float32),
        indexing="ij",
    )
    image = 0.15 + 0.1 * torch.rand(3, 1, 1, generator=g) * (xx + yy) / (2 * IMAGE_SIZE)
    image = image.expand(3, IMAGE_SIZE, IMAGE_SIZE).clone()
    rect = (xx >= 30) & (xx < 100) & (yy >= 40) & (yy < 90)
    ellipse = ((xx - 130) / 40) ** 2 + ((yy - 130) / 28) ** 2 <= 1
    image[:, rect] = torch.tensor([0.9, 0.3, 0.2])[:, None]
    image[:, ellipse] = torch.tensor([0.2, 0.5, 0.9])[:, None]
    boxes = torch.tensor([[30.0, 40.0, 100.0, 90.0], [90.0, 102.0, 170.0, 158.0]])
    return Scene(image, boxes, torch.tensor([0, 1]), torch.stack([rect, ellipse]))


def feature_map(image: torch.Tensor) -> torch.Tensor:
    """A stride-2 map of colour and edge channels: a stand-in for a backbone feature."""
    x = image[None]
    gray = x.mean(1, keepdim=True)
    gx = F.conv2d(gray, torch.tensor([[[[-1.0, 0.0, 1.0]]]]), padding=(0, 1)).abs()
    gy = F.conv2d(gray, torch.tensor([[[[-1.0], [0.0], [1.0]]]]), padding=(1, 0)).abs()
    feats = torch.cat([x, 4 * gx, 4 * gy], 1)
    feats = F.avg_pool2d(feats, 9, stride=1, padding=4, count_include_pad=False)
    return F.avg_pool2d(feats, STRIDE)


def refine_box(
    features: torch.Tensor, template: torch.Tensor, start: torch.Tensor, steps: int = 150
) -> tuple[torch.Tensor, list[float]]:
    """Move ``start`` so that its PrRoI-pooled features match those of ``template``."""
    scale = 1.0 / STRIDE
    target = prroi_pool2d(features, torch.cat([torch.zeros(1), template])[None], 7, 7, scale)
    coords = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([coords], lr=1.0)
    history = []
    for _ in range(steps):
        rois = torch.cat([torch.zeros(1), coords])[None]
        loss = (prroi_pool2d(features, rois, 7, 7, scale) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    return coords.detach(), history


def overlay(scene: Scene, boxes: torch.Tensor, masks: torch.Tensor, path: Path) -> None:
    colours = [(255, 220, 0), (0, 255, 120), (255, 0, 255)]
    pixels = (scene.image.permute(1, 2, 0).numpy() * 255).astype(np.float32)
    for i, mask in enumerate(masks.numpy()):
        colour = np.array(colours[i % len(colours)], dtype=np.float32)
        pixels[mask] = 0.5 * pixels[mask] + 0.5 * colour
    canvas = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).resize(
        (IMAGE_SIZE * 2, IMAGE_SIZE * 2), Image.NEAREST
    )
    draw = ImageDraw.Draw(canvas)
    for i, box in enumerate(boxes.tolist()):
        draw.rectangle([2 * v for v in box], outline=colours[i % len(colours)], width=2)
    canvas.save(path)


def run(work_dir: Path, seed: int = 0) -> dict:
    """Run the tour, write ``summary.json`` and ``overlay.png`` to ``work_dir``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    scene = make_scene(seed)
    features = feature_map(scene.image)
    template = scene.boxes[0]
    start = template + torch.tensor([9.0, -7.0, 12.0, 6.0])
    refined, history = refine_box(features, template, start)
    iou_before = float(box_iou(start[None], template[None]))
    iou_after = float(box_iou(refined[None], template[None]))

    rois = torch.cat([torch.zeros(2, 1), scene.boxes], 1)
    aligned = roi_align(features, rois, 7, 1.0 / STRIDE, 2, aligned=True)
    pooled = roi_pool(features, rois, 7, 1.0 / STRIDE)

    g = torch.Generator().manual_seed(seed)
    jitter = torch.randn(20, 2, 4, generator=g) * 3
    candidates = (scene.boxes[None] + jitter).reshape(-1, 4)
    scores = torch.rand(candidates.shape[0], generator=g)
    labels = scene.labels.repeat(20)
    keep = batched_nms(candidates, scores, labels, 0.5)
    kept_boxes = candidates[keep]
    # Each kept box gets its object's mask resampled to 28x28 inside that box.
    object_masks = scene.masks.float()[labels[keep]][:, None]
    boxes_on_map = torch.cat([torch.arange(len(keep))[:, None].float(), kept_boxes], 1)
    mask_rois = roi_align(object_masks, boxes_on_map, 28, 1.0, 2, aligned=True)
    pasted = paste_masks_in_image(mask_rois, kept_boxes, (IMAGE_SIZE, IMAGE_SIZE))
    mask_iou = [
        float(
            (pasted[i] & scene.masks[labels[k]]).sum() / (pasted[i] | scene.masks[labels[k]]).sum()
        )
        for i, k in enumerate(keep.tolist())
    ]

    overlay(scene, torch.cat([kept_boxes, refined[None]]), pasted, work_dir / "overlay.png")
    summary = {
        "prroi_box_refinement": {
            "iou_before": round(iou_before, 4),
            "iou_after": round(iou_after, 4),
            "loss_first": history[0],
            "loss_last": history[-1],
            "refined_box": [round(v, 2) for v in refined.tolist()],
        },
        "roi_align_shape": list(aligned.shape),
        "roi_pool_shape": list(pooled.shape),
        "nms": {"candidates": candidates.shape[0], "kept": len(keep)},
        "pasted_mask_iou": [round(v, 4) for v in mask_iou],
    }
    atomic_write_json(work_dir / "summary.json", summary, indent=2)
    return summary
