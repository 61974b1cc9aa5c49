"""The small Mask R-CNN on real data: DSB2018 nuclei (48 images), a CPU budget of ~15 minutes.

Splits ``shared/data/dsb2018-nuclei-48`` by image id, 36 train / 12 val (val: the ids that
are multiples of 4, which takes a quarter of every size group, since the file lists the
images grouped by size), trains ``mask_rcnn_r18_fpn_small`` (or ``--config``, e.g.
``mask_rcnn_r18_fpn_groie_small`` for the GRoIE comparison, ``refinemask_r18_fpn_small`` for
the RefineMask one, ``condinst_r18_fpn_small`` for CondInst) with the nuclei settings below,
evaluates bbox, segm and Boundary AP on the val split with maxDets raised (the val images
hold up to 98 nuclei each) and prints the table, the training wall time and the command.

    python benchmarks/nuclei.py [--config NAME] [--data DIR] [--work-dir DIR] [--max-iters N]
        [--max-dets N] [--set key=value ...]

Re-running with the same work dir resumes an interrupted run or, when finished, re-evaluates.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from instseg.configs import apply_overrides, get_config
from instseg.engine import latest_checkpoint
from instseg.fileio import atomic_write_json
from instseg.runner import run_eval, run_train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "dsb2018-nuclei-48"

# Nuclei are small (median sqrt(area) 21 px; 8 to 46 px for 90% of them) on 256 to 1024 px
# images. Short side 384 enlarges the many 256-px images by 1.5 and keeps the 520x696 ones
# near their size; for the two-stage detectors, anchors of base size 16 on P2 (scale 4
# instead of 8) match the nuclei and 1,000 proposals leave room for crowded images (the
# one-stage ones, FCOS/CondInst, have no anchors: their P3 regress range, up to 64 px, already
# holds the nuclei). Vertical images do not occur, so one scale (long side 640) covers all.
TWO_STAGE_OVERRIDES = ["model.rpn.anchor_scales=(4.0,)", "model.rpn.test_max_per_image=1000"]
NUCLEI_OVERRIDES = [
    "data.train_scales=((640, 352), (640, 384), (640, 416))",
    "data.test_scale=(640, 384)",
    "train.max_iters=360",
    "train.checkpoint_every=100",
    "train.log_every=20",
    "train.schedule.steps=(270, 335)",
]


def split_by_image_id(ann_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write ``train.json`` (ids not divisible by 4) and ``val.json`` (ids divisible by 4)."""
    data = json.loads(ann_path.read_text())
    paths = []
    for name, is_val in (("train", False), ("val", True)):
        ids = {im["id"] for im in data["images"] if (im["id"] % 4 == 0) == is_val}
        part = dict(data)
        part["images"] = [im for im in data["images"] if im["id"] in ids]
        part["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
        path = out_dir / f"{name}.json"
        atomic_write_json(path, part)
        paths.append(path)
        print(f"{name}: {len(ids)} images, {len(part['annotations'])} nuclei")
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mask_rcnn_r18_fpn_small")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--work-dir", type=Path, help="default: work_dirs/nuclei (work_dirs/nuclei_<config>)"
    )
    parser.add_argument("--max-iters", type=int, default=None)
    parser.add_argument("--max-dets", type=int, default=300)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.work_dir is None:
        suffix = "" if args.config == "mask_rcnn_r18_fpn_small" else f"_{args.config}"
        args.work_dir = REPO / "work_dirs" / f"nuclei{suffix}"
    ann = args.data / "instances.json"
    if not ann.is_file():
        print(f"error: {ann} not found (pass --data)", file=sys.stderr)
        return 2
    args.work_dir.mkdir(parents=True, exist_ok=True)
    train_json, val_json = split_by_image_id(ann, args.work_dir)

    two_stage = get_config(args.config).model.kind == "two_stage"
    overrides = [
        *NUCLEI_OVERRIDES,
        *(TWO_STAGE_OVERRIDES if two_stage else []),
        f"eval.max_dets={args.max_dets}",
        *args.set,
    ]
    if args.max_iters is not None:
        overrides.append(f"train.max_iters={args.max_iters}")
    cfg = apply_overrides(get_config(args.config), overrides)
    cfg.name = f"nuclei_{args.config}"
    cfg.data.train_ann, cfg.data.train_images = str(train_json), str(args.data / "images")
    cfg.data.val_ann, cfg.data.val_images = str(val_json), str(args.data / "images")

    train_dir = args.work_dir / "train"
    final = train_dir / "model_final.safetensors"
    start = time.perf_counter()
    if final.is_file():
        print(f"{final} exists: evaluating it again")
        metrics = run_eval(final, val_json, args.data / "images", cfg, args.max_dets)
    else:
        metrics = run_train(cfg, train_dir, resume=latest_checkpoint(train_dir) is not None)
        if not metrics:
            return 1
    seconds = time.perf_counter() - start
    log = [json.loads(x) for x in (train_dir / "log.jsonl").read_text().splitlines() if x]
    ends = [r["iteration"] for r in log]
    windows = zip(log, [0, *ends[:-1]], ends, strict=True)
    train_seconds = sum(r["seconds_per_iter"] * (end - start) for r, start, end in windows)
    summary = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "config": args.config,
        "max_iters": cfg.train.max_iters,
        "max_dets": args.max_dets,
        "seconds": round(seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "metrics": metrics,
    }
    atomic_write_json(args.work_dir / "summary.json", summary)
    scores = ", ".join(
        f"{kind} AP {metrics[kind]['AP']:.1f}"
        for kind in ("bbox", "segm", "boundary")
        if kind in metrics  # box-only models have no segm / boundary
    )
    print(
        f"nuclei val (12 images, maxDets {args.max_dets}): {scores}; "
        f"{cfg.train.max_iters} iterations in "
        f"{train_seconds / 60:.1f} min of training ({seconds / 60:.1f} min in all)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
