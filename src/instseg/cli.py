"""The ``instseg`` command line: train, eval, predict, configs, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .configs import ZOO, ConfigError, ExperimentConfig, apply_overrides, from_dict, get_config
from .data import DataError
from .engine import CheckpointError


def load_config(name_or_path: str, overrides: list[str]) -> ExperimentConfig:
    """A zoo name or a JSON config file (as written to ``work_dir/config.json``), then the
    ``--set`` overrides."""
    path = Path(name_or_path)
    if name_or_path in ZOO:
        cfg = get_config(name_or_path)
    elif path.suffix == ".json" and path.is_file():
        try:
            cfg = from_dict(ExperimentConfig, json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: malformed json at line {exc.lineno}: {exc.msg}") from exc
    else:
        raise ConfigError(
            f"unknown config {name_or_path!r}: not a zoo name (see `instseg configs`) "
            "nor a .json config file"
        )
    return apply_overrides(cfg, overrides)


def _train(args: argparse.Namespace) -> int:
    from .runner import run_train

    overrides = list(args.set)
    for flag, key in (
        ("train_ann", "data.train_ann"),
        ("train_images", "data.train_images"),
        ("val_ann", "data.val_ann"),
        ("val_images", "data.val_images"),
        ("max_iters", "train.max_iters"),
        ("checkpoint_every", "train.checkpoint_every"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    work_dir = args.work_dir or str(Path("work_dirs") / cfg.name)
    run_train(cfg, work_dir, resume=args.resume, device=args.device)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .runner import run_eval

    cfg = load_config(args.config, args.set)
    run_eval(
        args.checkpoint,
        args.ann,
        args.images,
        cfg,
        args.max_dets,
        args.out,
        args.results,
        args.device,
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .runner import run_predict

    cfg = load_config(args.config, args.set)
    path = run_predict(args.checkpoint, args.inputs, args.out, args.score_thr, cfg, args.device)
    print(f"wrote {path} and overlays to {args.out}")
    return 0


def _configs(args: argparse.Namespace) -> int:
    width = max(len(name) for name in ZOO)
    for name in sorted(ZOO):
        print(f"{name:{width}s}  {get_config(name).description}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    work_dir = Path(args.work_dir)
    if args.ops:
        return _ops_demo(work_dir, args.seed)
    from .demo import run_demo

    metrics = run_demo(work_dir, seed=args.seed, overrides=args.set)
    if not metrics:
        print(f"demo stopped before the end; run it again to resume ({work_dir})")
        return 1
    print(
        f"segm AP {metrics['segm']['AP']:.1f}, boundary AP {metrics['boundary']['AP']:.1f}, "
        f"bbox AP {metrics['bbox']['AP']:.1f} on the held-out split"
    )
    print(f"  metrics:     {work_dir / 'train' / 'metrics.json'}")
    print(f"  overlays:    {work_dir / 'overlays'}")
    print(f"  loss curve:  {work_dir / 'loss_curve.png'}")
    print(f"  checkpoint:  {work_dir / 'train' / 'model_final.safetensors'}")
    return 0


def _ops_demo(work_dir: Path, seed: int) -> int:
    from . import ops_demo

    summary = ops_demo.run(work_dir, seed=seed)
    refine = summary["prroi_box_refinement"]
    print("instseg operator tour")
    print(
        f"  PrRoIPool box refinement: IoU {refine['iou_before']:.3f} -> {refine['iou_after']:.3f}"
        f" (feature loss {refine['loss_first']:.2e} -> {refine['loss_last']:.2e})"
    )
    print(f"  roi_align {summary['roi_align_shape']}, roi_pool {summary['roi_pool_shape']}")
    nms = summary["nms"]
    print(f"  batched_nms kept {nms['kept']} of {nms['candidates']} jittered boxes")
    print(f"  pasted masks vs ground truth, IoU: {summary['pasted_mask_iou']}")
    print(f"  wrote {work_dir / 'summary.json'} and {work_dir / 'overlay.png'}")
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a zoo config name (`instseg configs`) or a .json config")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config fields by dotted key, e.g. model.backbone.weights=r50.pth",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instseg", description="Pure-PyTorch instance segmentation."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model", description="Train a detector.")
    _common(train)
    train.add_argument("--work-dir", help="output folder (default: work_dirs/<config name>)")
    train.add_argument("--train-ann", help="COCO-format training annotations json")
    train.add_argument("--train-images", help="folder of the training images")
    train.add_argument("--val-ann", help="COCO-format validation annotations json")
    train.add_argument("--val-images", help="folder of the validation images")
    train.add_argument("--max-iters", type=int, help="training iterations")
    train.add_argument("--checkpoint-every", type=int, help="checkpoint every N iterations")
    train.add_argument(
        "--resume", action="store_true", help="continue exactly from the latest checkpoint"
    )
    train.set_defaults(func=_train)

    evaluate = sub.add_parser(
        "eval",
        help="evaluate a trained model",
        description="COCO evaluation of a checkpoint: box AP, plus mask AP and Boundary AP "
        "(rows 'segm' and 'boundary') for models that predict masks.",
    )
    _common(evaluate)
    evaluate.add_argument("--checkpoint", required=True, help="a .safetensors weights file")
    evaluate.add_argument("--ann", required=True, help="COCO-format annotations json")
    evaluate.add_argument("--images", required=True, help="folder of the images")
    evaluate.add_argument("--max-dets", type=int, help="detections per image (COCO maxDets)")
    evaluate.add_argument("--out", help="write the metrics json here")
    evaluate.add_argument("--results", help="write the COCO results json here")
    evaluate.set_defaults(func=_eval)

    predict = sub.add_parser(
        "predict", help="predict on images", description="Predict on images or folders."
    )
    _common(predict)
    predict.add_argument("--checkpoint", required=True, help="a .safetensors weights file")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="images or folders")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument(
        "--score-thr", type=float, default=0.3, help="minimum score (default: %(default)s)"
    )
    predict.set_defaults(func=_predict)

    configs = sub.add_parser("configs", help="list the named configs")
    configs.set_defaults(func=_configs)

    demo = sub.add_parser(
        "demo",
        help="train and evaluate the small Mask R-CNN on synthetic shapes (CPU, ~10 min)",
        description="Generate the shapes dataset, train mask_rcnn_r18_fpn_small on it, "
        "evaluate on a held-out split, write metrics, overlays and a loss curve. Running it "
        "again with the same work dir resumes or reuses the run.",
    )
    demo.add_argument(
        "--work-dir", default="work_dirs/demo", help="output folder (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=0, help="dataset seed (default: %(default)s)")
    demo.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    demo.add_argument(
        "--ops", action="store_true", help="run the quick operator tour instead (seconds)"
    )
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        ConfigError,
        DataError,
        CheckpointError,
        FileNotFoundError,
        FileExistsError,
        FloatingPointError,
    ) as exc:
        print(f"instseg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
