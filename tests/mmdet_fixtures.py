"""Reading the mmdetection reference fixtures (``fixtures/*_mmdet``): run-length-encoded
masks and the image metas of their two-image batch."""

from __future__ import annotations

import numpy as np
import torch

from instseg.structures import ImageBatch, ImageInfo


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
