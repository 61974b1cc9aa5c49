"""Training throughput of one process against two (``torchrun``), on this machine's CPUs.

Trains the small Mask R-CNN config (``mask_rcnn_r18_fpn_small``, its own image sizes) on a
synthetic shapes dataset with the same global batch three ways, one after the other:

- 1 process, 1 thread;
- 1 process, ``--threads`` threads (default 2: all the cores of a 2-core machine);
- 2 processes under ``torchrun`` (gloo), ``--threads / 2`` threads each: the same cores
  split between two data-parallel processes.

and prints images per second of training (global batch over the mean time of an
iteration, the first ``--skip`` iterations left out) with the ratios. The losses of the
first iteration are printed too: the runs compute the same batches (BatchNorm in eval mode,
as the equality test has it), so they agree to float summation order.
Run it alone: a second job on these cores distorts the times.

    python benchmarks/distributed_training.py [--iters 40] [--batch 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from instseg.data import ShapesConfig, generate_shapes


def run(
    launch: list[str], work: Path, ann: Path, args: argparse.Namespace, threads: int
) -> list[dict]:
    """Train into ``work`` with ``launch`` and ``threads`` per process; the log records."""
    cmd = [*launch, "-m", "instseg", "train", "mask_rcnn_r18_fpn_small", "--work-dir", str(work)]
    cmd += ["--train-ann", str(ann), "--train-images", str(ann.parent)]
    cmd += ["--max-iters", str(args.iters), "--set", f"train.batch_size={args.batch}"]
    cmd += ["train.log_every=1", "model.backbone.norm_eval=true"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=40, help="iterations per run")
    parser.add_argument("--skip", type=int, default=5, help="first iterations not timed")
    parser.add_argument("--batch", type=int, default=4, help="global batch (images)")
    parser.add_argument("--images", type=int, default=32, help="images in the dataset")
    parser.add_argument("--threads", type=int, default=2, help="threads in all")
    args = parser.parse_args()
    if args.iters <= args.skip:
        parser.error("--iters must exceed --skip")

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    runs = {
        "1 process x 1 thread": ([sys.executable], 1),
        f"1 process x {args.threads} threads": ([sys.executable], args.threads),
        f"2 processes x {max(args.threads // 2, 1)} thread(s)": (
            [*torchrun, "--nproc-per-node", "2"],
            max(args.threads // 2, 1),
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ann = generate_shapes(root / "data", ShapesConfig(num_images=args.images, seed=3))
        results = {}
        for i, (name, (launch, threads)) in enumerate(runs.items()):
            log = run(launch, root / f"run{i}", ann, args, threads)
            seconds = statistics.mean(r["seconds_per_iter"] for r in log[args.skip :])
            results[name] = (args.batch / seconds, log[0])
    base = next(iter(results.values()))[0]
    print(f"mask_rcnn_r18_fpn_small, global batch {args.batch}, {args.iters} iterations")
    print(f"{'run':30s} {'images/s':>9s} {'ratio':>6s}  first-iteration loss")
    for name, (speed, first) in results.items():
        print(f"{name:30s} {speed:9.2f} {speed / base:6.2f}  {first['total']:.6f}")


if __name__ == "__main__":
    main()
