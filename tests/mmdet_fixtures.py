"""Reading the mmdetection reference fixtures (``fixtures/*_mmdet``): the weights, inputs
and outputs of a fixture, run-length-encoded masks and the image metas of their two-image
batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from instseg.structures import ImageBatch, ImageInfo

FIXTURES = Path(__file__).parent / "fixtures"


def load_mmdet_fixture(
    name: str, model: nn.Module, inputs_from: str | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Load ``fixtures/<name>_mmdet/<name>_state.safetensors`` into ``model`` key for key
    (strict, and the key sets must be equal) and return ``(inputs, io, meta)``: the padded
    two-image batch (from ``fixtures/<inputs_from>/inputs.safetensors``, default the
    fixture's own folder), what mmdet computed and the image metas. Skips the test when the
    fixture is absent."""
    folder = FIXTURES / f"{name}_mmdet"
    state_path = folder / f"{name}_state.safetensors"
    if not state_path.is_file():
        pytest.skip(f"mmdet {name} fixture absent")
    state = load_file(state_path)
    assert set(model.state_dict()) == set(state), set(model.state_dict()) ^ set(state)
    model.load_state_dict(state, strict=True)
    inputs_folder = FIXTURES / inputs_from if inputs_from else folder
    inputs = load_file(inputs_folder / "inputs.safetensors")["inputs_x32"].float() / 32
    io = load_file(folder / f"{name}_io.safetensors")
    meta = json.loads((folder / f"{name}_meta.json").read_text())
    return inputs, io, meta


def rle_decode(counts: torch.Tensor, lens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Row-major run lengths (zeros first), one run list of ``lens[k]`` entries per mask."""
    out, offset = [], 0
    for n in lens.tolist():
        runs = counts[offset : offset + n].numpy()
        offset += n
        out.append(np.repeat(np.arange(n) % 2, runs).reshape(h, w))
    return torch.from_numpy(np.stack(out).astype(bool)) if out else torch.zeros(0, h, w, dtype=bool)


def mmdet_batch(inputs: torch.Tensor, meta: dict):
    sizes = [tuple(m["img_shape"]) for m in meta["img_metas"]]
    infos = []
    for i, m in enumerate(meta["img_metas"]):
        sx, sy = m["scale_factor"]
        infos.append(ImageInfo(i, "", tuple(m["ori_shape"]), tuple(m["img_shape"]), (sy, sx)))
    return ImageBatch(inputs, sizes), infos


def assert_detections_equal(results, ref: dict, metas: list[dict]) -> None:
    """mmdet's detections per image (``det_*.{i}`` of ``ref``, original frame): 100 each,
    scores within 1e-4, boxes within 1e-2 px, same labels, and, where ``ref`` has masks,
    every mask's IoU with mmdet's above 0.99 (two empty masks count as equal)."""
    for i, (res, m) in enumerate(zip(results, metas, strict=True)):
        assert len(res) == len(ref[f"det_scores.{i}"]) == 100
        torch.testing.assert_close(res.scores, ref[f"det_scores.{i}"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(res.boxes, ref[f"det_boxes.{i}"], rtol=0, atol=1e-2)
        assert torch.equal(res.labels, ref[f"det_labels.{i}"])
        key = f"det_masks.{i}"
        if key + "_rle_counts" not in ref:
            continue
        h, w = m["ori_shape"]
        expected = rle_decode(ref[key + "_rle_counts"], ref[key + "_rle_lens"], h, w)
        assert res.masks.shape == expected.shape
        inter = (res.masks & expected).flatten(1).sum(1).double()
        union = (res.masks | expected).flatten(1).sum(1).double()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        assert iou.min().item() > 0.99, iou.min().item()
