"""The official Cityscapes instance-level evaluation (cityscapesScripts) of our predictions.

Two pieces:

- :func:`write_cityscapes_predictions` writes one image's ``Instances`` in the layout the
  official script reads (as detectron2's and mmdet's Cityscapes evaluators write it): a text
  file ``<basename>_pred.txt`` with one line ``<png name> <labelId> <score>`` per instance,
  and per instance a full-resolution 1-bit PNG ``<basename>_<i>_<class name>.png`` (the
  script takes any non-zero pixel as the instance). An image without instances gets an empty
  text file; the script needs one per ground-truth image.
- :func:`evaluate_cityscapes` runs the steps of ``cityscapesscripts.evaluation.
  evalInstanceLevelSemanticLabeling.evaluateImgLists`` (``getPrediction`` per ground-truth
  image, ``getGtInstances``, ``matchGtWithPreds``, ``evaluateMatches``, ``computeAverages``)
  with its own ``args`` defaults, its ground-truth cache (``gtInstances.json``) in a temporary
  folder, and without the ``matches.json`` that ``evaluateImgLists`` always writes to the
  working directory; it returns AP (IoU 0.5:0.95), AP50 and per-class AP in percent.

cityscapesscripts is an optional dependency (``pip install instseg[cityscapes]``); this module
imports it only inside :func:`evaluate_cityscapes`. cityscapesscripts (2.2.4 and 2.3.0) calls
``np.in1d``, which numpy 2.4 removed: see :func:`_official_evaluator`.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import io
import math
import os
import re
import tempfile
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from instseg.data.cityscapes import THING_LABEL_IDS, THING_NAMES
from instseg.fileio import atomic_write_text
from instseg.structures import Instances

# Cityscapes label id -> name of the evaluated classes (the names the official script reports).
LABEL_NAMES: dict[int, str] = dict(zip(THING_LABEL_IDS, THING_NAMES, strict=True))
_BASENAME = re.compile(r"^(?P<base>[^_/]+_\d+_\d+)_leftImg8bit\.png$")


def cityscapes_basename(file_name: str) -> str:
    """``<city>_<seq>_<frame>`` of a Cityscapes image file name (a COCO ``file_name`` such as
    ``frankfurt/frankfurt_000000_000294_leftImg8bit.png``, or a path)."""
    match = _BASENAME.match(Path(file_name).name)
    if match is None:
        raise ValueError(
            f"{file_name!r} is not a Cityscapes image name (<city>_<seq>_<frame>_leftImg8bit.png)"
        )
    return match["base"]


def write_cityscapes_predictions(
    out_dir: str | Path,
    basename: str,
    instances: Instances,
    label_ids: Sequence[int] = THING_LABEL_IDS,
) -> Path:
    """Write one image's predictions for the official evaluation; returns the text file.

    ``instances`` holds ``masks (N, H, W)`` bool at the original image resolution, ``scores``
    and ``labels`` (contiguous class indices); label ``i`` is written as Cityscapes label id
    ``label_ids[i]`` (by default our Cityscapes categories sorted by id, as the converted json
    and ``CocoDataset`` order them). Instances with an empty mask are left out (the script
    skips them). The PNGs are written first and the text file last, atomically, so a text
    file never names a missing mask.
    """
    if instances.masks is None:
        raise ValueError("Cityscapes evaluation needs masks: instances.masks is None")
    masks = instances.masks.detach().to("cpu", dtype=bool).numpy()
    if masks.ndim != 3 or masks.shape[0] != len(instances):
        raise ValueError(
            f"masks must be (N, H, W) with N = {len(instances)} instances, got {masks.shape}"
        )
    labels = instances.labels.detach().cpu().numpy().astype(np.int64)
    scores = instances.scores.detach().cpu().numpy().astype(np.float64)
    bad = labels[(labels < 0) | (labels >= len(label_ids))]
    if bad.size:
        raise ValueError(
            f"labels {sorted(set(bad.tolist()))} have no Cityscapes label id "
            f"(label_ids has {len(label_ids)} entries)"
        )
    unknown = sorted({int(i) for i in label_ids} - set(LABEL_NAMES))
    if unknown:
        raise ValueError(
            f"label_ids {unknown} are not evaluated Cityscapes classes {sorted(LABEL_NAMES)}"
        )
    if not np.isfinite(scores).all():
        raise ValueError(f"{basename}: non-finite scores")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    non_empty = masks.any(axis=(1, 2))
    lines = []
    for i in np.flatnonzero(non_empty).tolist():
        label_id = int(label_ids[labels[i]])
        png = f"{basename}_{i}_{LABEL_NAMES[label_id]}.png"
        Image.fromarray(masks[i]).save(out_dir / png)  # bool -> 1-bit PNG
        lines.append(f"{png} {label_id} {float(scores[i])!r}\n")
    txt = out_dir / f"{basename}_pred.txt"
    atomic_write_text(txt, "".join(lines))
    return txt


class _NumpyWithIn1d(types.ModuleType):
    """numpy, plus ``in1d`` (removed in numpy 2.4) as numpy documents its replacement:
    ``isin(ar1, ar2).ravel()``. Everything else is numpy's own attribute."""

    def __init__(self, numpy: types.ModuleType) -> None:
        super().__init__(numpy.__name__)
        self._numpy = numpy

    def __getattr__(self, name: str) -> Any:
        return getattr(self._numpy, name)

    def in1d(
        self, ar1: Any, ar2: Any, assume_unique: bool = False, invert: bool = False
    ) -> np.ndarray:
        return self._numpy.isin(ar1, ar2, assume_unique=assume_unique, invert=invert).ravel()


def _official_evaluator() -> Any:
    """cityscapesscripts' instance evaluation module, runnable with any numpy.

    Its ``assignGt2Preds`` calls ``np.in1d``, which numpy 2.4 removed (cityscapesscripts 2.2.4
    and 2.3.0 alike); where numpy lacks it, the module's ``np`` name (and only that: numpy
    itself is untouched) is given a numpy with ``in1d`` defined as numpy documents it.
    """
    try:
        from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as cse
    except ImportError as exc:
        raise ImportError(
            f"the official Cityscapes evaluation needs cityscapesscripts ({exc}): "
            "pip install instseg[cityscapes]  (or: pip install cityscapesscripts)"
        ) from exc
    if not hasattr(cse.np, "in1d"):
        cse.np = _NumpyWithIn1d(cse.np)
    return cse


def _percent(value: float) -> float:
    """A fraction in percent; NaN (a class without ground truth) becomes -1."""
    value = float(value)
    return -1.0 if math.isnan(value) else value * 100.0


def evaluate_cityscapes(pred_dir: str | Path, gt_dir: str | Path) -> dict[str, float]:
    """Official Cityscapes instance AP of the predictions in ``pred_dir`` against ``gt_dir``.

    ``gt_dir`` is a gtFine split folder (``gtFine/val``): every
    ``<city>/*_gtFine_instanceIds.png`` below it is evaluated. ``pred_dir`` holds, anywhere
    below it, exactly one ``<city>_<seq>_<frame>*.txt`` per ground-truth image, as
    :func:`write_cityscapes_predictions` writes them. Nothing is written into either folder.

    Returns percent: ``AP`` (mean over the 10 IoU thresholds 0.5:0.05:0.95 and over classes),
    ``AP50``, and ``AP_<class>`` for each of the 8 classes. A class without counted ground
    truth in the whole set (the official script gives NaN) is -1 and is left out of the means
    (the script's nanmean); with no counted ground truth at all, AP and AP50 are -1. A class
    with ground truth but no prediction has AP 0.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"Cityscapes prediction folder not found: {pred_dir}")
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"Cityscapes gtFine folder not found: {gt_dir}")
    ground_truth = sorted(glob.glob(os.path.join(gt_dir, "*", "*_gtFine_instanceIds.png")))
    if not ground_truth:
        raise FileNotFoundError(f"no <city>/*_gtFine_instanceIds.png files in {gt_dir}")
    cse = _official_evaluator()

    with tempfile.TemporaryDirectory(prefix="instseg_cityscapes_") as tmp:
        args = copy.copy(cse.args)  # the module's defaults; the module's own object untouched
        args.predictionPath = os.path.abspath(pred_dir)
        args.predictionWalk = None
        args.gtInstancesFile = os.path.join(tmp, "gtInstances.json")
        args.JSONOutput = False
        args.quiet = True
        args.colorized = False
        log = io.StringIO()
        # The script reports errors by printing them and calling sys.exit.
        try:
            with contextlib.redirect_stdout(log), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN classes
                predictions = [cse.getPrediction(gt, args) for gt in ground_truth]
                # evaluateImgLists' steps, less its unconditional write of matches.json to the
                # working directory.
                cse.setInstanceLabels(args)
                instances = cse.getGtInstances(ground_truth, args)
                matches = cse.matchGtWithPreds(predictions, ground_truth, instances, args)
                averages = cse.computeAverages(cse.evaluateMatches(matches, args), args)
        except SystemExit as exc:
            message = log.getvalue().strip().splitlines()
            raise ValueError(
                f"Cityscapes evaluation of {pred_dir} against {gt_dir} failed: "
                f"{message[-1] if message else exc}"
            ) from None

    metrics = {"AP": _percent(averages["allAp"]), "AP50": _percent(averages["allAp50%"])}
    for name in THING_NAMES:
        metrics[f"AP_{name}"] = _percent(averages["classes"][name]["ap"])
    return metrics


__all__ = [
    "LABEL_NAMES",
    "cityscapes_basename",
    "evaluate_cityscapes",
    "write_cityscapes_predictions",
]
