"""Full-size models against mmdetection 3.3 with identical weights: the numbers quoted in the
README (CondInst R-50, Cascade Mask R-CNN R-50, Grid R-CNN R-50).

``REF`` is a folder written by ``tests/fixtures/{condinst,cascade,grid}_mmdet/make_fixture.py --full
REF`` in the mmdetection environment: mmdet's randomised model of one config
(``<prefix>_state.safetensors``, mmdet's key names), one padded input image and mmdet's
detections in the original frame. This script loads the weights into our config of the same
name (strictly, key for key), predicts on the same input and prints the largest box, score
differences, label agreement and the mask IoU of each detection with mmdet's.

    python benchmarks/mmdet_parity.py REF
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from instseg.configs import get_config
from instseg.runner import build_model
from instseg.structures import ImageBatch, ImageInfo

CONFIGS = {
    "condinst_r50": "condinst_r50_fpn_ms-poly-90k_coco_instance",
    "cascade_r50": "cascade_mask_rcnn_r50_fpn_1x_coco",
    "grid_r50": "grid_rcnn_r50_fpn_gn-head_2x_coco",
}


def rle_decode(counts: torch.Tensor, lens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The fixture's masks: row-major run lengths (zeros first), ``lens[k]`` runs per mask."""
    out, offset = [], 0
    for n in lens.tolist():
        runs = counts[offset : offset + n].numpy()
        offset += n
        out.append(np.repeat(np.arange(n) % 2, runs).reshape(h, w))
    return torch.from_numpy(np.stack(out).astype(bool)) if out else torch.zeros(0, h, w, dtype=bool)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", type=Path)
    args = parser.parse_args(argv)
    states = sorted(args.ref.glob("*_state.safetensors"))
    if len(states) != 1:
        print(f"error: expected one *_state.safetensors in {args.ref}", file=sys.stderr)
        return 2
    prefix = states[0].name[: -len("_state.safetensors")]
    if prefix not in CONFIGS:
        print(f"error: no config for {prefix!r}; known: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    meta = json.loads((args.ref / f"{prefix}_meta.json").read_text())
    state = load_file(states[0])
    io = load_file(args.ref / f"{prefix}_io.safetensors")
    inputs = load_file(args.ref / "inputs.safetensors")["inputs_x32"].float() / 32

    cfg = get_config(CONFIGS[prefix])
    model = build_model(cfg, 80)
    model.load_state_dict(state, strict=True)
    model.eval()
    metas = meta["img_metas"]
    sizes = [tuple(m["img_shape"]) for m in metas]
    infos = [
        ImageInfo(
            i, "", tuple(m["ori_shape"]), tuple(m["img_shape"]), tuple(m["scale_factor"])[::-1]
        )
        for i, m in enumerate(metas)
    ]
    with torch.no_grad():
        results = model.predict(ImageBatch(inputs, sizes), infos)
    print(f"mmdet {meta['versions']['mmdet']}, {len(state)} tensors loaded key for key")
    for i, (res, m) in enumerate(zip(results, metas, strict=True)):
        boxes, scores = io[f"det_boxes.{i}"], io[f"det_scores.{i}"]
        labels = io[f"det_labels.{i}"]
        n = min(len(res), len(scores))
        print(f"image {i}: {len(res)} detections (mmdet {len(scores)})")
        print(f"  max |box diff| {(res.boxes[:n] - boxes[:n]).abs().max().item():.2e} px")
        print(f"  max |score diff| {(res.scores[:n] - scores[:n]).abs().max().item():.2e}")
        print(f"  labels equal: {torch.equal(res.labels[:n], labels[:n])}")
        key = f"det_masks.{i}"
        if key + "_rle_counts" not in io:
            continue  # a box-only model
        h, w = m["ori_shape"]
        expected = rle_decode(io[key + "_rle_counts"], io[key + "_rle_lens"], h, w)[:n]
        inter = (res.masks[:n] & expected).flatten(1).sum(1).double()
        union = (res.masks[:n] | expected).flatten(1).sum(1).double()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        flipped = (res.masks[:n] ^ expected).flatten(1).sum(1)
        print(
            f"  mask IoU min {iou.min().item():.4f}, mean {iou.mean().item():.4f}; "
            f"{int((iou < 0.99).sum())} masks below 0.99, {int(flipped.sum())} pixels differ "
            f"in all, at most {int(flipped.max()) if n else 0} in one mask"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
