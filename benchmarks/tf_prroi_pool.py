"""Precise RoI Pooling in TensorFlow (``instseg.tf``) beside our PyTorch operator, CPU.

The case of ``benchmarks/ops.py``: 512 RoIs (log-uniform sizes 16-512 px) on the stride-4
256-channel 200x272 map of a batch of 2 (an 800x1088 image), 7x7 and 14x14 bins, float32.
Both see the same numbers; forward, and forward+backward with gradients for the map and the
RoI coordinates, median of ``--repeat`` calls after a warm-up, in eager mode and inside
``tf.function`` for TensorFlow. Prints milliseconds, TensorFlow/PyTorch time ratios (above 1:
TensorFlow is slower) and the max abs difference of the outputs, and writes JSON (``--out``).
Run it alone: a second job on the cores distorts every figure.

    python benchmarks/tf_prroi_pool.py [--repeat 5] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
import torch

from _timing import median_seconds  # sibling module of this script
from instseg.ops import prroi_pool2d as torch_prroi_pool2d
from instseg.tf import prroi_pool2d as tf_prroi_pool2d

IMAGE_H, IMAGE_W, STRIDE = 800, 1088, 4
N_ROIS, CHANNELS, BATCH = 512, 256, 2


def random_rois(n: int, batch: int, seed: int = 0) -> np.ndarray:
    """``(n, 5)`` RoIs with log-uniform sizes between 16 and 512 px, centres in the image."""
    rng = np.random.default_rng(seed)
    size = np.exp(rng.uniform(np.log(16), np.log(512), (n, 2)))
    centre = rng.uniform(0, 1, (n, 2)) * [IMAGE_W, IMAGE_H]
    image = rng.integers(0, batch, (n, 1))
    return np.concatenate([image, centre - size / 2, centre + size / 2], 1).astype(np.float32)


def cases(bins: int, features: np.ndarray, rois: np.ndarray):
    """(name, forward fn, forward+backward fn, output fn) for PyTorch and TensorFlow."""
    scale = 1 / STRIDE
    f_t = torch.from_numpy(features).requires_grad_()
    r_t = torch.from_numpy(rois).requires_grad_()

    def torch_fwd():
        with torch.no_grad():
            return torch_prroi_pool2d(f_t, r_t, bins, bins, scale)

    def torch_bwd():
        f_t.grad = r_t.grad = None
        torch_prroi_pool2d(f_t, r_t, bins, bins, scale).sum().backward()

    f_x, r_x = tf.constant(features), tf.constant(rois)

    def tf_fwd():
        return tf_prroi_pool2d(f_x, r_x, bins, bins, scale)

    def tf_bwd():
        with tf.GradientTape() as tape:
            tape.watch([f_x, r_x])
            loss = tf.reduce_sum(tf_prroi_pool2d(f_x, r_x, bins, bins, scale))
        return tape.gradient(loss, [f_x, r_x])

    tf_fwd_graph, tf_bwd_graph = tf.function(tf_fwd), tf.function(tf_bwd)
    return {
        "PyTorch": (torch_fwd, torch_bwd, lambda: torch_fwd().numpy()),
        "TensorFlow eager": (
            lambda: tf_fwd().numpy(),
            lambda: [g.numpy() for g in tf_bwd()],
            lambda: tf_fwd().numpy(),
        ),
        "TensorFlow tf.function": (
            lambda: tf_fwd_graph().numpy(),
            lambda: [g.numpy() for g in tf_bwd_graph()],
            lambda: tf_fwd_graph().numpy(),
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per case (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    cpu = torch.device("cpu")

    rng = np.random.default_rng(0)
    height, width = IMAGE_H // STRIDE, IMAGE_W // STRIDE
    features = rng.standard_normal((BATCH, CHANNELS, height, width)).astype(np.float32)
    rois = random_rois(N_ROIS, BATCH)
    print(
        f"torch {torch.__version__}, tensorflow {tf.__version__}, "
        f"{platform.processor() or platform.machine()}, {args.threads} threads; "
        f"{N_ROIS} RoIs, {CHANNELS}x{height}x{width} map, batch {BATCH}, float32"
    )
    print(f"{'case':<14} {'pass':<8} {'binding':<24} {'ms':>9} {'TF/PyTorch':>10} max|diff|")
    rows = []
    for bins in (7, 14):
        runs = cases(bins, features, rois)
        reference = runs["PyTorch"][2]()
        for pass_index, pass_ in enumerate(("fwd", "fwd+bwd")):
            torch_ms = None
            for binding, fns in runs.items():
                ms = median_seconds(fns[pass_index], cpu, args.repeat) * 1e3
                torch_ms = ms if binding == "PyTorch" else torch_ms
                ratio = None if binding == "PyTorch" else ms / torch_ms
                diff = None
                if fns[2] is not None and binding != "PyTorch" and pass_ == "fwd":
                    diff = float(np.abs(fns[2]() - reference).max())
                row = {
                    "case": f"{bins}x{bins} P2",
                    "pass": pass_,
                    "binding": binding,
                    "ms": ms,
                    "tf_over_torch": ratio,
                    "max_abs_diff": diff,
                }
                rows.append(row)
                print(
                    f"{row['case']:<14} {pass_:<8} {binding:<24} {ms:9.1f} "
                    + (f"{ratio:10.2f}" if ratio is not None else f"{'':>10}")
                    + (f" {diff:10.1e}" if diff is not None else "")
                )
    if args.out:
        meta = {
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "tensorflow": tf.__version__,
            "threads": args.threads,
            "repeat": args.repeat,
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
