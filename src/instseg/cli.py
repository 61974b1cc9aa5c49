"""The ``instseg`` command line: train, eval, predict, configs, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from .configs import (
    ZOO,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    get_config,
)
from .data import DataError
from .engine import CheckpointError
from .errors import DistributedError


def names_config(arg: str) -> bool:
    """True when ``arg`` is a zoo name or an existing ``.json`` file: what CONFIG may be."""
    path = Path(arg)
    return arg in ZOO or (path.suffix == ".json" and path.is_file())


def load_config(name_or_path: str, overrides: list[str]) -> ExperimentConfig:
    """A zoo name or a JSON config file (as written to ``work_dir/config.json``), then the
    ``--set`` overrides."""
    path = Path(name_or_path)
    if name_or_path in ZOO:
        cfg = get_config(name_or_path)
    elif names_config(name_or_path):
        try:
            cfg = config_from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: malformed json at line {exc.lineno}: {exc.msg}") from exc
    else:
        raise ConfigError(
            f"unknown config {name_or_path!r}: not a zoo name (see `instseg configs`) "
            "nor a .json config file"
        )
    return apply_overrides(cfg, overrides)


def trained_config(
    name_or_path: str | None, overrides: list[str], weights: str
) -> ExperimentConfig:
    """The config of eval and predict: CONFIG when named, else the one stored in the checkpoint
    json beside ``weights``; the ``--set`` overrides apply to either."""
    if name_or_path is not None:
        return load_config(name_or_path, overrides)
    from .runner import checkpoint_config

    return apply_overrides(checkpoint_config(weights), overrides)


def config_and_inputs(positionals: list[str]) -> tuple[str | None, list[str]]:
    """Split predict's positionals: the first is CONFIG only if it is a zoo name or an
    existing .json file (:func:`names_config`); otherwise all of them are inputs."""
    if positionals and names_config(positionals[0]):
        return positionals[0], positionals[1:]
    return None, positionals


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

    overrides = list(args.set)
    if args.cityscapes_gt is not None:
        overrides.append(f"eval.cityscapes_gt_dir={args.cityscapes_gt}")
    cfg = trained_config(args.config, overrides, args.checkpoint)
    run_eval(
        args.checkpoint,
        args.ann,
        args.images,
        cfg,
        args.max_dets,
        args.out,
        args.results,
        args.device,
        cityscapes_out=args.cityscapes_out,
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .runner import run_predict

    missing = [item for item in args.inputs if not Path(item).exists()]
    if missing:
        raise FileNotFoundError(
            f"input not found: {missing[0]} (the first positional is CONFIG only if it is a "
            "zoo name or an existing .json file)"
        )
    cfg = trained_config(args.config, args.set, args.checkpoint)
    path = run_predict(args.checkpoint, args.inputs, args.out, args.score_thr, cfg, args.device)
    print(f"wrote {path} and overlays to {args.out}")
    return 0


def _require_extra(command: str, extra: str, modules: tuple[str, ...]) -> None:
    """A clear error when a command's optional dependencies are not installed."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise FileNotFoundError(
            f"instseg {command} needs {', '.join(modules)} (missing: {', '.join(missing)}): "
            f"pip install 'instseg[{extra}]'"
        )


def _export(args: argparse.Namespace) -> int:
    _require_extra("export", "onnx", ("onnx", "onnxruntime", "onnxscript"))
    from .export import ExportError, export_onnx
    from .runner import load_trained

    cfg = trained_config(args.config, args.set, args.checkpoint)
    trained = load_trained(args.checkpoint, cfg)
    try:
        report = export_onnx(
            trained.model,
            trained.cfg,
            trained.categories,
            args.out,
            image_size=tuple(args.image_size) if args.image_size else None,
            dynamic=args.dynamic,
            pasted_masks=args.pasted_masks,
        )
    except ExportError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if not report.ok:
        print(f"export: error: {args.out} differs from PyTorch (above)", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    _require_extra("serve", "serve", ("starlette", "uvicorn", "python_multipart"))
    from .serve import UploadLimits, build_app, resolve_sources, serve

    sources = resolve_sources(args.checkpoint, args.work_dir, args.ann, args.results, args.images)
    cfg = None
    if sources.checkpoint is not None and (args.config is not None or args.set):
        cfg = trained_config(args.config, args.set, str(sources.checkpoint))
    limits = UploadLimits()
    if args.max_upload_mb is not None:
        limits = replace(limits, max_bytes=int(args.max_upload_mb * 1024 * 1024))
    if args.max_pixels is not None:
        limits = replace(limits, max_pixels=args.max_pixels)
    if limits.max_bytes <= 0 or limits.max_pixels <= 0:
        raise ConfigError("--max-upload-mb and --max-pixels must be positive")
    app = build_app(sources, cfg, limits, args.min_score, args.device)
    pages = []
    if sources.checkpoint is not None:
        pages.append(f"predict (model {sources.checkpoint})")
    if sources.results is not None:
        pages.append(f"evaluation ({sources.results} against {sources.ann})")
    print(f"instseg serve: {'; '.join(pages)}")
    print(f"open http://{args.host}:{args.port}/ (Ctrl+C stops)")
    serve(app, args.host, args.port)
    return 0


def _score(args: argparse.Namespace) -> int:
    from .evaluation import format_table, write_json
    from .evaluation.score import evaluate_results

    try:
        metrics = evaluate_results(args.ann, args.results, max_dets=args.max_dets)
    except DataError:
        raise
    except ValueError as exc:  # malformed annotations or results: the message names them
        raise DataError(str(exc)) from exc
    print(format_table(metrics))
    if args.out is not None:
        write_json(args.out, metrics)
        print(f"wrote {args.out}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    categories = None
    if args.categories is not None:
        from .data.coco import Category, load_json

        data = load_json(args.categories)
        try:
            found = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{args.categories}: no usable 'categories' list ({exc})") from exc
        categories = [Category(i, n) for i, n in found]
    cfg = load_config(args.config, args.set)
    out = convert_checkpoint(args.source, args.format, cfg, args.out, categories)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _cocofy_lvis(args: argparse.Namespace) -> int:
    from .data.coco import load_json
    from .evaluation import cocofy_lvis, write_json

    try:
        cocofied = cocofy_lvis(load_json(args.lvis), str(args.lvis))
    except DataError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{args.lvis}: not a usable LVIS json ({exc})") from exc
    write_json(args.out, cocofied)
    print(
        f"wrote {args.out}: {len(cocofied['images'])} images, "
        f"{len(cocofied['annotations'])} annotations, {len(cocofied['categories'])} categories"
    )
    return 0


def _cityscapes_to_coco(args: argparse.Namespace) -> int:
    from .data.cityscapes import convert_cityscapes

    if args.workers < 0:
        raise DataError(f"--workers must be >= 0, got {args.workers}")
    for result, path in convert_cityscapes(args.root, args.out, args.splits, args.workers):
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(result.skipped.items()))
        print(
            f"{result.split}: {result.num_images} images, {result.num_annotations} annotations "
            f"({result.num_crowd} crowd) -> {path}" + (f"; skipped {skipped}" if skipped else "")
        )
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

    metrics = run_demo(work_dir, seed=args.seed, overrides=args.set, config=args.config)
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


CONFIG_HELP = "a zoo config name (`instseg configs`) or a .json config"
# instseg.convert.FORMATS, without importing torch for --help (a test keeps them equal).
FORMAT_CHOICES = ("mmdet", "refinemask", "detectron2", "torchvision")
STORED_CONFIG = "default: the config stored with the checkpoint, in the .json beside it"


def _set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config fields by dotted key, e.g. model.backbone.weights=r50.pth "
        "(repeatable: --set a=1 --set b=2 is --set a=1 b=2)",
    )


def _common(parser: argparse.ArgumentParser) -> None:
    _set_option(parser)
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device (default: %(default)s); under torchrun or srun `cuda` means each "
        "process's own GPU, cuda:LOCAL_RANK",
    )
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="under torchrun or srun: how long a collective waits for the other processes "
        "before failing (default: 600)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instseg", description="Pure-PyTorch instance segmentation."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model", description="Train a detector.")
    train.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
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
        description="Evaluation of a checkpoint: box AP, plus mask AP and Boundary AP "
        "(rows 'segm' and 'boundary') for models that predict masks. LVIS-format annotations "
        "(LVIS, cocofied LVIS for AP*) are scored by LVIS's rules (no Boundary AP); "
        "--cityscapes-gt adds the official Cityscapes evaluation.",
    )
    evaluate.add_argument(
        "config", nargs="?", metavar="CONFIG", help=f"{CONFIG_HELP} ({STORED_CONFIG})"
    )
    _common(evaluate)
    evaluate.add_argument("--checkpoint", required=True, help="a .safetensors weights file")
    evaluate.add_argument("--ann", required=True, help="COCO-format annotations json")
    evaluate.add_argument("--images", required=True, help="folder of the images")
    evaluate.add_argument("--max-dets", type=int, help="detections per image (COCO maxDets)")
    evaluate.add_argument("--out", help="write the metrics json here")
    evaluate.add_argument("--results", help="write the COCO results json here")
    evaluate.add_argument(
        "--cityscapes-gt",
        metavar="DIR",
        help="a Cityscapes gtFine split folder (gtFine/val): add the official Cityscapes "
        "instance evaluation (AP, AP50) of the predicted masks (eval.cityscapes_gt_dir)",
    )
    evaluate.add_argument(
        "--cityscapes-out",
        metavar="DIR",
        help="keep the prediction files of the Cityscapes evaluation here "
        "(default: a temporary folder)",
    )
    evaluate.set_defaults(func=_eval)

    predict = sub.add_parser(
        "predict",
        help="predict on images",
        usage="%(prog)s [CONFIG] INPUT... --checkpoint PATH --out DIR [--score-thr T] "
        "[--set KEY=VALUE ...] [--device DEVICE]",
        description="Predict on images or folders. The first positional is CONFIG only if it "
        "is a zoo name or an existing .json file; otherwise every positional is an INPUT and "
        "the config is the one stored with the checkpoint.",
    )
    predict.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG",
        help="a zoo config name (`instseg configs`) or an existing .json config; a first "
        f"positional that is neither is an INPUT ({STORED_CONFIG})",
    )
    # nargs="*": main() adds INPUTs given after options and requires at least one.
    predict.add_argument("inputs", nargs="*", metavar="INPUT", help="images or folders")
    _common(predict)
    predict.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="a .safetensors weights file"
    )
    predict.add_argument("--out", required=True, metavar="DIR", help="output folder")
    predict.add_argument(
        "--score-thr",
        type=float,
        default=0.3,
        metavar="T",
        help="minimum score (default: %(default)s)",
    )
    predict.set_defaults(func=_predict)

    serve = sub.add_parser(
        "serve",
        help="a web page to try a model and to look at an evaluation",
        description="Start a local web server: the predict page (upload an image, see its "
        "masks, boxes and scores, threshold them, download the COCO results) needs a "
        "checkpoint; the evaluation page (metrics, AP per category, precision-recall curves, "
        "images sorted by errors) needs a ground truth and results. --work-dir takes all of "
        "them from a training run: model_final.safetensors, results.json, metrics.json and "
        "the validation data named in config.json. The JSON API behind the pages is in the "
        "README.",
    )
    serve.add_argument(
        "config", nargs="?", metavar="CONFIG", help=f"{CONFIG_HELP} ({STORED_CONFIG})"
    )
    serve.add_argument("--checkpoint", metavar="PATH", help="a .safetensors weights file")
    serve.add_argument("--work-dir", metavar="RUN_DIR", help="a finished training run's folder")
    serve.add_argument("--ann", help="COCO-format ground truth of the evaluation page")
    serve.add_argument("--results", help="COCO-format results json of the evaluation page")
    serve.add_argument("--images", help="folder of the ground truth's images")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: %(default)s, this machine only; anything else is "
        "reachable by others, without authentication)",
    )
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument(
        "--min-score",
        type=float,
        default=0.0,
        metavar="T",
        help="lowest score sent to the page; the page's slider starts at 0.3 "
        "(default: %(default)s, every detection the model keeps)",
    )
    serve.add_argument(
        "--max-upload-mb",
        type=float,
        metavar="MB",
        help="largest upload in MiB (default: 20)",
    )
    serve.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        help="largest upload in pixels, width x height (default: 40000000)",
    )
    serve.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    _set_option(serve)
    serve.set_defaults(func=_serve)

    score = sub.add_parser(
        "score",
        help="score a results json (no model)",
        description="Score an existing COCO-format results json against an annotation file: "
        "box AP when every result has a 'bbox', mask AP (and Boundary AP, COCO only) when every "
        "result has a 'segmentation'. The annotation file decides the protocol: LVIS-format "
        "files (LVIS v0.5/v1, cocofied LVIS for AP*) are scored by LVIS's federated rules "
        "(APr/APc/APf, at most 300 detections per image), others by COCO's.",
    )
    score.add_argument("--ann", required=True, help="COCO- or LVIS-format annotations json")
    score.add_argument("--results", required=True, help="COCO-format results json")
    score.add_argument("--out", help="write the metrics json here")
    score.add_argument(
        "--max-dets",
        type=int,
        help="detections per image (default: COCO 100, LVIS 300)",
    )
    score.set_defaults(func=_score)

    convert = sub.add_parser(
        "convert",
        help="convert another code base's checkpoint",
        description="Convert a checkpoint of another code base into an instseg checkpoint "
        "(OUT.safetensors and OUT.json: the config, the categories, the source's sha256) for "
        "eval, predict and train.load_from. The file is read with torch.load(weights_only="
        "True): one that needs other objects is refused, never run. Every key must map to the "
        "config's model with its shape; the error lists those that do not.",
    )
    convert.add_argument("source", metavar="SRC", help="the checkpoint (.pth)")
    convert.add_argument(
        "--format",
        required=True,
        choices=FORMAT_CHOICES,
        help="the code base that wrote SRC (torchvision: use a torchvision_* config)",
    )
    convert.add_argument("--config", required=True, help=CONFIG_HELP)
    convert.add_argument("--out", required=True, help="the .safetensors file to write")
    convert.add_argument(
        "--categories",
        metavar="ANN_JSON",
        help="take the categories (in id order) from this COCO-format json (default: the "
        "checkpoint's class names; COCO's 80 when it names none; torchvision's 91 rows: "
        "COCO ids 1-90)",
    )
    _set_option(convert)
    convert.set_defaults(func=_convert)

    export = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX",
        description="Export a checkpoint's whole inference to ONNX: normalisation and padding, "
        "the network, NMS (ONNX NonMaxSuppression) and the masks. The graph takes one RGB "
        "image (float32 3 x H x W, 0-255, already at network resolution) and gives boxes "
        "(N x 4, x1 y1 x2 y2), scores (N), labels (N, int64 category ids) and, for mask "
        "models, masks (probabilities: N x M x M at RoI resolution, or N x H x W with "
        "--pasted-masks; CondInst's are always N x H x W). After writing, onnxruntime runs "
        "it on random images and compares with PyTorch (1e-3); exit status 1 when they "
        "differ. IFR heads, Grid R-CNN and Precise RoI Pooling cannot be exported: the "
        "error names the part.",
    )
    export.add_argument(
        "config", nargs="?", metavar="CONFIG", help=f"{CONFIG_HELP} ({STORED_CONFIG})"
    )
    export.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="a .safetensors weights file"
    )
    export.add_argument("--out", required=True, help="the .onnx file to write")
    export.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="the input size the graph takes (default: the config's test scale, landscape)",
    )
    export.add_argument("--dynamic", action="store_true", help="any input height and width instead")
    export.add_argument(
        "--pasted-masks",
        action="store_true",
        help="masks pasted into the image (N x H x W) instead of at RoI resolution",
    )
    _set_option(export)
    export.set_defaults(func=_export)

    cocofy = sub.add_parser(
        "cocofy-lvis",
        help="build the cocofied LVIS json of AP*",
        description="Restrict an LVIS json (e.g. lvis_v0.5_val.json) to the 80 COCO categories "
        "with COCO category ids, as detectron2's prepare_cocofied_lvis.py: the ground truth of "
        "AP* (`instseg eval --ann OUT`, `instseg score --ann OUT`).",
    )
    cocofy.add_argument("lvis", metavar="LVIS_JSON", help="an LVIS annotations json")
    cocofy.add_argument("out", metavar="OUT_JSON", help="where to write the cocofied json")
    cocofy.set_defaults(func=_cocofy_lvis)

    cityscapes = sub.add_parser(
        "cityscapes-to-coco",
        help="convert Cityscapes gtFine annotations to COCO jsons",
        description="Convert the official Cityscapes layout (ROOT/leftImg8bit/<split>/<city>/"
        "*_leftImg8bit.png beside ROOT/gtFine/<split>/<city>/*_gtFine_instanceIds.png) to "
        "DIR/instancesonly_filtered_gtFine_<split>.json as mmdetection's "
        "tools/dataset_converters/cityscapes.py writes them: the 8 evaluated classes with their "
        "Cityscapes label ids, one RLE annotation per instance id, groups as crowd. Image file "
        "names are relative to ROOT/leftImg8bit/<split>.",
    )
    cityscapes.add_argument(
        "root", metavar="ROOT", help="the Cityscapes folder holding leftImg8bit/ and gtFine/"
    )
    cityscapes.add_argument("--out", required=True, metavar="DIR", help="output folder")
    cityscapes.add_argument(
        "--splits",
        nargs="+",
        default=["train", "val"],
        metavar="SPLIT",
        help="splits to convert (default: train val)",
    )
    cityscapes.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes reading the PNGs (default: %(default)s, this process)",
    )
    cityscapes.set_defaults(func=_cityscapes_to_coco)

    configs = sub.add_parser("configs", help="list the named configs")
    configs.set_defaults(func=_configs)

    demo = sub.add_parser(
        "demo",
        help="train and evaluate the small Mask R-CNN on synthetic shapes (CPU, ~7.5 min)",
        description="Generate the shapes dataset, train mask_rcnn_r18_fpn_small on it, "
        "evaluate on a held-out split, write metrics, overlays and a loss curve. Running it "
        "again with the same work dir resumes or reuses the run.",
    )
    demo.add_argument(
        "--work-dir", default="work_dirs/demo", help="output folder (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=0, help="dataset seed (default: %(default)s)")
    demo.add_argument(
        "--config",
        default="mask_rcnn_r18_fpn_small",
        help="zoo config to train (default: %(default)s; e.g. condinst_r18_fpn_small)",
    )
    demo.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides (repeatable)",
    )
    demo.add_argument(
        "--ops", action="store_true", help="run the quick operator tour instead (seconds)"
    )
    demo.set_defaults(func=_demo)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; predict's positionals are split by :func:`config_and_inputs`
    into ``config`` (None: the checkpoint's) and ``inputs``."""
    parser = build_parser()
    # argparse fills each positional from one run of arguments between options, so predict's
    # INPUTs after an option (`predict CONFIG --checkpoint W IMAGE`) come back as extras.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "predict" or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "predict":
        positionals = [p for p in (args.config, *args.inputs, *extra) if p is not None]
        args.config, args.inputs = config_and_inputs(positionals)
        if not args.inputs:
            parser.error("predict needs at least one INPUT (an image or a folder)")
    return args


# The commands that run data-parallel under torchrun / srun.
DISTRIBUTED_COMMANDS = ("train", "eval", "predict")


def _join_launch(args: argparse.Namespace) -> bool:
    """Under torchrun / srun with several processes, join their process group; True then.

    ``train`` trains a DDP model on the global batch split across the processes, ``eval``
    and ``predict`` shard the images and gather on rank 0. A ``cuda`` device becomes each
    process's own GPU. Any other command in such a launch would run once per process over
    the same files, so it is an error instead.
    """
    if not any(k in os.environ for k in ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS")):
        return False  # the common case, without importing torch.distributed
    from .engine.distributed import (
        DEFAULT_TIMEOUT_S,
        DistributedError,
        environment,
        init_process_group,
    )

    env = environment()
    if env is None:
        return False
    if args.command not in DISTRIBUTED_COMMANDS:
        raise DistributedError(
            f"`instseg {args.command}` does not run under a multi-process launch "
            f"({env.launcher}, {env.world_size} processes): start it as one process; "
            f"the distributed commands are {', '.join(DISTRIBUTED_COMMANDS)}"
        )
    if args.device == "cuda":
        args.device = f"cuda:{env.local_rank}"
    timeout = DEFAULT_TIMEOUT_S if args.dist_timeout is None else args.dist_timeout
    if not timeout > 0:
        raise DistributedError(f"--dist-timeout must be positive, got {timeout}")
    init_process_group(env, args.device, timeout)
    return True


def _collective_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective operation that failed or timed out (a process of the
    launch died or hangs), as gloo and NCCL report it."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("gloo", "NCCL", "Connection closed by peer", "Timed out")
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = f"instseg {args.command}"
    joined = False
    try:
        joined = _join_launch(args)
        if joined:
            from .engine.distributed import rank_and_world

            rank, world = rank_and_world()
            command = f"{command} (rank {rank} of {world})"
        try:
            return args.func(args)
        finally:
            if joined:
                from .engine.distributed import leave_process_group

                leave_process_group()
    except (
        DistributedError,
        ConfigError,
        DataError,
        CheckpointError,
        FileNotFoundError,
        FileExistsError,
        FloatingPointError,
    ) as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not (joined and _collective_failed(exc)):
            raise
        print(
            f"{command}: error: an operation with the other processes failed ({exc}); "
            "another process has probably stopped first: the launcher's report (torchrun's "
            "'Root Cause', srun's task list) names it. Resume from the last checkpoint.",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
