"""The command line and the operator demo, end to end."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from instseg.cli import build_parser, load_config, main, parse_args, trained_config
from test_training import NARROW

REPO = Path(__file__).resolve().parents[1]


def test_demo_writes_outputs_and_refines_the_box(tmp_path, capsys):
    assert main(["demo", "--ops", "--work-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    refine = summary["prroi_box_refinement"]
    # Gradient descent on the box coordinates through prroi_pool2d must recover the template.
    assert refine["iou_before"] < 0.7
    assert refine["iou_after"] > 0.99
    assert refine["loss_last"] < refine["loss_first"] / 100
    # One detection per object survives NMS, and its pasted mask matches the object.
    assert summary["nms"]["kept"] == 2
    assert min(summary["pasted_mask_iou"]) > 0.85
    png = (tmp_path / "overlay.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert not list(tmp_path.glob("*.tmp"))
    assert "overlay.png" in capsys.readouterr().out


def test_every_command_has_help():
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["demo", "--help"])
    assert exit_info.value.code == 0


def test_console_script_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "instseg.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "demo" in result.stdout


def test_benchmark_script_runs_quick(tmp_path):
    out = tmp_path / "ops.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "ops.py"),
            "--quick",
            "--repeat",
            "1",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    cases = {row["case"] for row in rows}
    assert any(c.startswith("roi_align 7x7 s0") for c in cases)
    assert any(c.startswith("prroi_pool2d 7x7") for c in cases)
    assert all(row["ours_ms"] > 0 for row in rows)


TINY = [
    *NARROW,
    "model.roi_head.mask_head.num_convs=1",
    "data.train_scales=((160,96),)",
    "data.test_scale=(160,96)",
    "train.batch_size=2",
    "train.log_every=1",
]


def test_train_eval_predict_resume_from_the_command_line(tmp_path, capsys):
    from instseg.data import ShapesConfig, generate_shapes

    data = tmp_path / "data"
    cfg = ShapesConfig(num_images=4, image_size=(96, 128), max_size=40, seed=5)
    ann = generate_shapes(data, cfg, "train")
    work = tmp_path / "work"
    base = ["train", "mask_rcnn_r18_fpn_small", "--work-dir", str(work)]
    paths = ["--train-ann", str(ann), "--train-images", str(data)]
    val = ["--val-ann", str(ann), "--val-images", str(data)]
    assert main([*base, *paths, "--max-iters", "2", "--set", *TINY]) == 0
    assert (work / "model_final.safetensors").is_file() and not (work / "metrics.json").exists()
    # Continue the same run to 3 iterations, then evaluate on the val split.
    assert main([*base, *paths, *val, "--max-iters", "3", "--resume", "--set", *TINY]) == 0
    metrics = json.loads((work / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm", "boundary"} and "AP50" in metrics["boundary"]
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [entry["iteration"] for entry in log] == [1, 2, 3]

    weights = str(work / "model_final.safetensors")
    out = tmp_path / "eval.json"
    results = tmp_path / "results.json"
    common = ["mask_rcnn_r18_fpn_small", "--checkpoint", weights, "--set", *TINY]
    eval_args = ["--ann", str(ann), "--images", str(data), "--max-dets", "300"]
    written = ["--out", str(out), "--results", str(results)]
    assert main(["eval", *common[:3], *eval_args, *written, "--set", *TINY]) == 0
    assert json.loads(out.read_text()).keys() == {"bbox", "segm", "boundary"}
    # Without CONFIG, eval uses the config stored in model_final.json: the same outputs.
    stored_out, stored_results = tmp_path / "eval_stored.json", tmp_path / "results_stored.json"
    written = ["--out", str(stored_out), "--results", str(stored_results)]
    assert main(["eval", "--checkpoint", weights, *eval_args, *written]) == 0
    assert stored_out.read_text() == out.read_text()
    assert stored_results.read_text() == results.read_text()
    # --max-dets 300 also raised the model's detection caps (100 / 300 in the config).
    from instseg.runner import load_trained

    raised = load_trained(weights, max_dets=300).model
    assert raised.roi_head.cfg.max_per_image == 300
    assert raised.rpn_head.cfg.test_max_per_image == 300 and raised.rpn_head.cfg.test_nms_pre == 500
    stored = load_trained(weights).model
    assert stored.roi_head.cfg.max_per_image == 100
    for entry in json.loads(results.read_text()):
        assert isinstance(entry["segmentation"]["counts"], str)
        assert entry["category_id"] in (1, 3, 7)
    # `score` scores the written results without the model: the same metrics as `eval`.
    scored = tmp_path / "scored.json"
    argv = ["score", "--ann", str(ann), "--results", str(results), "--out", str(scored)]
    assert main([*argv, "--max-dets", "300"]) == 0
    assert json.loads(scored.read_text()) == json.loads(out.read_text())
    # An LVIS-format file (negative / not-exhaustive lists, frequencies) is scored by the LVIS
    # protocol, by `eval` and by `score` alike; its images may be named by coco_url alone.
    lvis = json.loads(ann.read_text())
    for k, image in enumerate(lvis["images"]):
        image["neg_category_ids"] = [c["id"] for c in lvis["categories"]][k % 2 :]
        image["not_exhaustive_category_ids"] = []
        image["coco_url"] = f"http://images.cocodataset.org/{image.pop('file_name')}"
    for c, category in enumerate(lvis["categories"]):
        category["frequency"] = "rcf"[c % 3]
    for annotation in lvis["annotations"]:
        annotation.pop("iscrowd", None)
    lvis_ann = tmp_path / "lvis.json"
    lvis_ann.write_text(json.dumps(lvis))
    lvis_out, lvis_scored = tmp_path / "lvis_eval.json", tmp_path / "lvis_scored.json"
    lvis_args = ["--ann", str(lvis_ann), "--images", str(data), "--out", str(lvis_out)]
    assert main(["eval", "--checkpoint", weights, *lvis_args, "--results", str(results)]) == 0
    lvis_metrics = json.loads(lvis_out.read_text())
    assert set(lvis_metrics) == {"bbox", "segm"}
    assert {"APr", "APc", "APf", "AR100"} <= set(lvis_metrics["segm"])
    argv = ["score", "--ann", str(lvis_ann), "--results", str(results), "--out", str(lvis_scored)]
    assert main([*argv, "--max-dets", "100"]) == 0
    assert json.loads(lvis_scored.read_text()) == lvis_metrics

    pred = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                *common[:3],
                str(data / "images"),
                "--out",
                str(pred),
                "--score-thr",
                "0.0",
                "--set",
                *TINY,
            ]
        )
        == 0
    )
    assert len(list(pred.glob("*_pred.png"))) == 4
    images = json.loads((pred / "images.json").read_text())
    assert len(images) == 4
    # Valid COCO results: pycocotools loads them against the predicted images, and every
    # RLE decodes to a mask of its image's size.
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    predicted = json.loads((pred / "results.json").read_text())
    assert predicted, "score threshold 0 should keep some detections"
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": [],
        "categories": [{"id": i, "name": str(i)} for i in (1, 3, 7)],
    }
    gt.createIndex()
    loaded = gt.loadRes(str(pred / "results.json"))
    assert len(loaded.anns) == len(predicted)
    sizes = {im["id"]: (im["height"], im["width"]) for im in images}
    for entry in predicted:
        assert mask_utils.decode(entry["segmentation"]).shape == sizes[entry["image_id"]]

    # Without CONFIG an image as the first positional is an input, like those after the
    # options; the stored config gives the same predictions and overlays.
    files = [str(f) for f in sorted((data / "images").iterdir())]
    stored_pred = tmp_path / "pred_stored"
    argv = ["predict", files[0], "--checkpoint", weights, *files[1:], "--out", str(stored_pred)]
    assert main([*argv, "--score-thr", "0.0"]) == 0
    for name in ("results.json", "images.json", f"{Path(files[0]).stem}_pred.png"):
        assert (stored_pred / name).read_bytes() == (pred / name).read_bytes()
    # --set without CONFIG applies to the stored config: a model score threshold in the widest
    # gap between scores keeps exactly the detections above it (NMS keeps the same ones).
    scores = sorted({e["score"] for e in predicted})
    gap = max(range(1, len(scores)), key=lambda i: scores[i] - scores[i - 1])
    thr = (scores[gap - 1] + scores[gap]) / 2
    above = tmp_path / "pred_above"
    argv = ["predict", "--checkpoint", weights, str(data / "images"), "--out", str(above)]
    assert main([*argv, "--score-thr", "0.0", "--set", f"model.roi_head.score_thr={thr}"]) == 0
    kept = json.loads((above / "results.json").read_text())
    assert kept == [e for e in predicted if e["score"] > thr] and 0 < len(kept) < len(predicted)
    stored = trained_config(None, [], weights)
    assert stored == load_config(str(work / "config.json"), [])
    changed = trained_config(None, [f"model.roi_head.score_thr={thr}"], weights)
    assert changed.model.roi_head.score_thr == thr
    changed.model.roi_head.score_thr = stored.model.roi_head.score_thr
    assert changed == stored

    # Weights without their json (or a json without a config): an error naming the json.
    orphan = tmp_path / "orphan" / "model_final.safetensors"
    orphan.parent.mkdir()
    shutil.copy(weights, orphan)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(orphan), *eval_args]) == 2
    assert f"{orphan.with_suffix('.json')} not found" in capsys.readouterr().err
    argv = ["predict", files[0], "--checkpoint", str(orphan), "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    assert f"{orphan.with_suffix('.json')} not found" in capsys.readouterr().err
    orphan.with_suffix(".json").write_text(json.dumps({"state": {"categories": [[1, "a"]]}}))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{orphan.with_suffix('.json')} records no config" in err
    assert not (tmp_path / "x").exists()


def test_config_is_optional_for_eval_and_predict(tmp_path, capsys):
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    config = tmp_path / "config.json"
    config.write_text("{}")
    tail = ["--checkpoint", "w.safetensors", "--out", "o"]
    zoo = "mask_rcnn_r18_fpn_small"
    args = parse_args(["eval", "--checkpoint", "w.safetensors", "--ann", "a", "--images", "i"])
    assert args.config is None
    # The first positional is CONFIG only if it is a zoo name or an existing .json file.
    for argv, config_arg, inputs in [
        ([zoo, *tail, str(image)], zoo, [str(image)]),
        ([zoo, str(image), *tail], zoo, [str(image)]),
        ([str(config), *tail, str(image), "b"], str(config), [str(image), "b"]),
        ([str(image), *tail, "b"], None, [str(image), "b"]),
        ([*tail, str(image)], None, [str(image)]),
        (["missing.json", *tail], None, ["missing.json"]),
    ]:
        args = parse_args(["predict", *argv])
        assert (args.config, args.inputs) == (config_arg, inputs), argv
    for argv in ([zoo, *tail], tail, [str(image), *tail, "--bogus"]):
        with pytest.raises(SystemExit):
            parse_args(["predict", *argv])
    capsys.readouterr()
    # A positional that is neither a config nor a file is named as a missing input.
    assert main(["predict", "mask_rcnn_r5O_fpn", *tail]) == 2
    assert "input not found: mask_rcnn_r5O_fpn (the first positional is CONFIG" in (
        capsys.readouterr().err
    )
    for command in ("eval", "predict"):
        with pytest.raises(SystemExit) as exit_info:
            parse_args([command, "--help"])
        assert exit_info.value.code == 0
        assert "stored with the checkpoint" in " ".join(capsys.readouterr().out.split())


def test_cli_errors_are_one_line_and_name_the_problem(tmp_path, capsys):
    assert main(["train", "mask_rcnn_r5O_fpn", "--train-ann", "x.json", "--train-images", "x"]) == 2
    assert "unknown config 'mask_rcnn_r5O_fpn'" in capsys.readouterr().err
    assert main(["train", "mask_rcnn_r18_fpn_small", "--set", "model.backbone.detph=3"]) == 2
    assert "model.backbone.detph" in capsys.readouterr().err
    missing = tmp_path / "missing.json"
    code = main(
        [
            "train",
            "mask_rcnn_r18_fpn_small",
            "--train-ann",
            str(missing),
            "--train-images",
            str(tmp_path),
        ]
    )
    assert code == 2 and "missing.json" in capsys.readouterr().err


def test_detector_demo_end_to_end_and_rerun_reuses_the_run(tmp_path):
    from instseg.demo import run_demo

    overrides = [*TINY, "train.max_iters=2", "train.checkpoint_every=0"]
    metrics = run_demo(tmp_path, overrides=overrides, num_train=6, num_val=3)
    assert set(metrics) == {"bbox", "segm", "boundary"}
    assert (tmp_path / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert len(list((tmp_path / "overlays").glob("*_pred.png"))) == 3
    saved = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    again = run_demo(tmp_path, overrides=overrides, num_train=6, num_val=3)
    assert again == metrics


def test_condinst_demo_trains_evaluates_and_predicts(tmp_path):
    """The one-stage detector through the same paths as Mask R-CNN: training, COCO
    box/mask/Boundary AP, checkpoint json, overlays."""
    from instseg.demo import run_demo
    from test_training import CONDINST_NARROW, ONE_STAGE_NARROW

    tiny = [
        *ONE_STAGE_NARROW,
        *CONDINST_NARROW,
        "data.train_scales=((192,128),)",
        "data.test_scale=(192,128)",
        "train.batch_size=2",
        "train.max_iters=2",
        "train.checkpoint_every=0",
    ]
    metrics = run_demo(
        tmp_path, overrides=tiny, num_train=6, num_val=3, config="condinst_r18_fpn_small"
    )
    assert set(metrics) == {"bbox", "segm", "boundary"}
    saved = json.loads((tmp_path / "train" / "model_final.json").read_text())
    assert saved["state"]["config"]["model"]["kind"] == "one_stage"
    assert len(list((tmp_path / "overlays").glob("*_pred.png"))) == 3
    assert parse_args(["demo", "--config", "condinst_r18_fpn_small"]).config == (
        "condinst_r18_fpn_small"
    )


@pytest.mark.parametrize(
    "command",
    [["train", "cfg"], ["demo"], ["eval", "--checkpoint", "w", "--ann", "a", "--images", "i"]],
)
def test_repeated_set_flags_accumulate(command):
    # argparse's plain nargs="+" keeps only the last --set: the others were silently lost.
    args = parse_args([*command, "--set", "a=1", "b=2", "--set", "c=3"])
    assert args.set == ["a=1", "b=2", "c=3"]
    assert parse_args(command).set == []
