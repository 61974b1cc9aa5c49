"""The ``instseg`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from . import ops_demo

    summary = ops_demo.run(Path(args.work_dir), seed=args.seed)
    refine = summary["prroi_box_refinement"]
    print("instseg operator demo (the detector demo arrives with the Mask R-CNN issue)")
    print(
        f"  PrRoIPool box refinement: IoU {refine['iou_before']:.3f} -> {refine['iou_after']:.3f}"
        f" (feature loss {refine['loss_first']:.2e} -> {refine['loss_last']:.2e})"
    )
    print(f"  roi_align {summary['roi_align_shape']}, roi_pool {summary['roi_pool_shape']}")
    nms = summary["nms"]
    print(f"  batched_nms kept {nms['kept']} of {nms['candidates']} jittered boxes")
    print(f"  pasted masks vs ground truth, IoU: {summary['pasted_mask_iou']}")
    print(
        f"  wrote {Path(args.work_dir) / 'summary.json'} and {Path(args.work_dir) / 'overlay.png'}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instseg", description="Pure-PyTorch instance segmentation."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run the end-to-end demo",
        description="Run the operator demo on a synthetic scene and write its outputs.",
    )
    demo.add_argument(
        "--work-dir",
        default="work_dirs/demo",
        help="folder for summary.json and overlay.png (default: %(default)s)",
    )
    demo.add_argument("--seed", type=int, default=0, help="scene seed (default: %(default)s)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
