"""``instseg demo``: train the small Mask R-CNN on synthetic shapes, on a CPU, end to end.

Generates the shapes dataset (a train split and a held-out val split), trains
``mask_rcnn_r18_fpn_small`` (short side 256), evaluates COCO box, mask and
Boundary AP on the val split, and writes overlays of predictions and a loss-curve PNG. Re-running
with the same work dir resumes (or reuses) the training run instead of starting over.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from .configs import ExperimentConfig, apply_overrides, get_config
from .data import make_demo_splits
from .engine import latest_checkpoint
from .runner import run_predict, run_train

# Shapes images are about 192x256; short side 256 keeps the smallest objects learnable.
# 640 iterations of 4 images take about 5 minutes on our 2-core CPU (see the README).
DEMO_OVERRIDES = [
    "data.train_scales=((416, 256),)",
    "data.test_scale=(416, 256)",
    "train.max_iters=640",
    "train.checkpoint_every=160",
    "train.schedule.steps=(520, 600)",
    "train.log_every=25",
]


DEMO_CONFIG = "mask_rcnn_r18_fpn_small"


def demo_config(overrides: list[str] | None = None, config: str = DEMO_CONFIG) -> ExperimentConfig:
    """The demo's recipe on zoo config ``config`` (the small Mask R-CNN by default; any small
    config works, e.g. ``condinst_r18_fpn_small``)."""
    cfg = get_config(config)
    cfg.name = "demo_shapes" if config == DEMO_CONFIG else f"demo_shapes_{config}"
    return apply_overrides(cfg, DEMO_OVERRIDES + list(overrides or []))


def plot_losses(log_path: Path, out_path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """A simple line chart of the total and per-term training losses from ``log.jsonl``."""
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    width, height = size
    margin = 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((margin, margin // 2, width - 10, height - margin), outline="black")
    if len(records) >= 2:
        keys = ["total", *sorted(k for k in records[0] if k.startswith("loss_"))]
        top = max(max(r[k] for r in records) for k in keys) or 1.0
        last = records[-1]["iteration"]
        colours = ["black", "red", "blue", "green", "orange", "purple", "brown"]
        for i, key in enumerate(keys):
            points = [
                (
                    margin + (width - 10 - margin) * r["iteration"] / last,
                    height - margin - (height - 1.5 * margin) * r[key] / top,
                )
                for r in records
            ]
            colour = colours[i % len(colours)]
            draw.line(points, fill=colour, width=2)
            draw.text((margin + 8, margin // 2 + 4 + 12 * i), key, fill=colour)
        draw.text((margin, height - margin + 6), "0", fill="black")
        draw.text((width - 60, height - margin + 6), f"iter {last}", fill="black")
        draw.text((4, margin // 2), f"{top:.2f}", fill="black")
    image.save(out_path)


def run_demo(
    work_dir: str | Path,
    seed: int = 0,
    overrides: list[str] | None = None,
    num_train: int = 300,
    num_val: int = 60,
    config: str = DEMO_CONFIG,
) -> dict:
    """Run the demo; returns the val metrics. Outputs go under ``work_dir``."""
    work_dir = Path(work_dir)
    data_dir = work_dir / "data"
    train_json, val_json = make_demo_splits(data_dir, seed, num_train, num_val)
    cfg = demo_config(overrides, config)
    cfg.data.train_ann, cfg.data.train_images = str(train_json), str(data_dir)
    cfg.data.val_ann, cfg.data.val_images = str(val_json), str(data_dir)
    train_dir = work_dir / "train"
    resume = latest_checkpoint(train_dir) is not None
    metrics = run_train(cfg, train_dir, resume=resume)
    if not metrics:
        return {}
    plot_losses(train_dir / "log.jsonl", work_dir / "loss_curve.png")
    val_images = sorted((data_dir / "images").glob("val_*.png"))[:8]
    run_predict(train_dir / "model_final.safetensors", val_images, work_dir / "overlays", 0.5, cfg)
    return metrics
