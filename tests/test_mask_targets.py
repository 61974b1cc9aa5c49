"""Mask targets: ``crop_and_resize`` (separable RoIAlign of single-channel masks) against the
brute-force float64 RoIAlign loop of ``test_roi_align``, and the backbone's channels-last
layout against NCHW on a whole model."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from instseg.configs import apply_overrides, get_config
from instseg.modeling.roi.mask_branch import crop_and_resize, crop_mask_targets
from instseg.runner import build_model
from instseg.structures import ImageBatch, ImageInfo, InstanceTargets
from test_roi_align import ref_roi_align

mask_branch = importlib.import_module("instseg.modeling.roi.mask_branch")


def random_masks_and_boxes(
    seed: int, n_masks: int = 4, n_boxes: int = 12, h: int = 37, w: int = 53
):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n_masks, h, w, generator=g) > 0.6
    xy = torch.rand(n_boxes, 2, generator=g, dtype=torch.float64) * torch.tensor([w - 4.0, h - 4.0])
    size = torch.rand(n_boxes, 2, generator=g, dtype=torch.float64) * torch.tensor(
        [w * 0.9, h * 0.9]
    )
    boxes = torch.cat([xy, (xy + size).minimum(torch.tensor([w * 1.0, h * 1.0]))], 1)
    # Edge cases: a point box, a zero-height box, the whole mask, a box on the last pixel.
    boxes[0] = torch.tensor([5.0, 6.0, 5.0, 6.0])
    boxes[1] = torch.tensor([3.0, 9.0, 20.0, 9.0])
    boxes[2] = torch.tensor([0.0, 0.0, w * 1.0, h * 1.0])
    boxes[3] = torch.tensor([w - 1.0, h - 1.0, w * 1.0, h * 1.0])
    index = torch.randint(0, n_masks, (n_boxes,), generator=g)
    return masks, index, boxes


@pytest.mark.parametrize("size", [7, 28])
@pytest.mark.parametrize("seed", [0, 1])
def test_crop_and_resize_matches_brute_force_roi_align(size, seed):
    masks, index, boxes = random_masks_and_boxes(seed)
    got = crop_and_resize(masks, index, boxes, size)
    rois = torch.cat([index[:, None].double(), boxes], 1)
    want, _ = ref_roi_align(masks[:, None].double().numpy(), rois.numpy(), size, 1.0, 0, True)
    np.testing.assert_allclose(got.numpy(), np.asarray(want)[:, 0], rtol=0, atol=1e-12)
    assert got.dtype == torch.float64 and got.shape == (12, size, size)
    assert got[2].sum() > 0  # the whole-mask box reads the mask


def test_crop_and_resize_chunks_give_the_same_result(monkeypatch):
    masks, index, boxes = random_masks_and_boxes(2, n_boxes=40)
    whole = crop_and_resize(masks, index, boxes, 14)
    monkeypatch.setattr(mask_branch, "_CROP_WINDOW_BUDGET", 50)  # about one RoI per chunk
    # Chunks pad their windows to other widths, and a BLAS may block the sums differently
    # for them (bit-equal on the Intel machines, 1 ulp apart on AMD EPYC).
    torch.testing.assert_close(crop_and_resize(masks, index, boxes, 14), whole, rtol=0, atol=1e-14)


def test_crop_mask_targets_float32_agree_with_float64():
    masks, index, boxes = random_masks_and_boxes(3, n_boxes=30, h=64, w=80)
    target = InstanceTargets(boxes.float(), torch.zeros(4, dtype=torch.long), masks)
    (t32,) = crop_mask_targets([boxes.float()], [index], [target], (28,))
    exact = crop_and_resize(masks, index, boxes, 28)
    # Binarised at 0.5: only values within float32 rounding of 0.5 may differ.
    differ = t32 != (exact >= 0.5)
    if differ.any():
        assert (exact[differ] - 0.5).abs().max().item() < 1e-5
    assert t32.dtype == torch.bool and t32.shape == (30, 28, 28)


def test_channels_last_matches_nchw():
    cfg = apply_overrides(get_config("mask_rcnn_r18_fpn_small"), ["model.roi_head.score_thr=0.01"])
    g = torch.Generator().manual_seed(0)
    images = ImageBatch(torch.randn(2, 3, 96, 128, generator=g), [(96, 128), (90, 120)])
    boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 110.0, 80.0]])
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[0, 12:70, 10:60] = masks[1, 20:80, 50:110] = True
    targets = [InstanceTargets(boxes, torch.tensor([0, 2]), masks)] * 2
    infos = [ImageInfo(i, "", (96, 128), s) for i, s in enumerate(images.image_sizes)]
    outputs = {}
    for channels_last in (False, True):
        cfg.model.backbone.channels_last = channels_last
        torch.manual_seed(0)
        model = build_model(cfg, 3)
        feats = model.features(images)
        assert feats["p2"].is_contiguous(memory_format=torch.channels_last) == channels_last
        head_inputs = []
        model.roi_head.mask_head.convs[0].register_forward_pre_hook(
            lambda _, args, seen=head_inputs: seen.append(args[0])
        )
        torch.manual_seed(1)
        losses = model(images, targets)
        model.eval()
        with torch.no_grad():
            dets = model.predict(images, infos)
        outputs[channels_last] = (losses, dets)
        # The RoI features keep the maps' layout, so the mask head's convs run in it too.
        assert len(head_inputs) == 2 and all(
            x.is_contiguous(memory_format=torch.channels_last) == channels_last for x in head_inputs
        )
    (l0, d0), (l1, d1) = outputs[False], outputs[True]
    assert l0.keys() == l1.keys()
    for key in l0:
        torch.testing.assert_close(l1[key], l0[key], rtol=1e-4, atol=1e-5)
    for a, b in zip(d0, d1, strict=True):
        assert len(a) > 0
        torch.testing.assert_close(b.boxes, a.boxes, rtol=1e-4, atol=1e-3)
        assert torch.equal(b.labels, a.labels)
