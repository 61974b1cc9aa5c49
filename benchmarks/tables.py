"""The README's benchmark tables, rendered from the JSON the benchmark scripts write.

    python benchmarks/ops.py --device cpu --json ops.json
    python benchmarks/detector_speed.py --batch 1 --iters 3 --json detector.json
    python benchmarks/tables.py --ops ops.json --detector detector.json

Prints Markdown: one table per JSON given, with ours/torchvision ratios where the run had
torchvision beside it.
"""

from __future__ import annotations

import argparse
import json
import sys


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ops_table(rows: list[dict]) -> str:
    """Operator rows of ``benchmarks/ops.py --json``: time ratio below 1 is ours faster."""
    lines = [
        "| device | case | pass | ours ms | torchvision ms | ours / theirs (time) | check |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        diff = r["max_abs_diff"]
        if diff is None:
            check = "-"
        elif r["case"].startswith(("nms", "batched_nms", "RPN nms")):
            check = "same kept boxes" if diff == 0 else "**different kept boxes**"
        else:
            check = f"max abs diff {diff:.1e}"
        lines.append(
            f"| {r['device']} | {r['case']} | {r['pass_']} | {_ms(r['ours_ms'])} | "
            f"{_ms(r['ref_ms'])} | {ratio} | {check} |"
        )
    return "\n".join(lines)


def detector_table(report: dict) -> str:
    """Rows of ``benchmarks/detector_speed.py --json``: ratio above 1 is ours faster."""
    rows = report["rows"]
    lines = [
        f"`{report['config']}`, batch {report['batch']}:",
        "",
        "| | train it/s | inference img/s | inference img/s, 100 dets | detections per image |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["impl"] == "ratio":
            lines.append(
                f"| **ours / torchvision (speed)** | **{r['train_it_per_s']:.2f}** | "
                f"**{r['infer_img_per_s']:.2f}** | **{r['infer_dets_img_per_s']:.2f}** | |"
            )
        else:
            lines.append(
                f"| {r['impl']} | {r['train_it_per_s']:.3f} | {r['infer_img_per_s']:.3f} | "
                f"{r['infer_dets_img_per_s']:.3f} | {r['dets_per_image']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", help="JSON written by benchmarks/ops.py --json")
    parser.add_argument("--detector", help="JSON written by benchmarks/detector_speed.py --json")
    args = parser.parse_args(argv)
    if not (args.ops or args.detector):
        parser.error("give --ops and/or --detector")
    if args.ops:
        with open(args.ops) as f:
            print(ops_table(json.load(f)))
    if args.detector:
        if args.ops:
            print()
        with open(args.detector) as f:
            print(detector_table(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
