"""RefineMask's boundary pieces (spec §3.5, §3.6, §3.8) against loop references and
hand-made masks."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from instseg.configs import ConfigError, apply_overrides, get_config
from instseg.data.loader import pad_images
from instseg.modeling.detectors import TwoStageDetector
from instseg.modeling.features import FeatureSpec
from instseg.modeling.roi import SampledRoIs
from instseg.modeling.roi.refinemask import (
    RefineMaskHead,
    RefineMaskHeadConfig,
    bin_centre_sample,
    block_target,
    merge_stage_logits,
    merge_stages,
    refine_mask_loss,
    semantic_target,
)
from instseg.ops import roi_align


def _block_target_loops(mask: torch.Tensor, w: int) -> torch.Tensor:
    """§3.5 pixel by pixel: count the k x k window, outside the RoI as background."""
    n, h, wd = mask.shape
    k = 2 * w + 1
    out = torch.zeros(n, h, wd, dtype=torch.long)
    for b, y, x in itertools.product(range(n), range(h), range(wd)):
        fg_count = 0
        for dy, dx in itertools.product(range(-w, w + 1), range(-w, w + 1)):
            yy, xx = y + dy, x + dx
            if 0 <= yy < h and 0 <= xx < wd and mask[b, yy, xx]:
                fg_count += 1
        bg_count = k * k - fg_count
        if mask[b, y, x]:
            out[b, y, x] = 1 if bg_count > 0.1 * k * k else 2
        else:
            out[b, y, x] = 1 if fg_count > 0.1 * k * k else 0
    return out


@pytest.mark.parametrize("width", [1, 2, 3])
def test_block_target_matches_loop_reference(width):
    gen = torch.Generator().manual_seed(width)
    masks = torch.rand(3, 9, 11, generator=gen) > 0.5
    masks[0] = F.max_pool2d(masks[0][None].float(), 3, 1, 1)[0] > 0  # blobs, not noise
    assert torch.equal(block_target(masks, width), _block_target_loops(masks, width))


def test_block_target_on_hand_made_masks():
    square = torch.zeros(1, 5, 5)
    square[0, 1:4, 1:4] = 1
    expected = torch.ones(1, 5, 5, dtype=torch.long)
    expected[0, 2, 2] = 2  # the only pixel whose 3x3 window is all foreground
    assert torch.equal(block_target(square, 1), expected)

    # The RoI border: a full mask is boundary along its edges, outside counting as background.
    full = torch.ones(1, 5, 5)
    edge1 = torch.ones(1, 5, 5, dtype=torch.long)
    edge1[0, 1:4, 1:4] = 2
    assert torch.equal(block_target(full, 1), edge1)
    edge2 = torch.ones(1, 5, 5, dtype=torch.long)
    edge2[0, 2, 2] = 2  # width 2: pixel (1, 1) sees 9 outside pixels, (1, 2) sees 5
    assert torch.equal(block_target(full, 2), edge2)

    # Outside never counts as foreground: an empty mask has no band at all.
    assert torch.equal(
        block_target(torch.zeros(2, 6, 6), 2), torch.zeros(2, 6, 6, dtype=torch.long)
    )

    # Width 2 needs at least 3 of 25 (more than 2.5): two foreground pixels are not enough.
    dots = torch.zeros(1, 7, 7)
    dots[0, 1, 1] = dots[0, 1, 2] = 1
    assert block_target(dots, 2)[0, 3, 3] == 0
    dots[0, 1, 3] = 1
    assert block_target(dots, 2)[0, 3, 3] == 1
    # Width 1 needs one of 9.
    dot = torch.zeros(1, 5, 5)
    dot[0, 0, 0] = 1
    assert block_target(dot, 1)[0, 1, 1] == 1 and block_target(dot, 1)[0, 2, 2] == 0


def _upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x[:, None], size=(size, size), mode="bilinear", align_corners=True)[:, 0]


def test_merge_changes_only_pixels_in_the_width_1_band():
    gen = torch.Generator().manual_seed(0)
    coarse = F.avg_pool2d(torch.randn(4, 1, 18, 18, generator=gen), 5, 1)[:, 0] * 4  # (4, 14, 14)
    fine = torch.randn(4, 28, 28, generator=gen) * 3
    merged = merge_stage_logits(coarse, fine)
    band = _block_target_loops(coarse.sigmoid() >= 0.5, 1) == 1
    band_up = _upsample(band.float(), 28) >= 0.5
    assert band.any() and (~band).any()
    up = _upsample(coarse, 28)
    changed = merged != up
    assert not (changed & ~band_up).any()  # nothing outside the band moves
    assert torch.equal(merged[band_up], fine[band_up])  # the band takes the fine logits


def _disk_targets(sizes=(14, 28, 56, 112), n=3):
    """A disk per RoI (different centres and radii) rasterised at every stage size."""
    out = []
    for s in sizes:
        c = (torch.arange(s) + 0.5) / s
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        cx = torch.tensor([0.5, 0.4, 0.6])[:n, None, None]
        r = torch.tensor([0.3, 0.25, 0.35])[:n, None, None]
        out.append(((xx - cx) ** 2 + (yy - 0.5) ** 2 <= r**2).float())
    return out


def test_perfect_prediction_loses_less_than_a_shifted_one_at_every_stage():
    targets = _disk_targets()
    perfect = [(t * 2 - 1) * 6 for t in targets]
    shifted = [torch.roll(p, shifts=max(1, p.shape[-1] // 14), dims=-1) for p in perfect]
    for stage in range(4):
        weights = [1.0 if i == stage else 0.0 for i in range(4)]
        good = refine_mask_loss(perfect, targets, weights)
        bad = refine_mask_loss(shifted, targets, weights)
        assert good < bad, (stage, good.item(), bad.item())


def _loss_reference(preds, targets, weights, bw=2, start=1):
    """§3.6 step by step in float64, with the loop band."""
    total = 0.0
    prev = None
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        p, t = p.double(), t.double()
        bce = -(t * torch.log(torch.sigmoid(p)) + (1 - t) * torch.log(1 - torch.sigmoid(p)))
        if i <= start:
            loss = bce.mean()
            prev = torch.sigmoid(p) >= 0.5
        else:
            s = p.shape[-1]
            region = (_block_target_loops(prev, bw) == 1) | (
                _block_target_loops(targets[i - 1] > 0.5, bw) == 1
            )
            region = _upsample(region.double(), s) >= 0.5
            loss = bce[region].sum() / max(int(region.sum()), 1)
            band = _upsample((_block_target_loops(prev, 1) == 1).double(), s) >= 0.5
            merged = _upsample(preds[i - 1].double(), s)
            merged[band] = p[band]
            prev = torch.sigmoid(merged) >= 0.5
        total += weights[i] * loss.item()
    return total


def test_loss_matches_step_by_step_reference():
    gen = torch.Generator().manual_seed(3)
    targets = _disk_targets(sizes=(7, 14, 28, 56))
    preds = [(t * 2 - 1) * 2 + torch.randn(t.shape, generator=gen) * 2 for t in targets]
    weights = [0.25, 0.5, 0.75, 1.0]
    ours = refine_mask_loss(preds, targets, weights)
    assert ours.item() == pytest.approx(_loss_reference(preds, targets, weights), rel=1e-5)


def test_loss_reaches_every_stage_and_checks_lengths():
    targets = _disk_targets(sizes=(7, 14, 28, 56))
    preds = [torch.zeros(t.shape, requires_grad=True) for t in targets]
    refine_mask_loss(preds, targets, [0.25, 0.5, 0.75, 1.0]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in preds)
    with pytest.raises(ValueError, match="one target and one weight"):
        refine_mask_loss(preds, targets[:3], [1.0] * 4)


# ------------------------------------------------------------------------------- the head
# Shapes from the spec table (§3.3), each stage's wiring against the spec's steps written
# out with plain convolutions, the semantic target against its block-average identity, and
# the detector-level properties (gradients, batch and chunk invariance).


def _head(variant="refinemask", width=256, classes=80, **kw):
    cfg = RefineMaskHeadConfig(variant=variant, conv_channels=width, **kw)
    return RefineMaskHead(cfg, classes, width, FeatureSpec("p2", width, 4))


def _head_inputs(n=3, width=256, p2_size=(24, 32), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    roi_feats = torch.rand(n, width, 14, 14, generator=gen, dtype=dtype)
    p2 = torch.rand(2, width, *p2_size, generator=gen, dtype=dtype)
    rois = torch.tensor(
        [[0, 4.0, 8.0, 60.0, 50.0], [1, 30.0, 2.0, 120.0, 90.0], [0, 0.0, 0.0, 127.0, 95.0]],
        dtype=dtype,
    )[:n]
    labels = torch.tensor([3, 0, 79])[:n]
    return roi_feats, p2, rois, labels


def _stage_outputs(head, *inputs):
    outputs = []
    hooks = [s.register_forward_hook(lambda m, i, o: outputs.append(o)) for s in head.stages]
    stage_logits, semantic_logits = head(*inputs)
    for h in hooks:
        h.remove()
    return stage_logits, semantic_logits, outputs


def test_stage_sizes_and_channels_follow_the_spec_table():
    head = _head()
    stage_logits, semantic_logits, outputs = _stage_outputs(head, *_head_inputs())
    assert [tuple(s.shape) for s in stage_logits] == [(3, s, s) for s in (14, 28, 56, 112)]
    assert semantic_logits.shape == (2, 1, 24, 32)
    # (stage logits at S_k, features at 2 S_k with C_k / 2 channels: 128, 64, 32)
    assert [tuple(o[1].shape) for o in outputs] == [
        (3, 128, 28, 28),
        (3, 64, 56, 56),
        (3, 32, 112, 112),
    ]
    assert [s.fuse_conv[0].in_channels for s in head.stages] == [514, 258, 130]
    assert [s.semantic_transform_in.out_channels for s in head.stages] == [256, 128, 64]
    assert [s.fuse_transform_out.out_channels for s in head.stages] == [126, 62, 30]
    assert head.final_instance_logits.in_channels == 32
    assert head.final_instance_logits.out_channels == 80


def test_faster_better_sizes_and_channels():
    head = _head("faster_better", class_agnostic_last_stage=True)
    stage_logits, semantic_logits, outputs = _stage_outputs(head, *_head_inputs())
    assert semantic_logits is None and not hasattr(head, "semantic_logits")
    assert [tuple(s.shape) for s in stage_logits] == [(3, s, s) for s in (14, 28, 56, 112)]
    # The last stage is not upsampled: its logits are computed at 56 and resized.
    assert [tuple(o.shape) for o in outputs] == [(3, 128, 28, 28), (3, 64, 56, 56), (3, 32, 56, 56)]
    assert [c.out_channels for c in head.stage_instance_logits] == [80, 80, 80, 1]
    assert [s.fuse_conv[0].in_channels for s in head.stages] == [513, 257, 129]


def _conv(x, conv):
    return F.conv2d(x, conv.weight, conv.bias, padding=conv.padding, dilation=conv.dilation)


def _branch_convs(head, roi_feats, p2):
    """The instance and semantic conv stacks (3x3 conv + ReLU each), before the stages."""
    x, sem_feat = roi_feats, p2
    for conv in head.instance_convs:
        x = F.relu(_conv(x, conv.conv))
    for conv in head.semantic_convs:
        sem_feat = F.relu(_conv(sem_feat, conv.conv))
    return x, sem_feat


def _spec_sfm_stage(stage, x, semantic_feat, semantic_logits, rois, labels):
    """§3.3 steps 1-11 with plain convolutions and explicit label selection."""
    size = x.shape[-1]
    sem = F.relu(_conv(semantic_feat, stage.semantic_transform_in))  # 1
    ins_sem = roi_align(sem, rois, size, 0.25, 0, True)  # 2
    ins_sem = F.relu(_conv(ins_sem, stage.semantic_transform_out))
    all_logits = _conv(x, stage.instance_logits)  # 3
    pred = torch.stack([all_logits[i, labels[i]] for i in range(len(labels))])[:, None]
    ins_mask = pred.sigmoid()  # 4
    sem_mask = roi_align(semantic_logits.sigmoid(), rois, size, 0.25, 0, True)  # 5
    y = torch.cat([x, ins_sem, ins_mask, sem_mask], 1)  # 6
    y = F.relu(_conv(y, stage.fuse_conv[0]))  # 7
    mbf = stage.fuse_conv[1]
    branches = [F.relu(_conv(y, getattr(mbf, f"dilation_conv_{i}").conv)) for i in (1, 2, 3)]
    y = F.relu(_conv(branches[0] + branches[1] + branches[2], mbf.merge_conv.conv))
    y = F.relu(_conv(y, stage.fuse_transform_out))  # 8
    y = F.relu(F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False))  # 9
    up = [
        F.interpolate(m, size=2 * size, mode="bilinear", align_corners=True)
        for m in (ins_mask, sem_mask)
    ]
    return pred[:, 0], torch.cat([y, *up], 1)  # 10, 11


def test_sfm_stage_follows_the_spec_steps():
    torch.manual_seed(0)
    head = _head(width=32, classes=5).double()
    roi_feats, p2, rois, _ = _head_inputs(width=32, dtype=torch.float64)
    labels = torch.tensor([3, 0, 4])
    semantic = head.semantic(p2)
    x, sem_feat = _branch_convs(head, roi_feats, p2)
    sem_logits = _conv(sem_feat, head.semantic_logits)
    torch.testing.assert_close(semantic.logits, sem_logits)
    ours = head.instances(roi_feats, semantic, rois, labels)
    for k, stage in enumerate(head.stages):
        pred, x = _spec_sfm_stage(stage, x, sem_feat, sem_logits, rois, labels)
        torch.testing.assert_close(ours[k], pred)
    final = _conv(x, head.final_instance_logits)
    torch.testing.assert_close(ours[3], torch.stack([final[i, labels[i]] for i in range(3)]))


def _bin_centre_loops(feat, rois, size, scale):
    """One bilinear sample per bin centre, zero outside the map, pixel by pixel (float64)."""
    k, c = rois.shape[0], feat.shape[1]
    h, w = feat.shape[-2:]
    out = torch.zeros(k, c, size, size, dtype=torch.float64)
    for r in range(k):
        b, x1, y1, x2, y2 = rois[r].tolist()
        for i, j in itertools.product(range(size), range(size)):
            y = (y1 + (i + 0.5) * (y2 - y1) / size) * scale - 0.5
            x = (x1 + (j + 0.5) * (x2 - x1) / size) * scale - 0.5
            y0, x0 = math.floor(y), math.floor(x)
            for yy, xx in itertools.product((y0, y0 + 1), (x0, x0 + 1)):
                if 0 <= yy < h and 0 <= xx < w:
                    weight = (1 - abs(y - yy)) * (1 - abs(x - xx))
                    out[r, :, i, j] += weight * feat[int(b), :, yy, xx].double()
    return out


def test_bin_centre_sample_matches_loop_reference():
    gen = torch.Generator().manual_seed(3)
    feat = torch.rand(2, 3, 9, 12, generator=gen, dtype=torch.float64)
    # Inside, across the border (zero padding) and a degenerate box.
    rois = torch.tensor(
        [
            [0, 4.0, 3.0, 30.0, 20.0],
            [1, -6.0, -5.0, 20.0, 44.0],
            [1, 40.0, 30.0, 52.0, 40.0],
            [0, 8.0, 8.0, 8.0, 8.0],
        ],
        dtype=torch.float64,
    )
    ours = bin_centre_sample(feat, rois, 5, 0.25)
    torch.testing.assert_close(ours, _bin_centre_loops(feat, rois, 5, 0.25))
    assert bin_centre_sample(feat, rois[:0], 5, 0.25).shape == (0, 3, 5, 5)


def test_faster_better_stage_follows_the_spec():
    torch.manual_seed(1)
    head = _head("faster_better", width=32, classes=5, class_agnostic_last_stage=True).double()
    roi_feats, p2, rois, _ = _head_inputs(width=32, dtype=torch.float64)
    labels = torch.tensor([3, 0, 4])
    x, sem_feat = _branch_convs(head, roi_feats, p2)
    ours = head.instances(roi_feats, head.semantic(p2), rois, labels)
    for k, stage in enumerate(head.stages):
        all_logits = _conv(x, head.stage_instance_logits[k])
        pred = torch.stack([all_logits[i, labels[i]] for i in range(3)])
        torch.testing.assert_close(ours[k], pred)
        size = x.shape[-1]
        sem = F.relu(_conv(sem_feat, stage.semantic_transform_in))
        ins_sem = _bin_centre_loops(sem, rois, size, 0.25)
        y = torch.cat([x, ins_sem, pred.sigmoid()[:, None]], 1)
        y = F.relu(_conv(y, stage.fuse_conv[0]))
        mbf = stage.fuse_conv[1]
        branches = [F.relu(_conv(y, getattr(mbf, f"dilation_conv_{i}").conv)) for i in (1, 2, 3)]
        total = branches[0] + branches[1] + branches[2] + y.mean(dim=(2, 3), keepdim=True)
        y = F.relu(_conv(total, mbf.merge_conv.conv))
        y = torch.cat([F.relu(_conv(y, stage.fuse_transform_out)), pred.sigmoid()[:, None]], 1)
        if k < 2:
            y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        x = y
    final = _conv(x, head.stage_instance_logits[3])[:, 0]  # class-agnostic
    final = F.interpolate(final[:, None], size=112, mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(ours[3], final)


def test_class_agnostic_last_stage_uses_channel_0_for_every_label():
    torch.manual_seed(0)
    head = _head(width=32, classes=5, class_agnostic_last_stage=True)
    roi_feats, p2, rois, _ = _head_inputs(width=32)
    labels = torch.tensor([3, 0, 4])
    stage_logits, _, outputs = _stage_outputs(head, roi_feats, p2, rois, labels)
    assert head.final_instance_logits.out_channels == 1
    last_feats = outputs[-1][1]
    torch.testing.assert_close(stage_logits[3], _conv(last_feats, head.final_instance_logits)[:, 0])
    assert [s.instance_logits.out_channels for s in head.stages] == [5, 5, 5]


def test_merge_stages_drops_stage_0_and_cascades():
    gen = torch.Generator().manual_seed(5)
    stages = [torch.randn(2, s, s, generator=gen) * 3 for s in (14, 28, 56, 112)]
    merged = merge_stages(stages)
    expected = merge_stage_logits(merge_stage_logits(stages[1], stages[2]), stages[3])
    assert torch.equal(merged, expected)
    assert torch.equal(merge_stages([torch.zeros(2, 14, 14), *stages[1:]]), merged)
    # Not the plain last stage: the cascade keeps coarse logits off the band.
    assert not torch.equal(merged, stages[3])


def test_semantic_target_is_the_union_resized_by_block_average():
    gen = torch.Generator().manual_seed(2)
    masks = [
        torch.rand(3, 30, 37, generator=gen) > 0.7,
        torch.rand(2, 40, 24, generator=gen) > 0.4,
        torch.zeros(0, 20, 20, dtype=torch.bool),
    ]
    target = semantic_target(masks, (40, 48), (10, 12))
    assert target.shape == (3, 10, 12) and target.dtype == torch.bool
    for b, image_masks in enumerate(masks):
        union = torch.zeros(40, 48)
        h, w = image_masks.shape[-2:]
        for m in image_masks:
            union[:h, :w] = torch.maximum(union[:h, :w], m.float())
        for i, j in itertools.product(range(10), range(12)):
            # Bilinear at 1/4 (align_corners=False) samples 4i + 1.5: the mean of a 2 x 2 block.
            block = union[4 * i + 1 : 4 * i + 3, 4 * j + 1 : 4 * j + 3]
            assert bool(target[b, i, j]) == bool(block.mean() >= 0.5), (b, i, j)
    assert not target[2].any()
    with pytest.raises(ValueError, match="do not fit"):
        semantic_target([torch.zeros(1, 50, 10, dtype=torch.bool)], (40, 48), (10, 12))


def _refinemask_detector(variant="refinemask", chunk=100, seed=0):
    from test_models import tiny_config

    cfg = tiny_config()
    cfg.roi_head.mask_head = RefineMaskHeadConfig(
        variant=variant,
        conv_channels=32,
        test_chunk_size=chunk,
        class_agnostic_last_stage=variant == "faster_better",
    )
    torch.manual_seed(seed)
    return TwoStageDetector(cfg, num_classes=3)


def test_gradients_reach_the_semantic_head_from_both_losses():
    from test_models import toy_batch

    model = _refinemask_detector()
    images, targets = toy_batch()
    losses = model(images, targets)
    assert {"loss_mask", "loss_semantic"} <= set(losses)
    head = model.roi_head.mask_head
    semantic_params = [head.semantic_convs[0].conv.weight, head.semantic_logits.weight]
    # The instance loss alone reaches the semantic convs and logits (through the pooled
    # semantic features and masks of every stage) ...
    grads = torch.autograd.grad(losses["loss_mask"], semantic_params, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)
    # ... and the semantic loss reaches them but not the instance branch.
    grads = torch.autograd.grad(
        losses["loss_semantic"],
        [*semantic_params, head.instance_convs[0].conv.weight],
        allow_unused=True,
    )
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    assert grads[2] is None or grads[2].abs().sum() == 0


@pytest.mark.parametrize("variant", ["refinemask", "faster_better"])
def test_detector_with_refinemask_trains(variant):
    from test_models import toy_batch

    model = _refinemask_detector(variant)
    images, targets = toy_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(10):
        losses = model(images, targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)
        optimizer.step()
        history.append(float(total.detach()))
    expected = {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"}
    assert set(losses) == expected | ({"loss_semantic"} if variant == "refinemask" else set())
    assert all(math.isfinite(h) for h in history)
    assert sum(history[-3:]) / 3 < 0.5 * sum(history[:3]) / 3


def test_no_positive_rois_still_gives_a_semantic_loss():
    from test_models import toy_batch

    model = _refinemask_detector()
    images, targets = toy_batch()
    head = model.roi_head
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    gt = [torch.zeros(0, dtype=torch.long)] * 2
    sampled = SampledRoIs(empty, torch.zeros(0, dtype=torch.long), 3, empty, gt, empty)
    feats = model.features(images)
    losses = head.mask_head.loss(feats, head.mask_roi_extractor, sampled, targets)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_semantic"].item() > 0
    (losses["loss_mask"] + losses["loss_semantic"]).backward()


def _four_images():
    """Four images of different sizes that all pad to 64 x 96, alone or together."""
    sizes = [(64, 96), (50, 70), (60, 90), (40, 80)]
    gen = torch.Generator().manual_seed(7)
    images = []
    for h, w in sizes:
        image = torch.zeros(3, h, w, dtype=torch.float64)
        for _ in range(3):  # a few bright rectangles to detect
            y, x = (
                torch.randint(0, h - 16, (1,), generator=gen),
                torch.randint(0, w - 16, (1,), generator=gen),
            )
            image[:, y : y + 16, x : x + 20] = (
                torch.rand(3, 1, 1, generator=gen, dtype=torch.float64) * 3
            )
        images.append(image)
    return images, sizes


@pytest.mark.parametrize("variant", ["refinemask", "faster_better"])
def test_batch_sizes_1_2_4_and_chunking_give_the_same_outputs(variant):
    """Padding is the same for every grouping here, so each image's detections and masks
    must not depend on which images share its batch or on the test-time RoI chunking. (With
    different padded sizes, any CNN's border features change; that is not the head's doing.)"""
    model = _refinemask_detector(variant, chunk=100).double().eval()
    images, sizes = _four_images()

    def run(group, chunk):
        model.roi_head.cfg.mask_head.test_chunk_size = chunk
        batch = pad_images([images[i] for i in group])
        assert batch.tensor.shape[-2:] == (64, 96)
        return model.predict(batch)

    alone = [run([i], 100)[0] for i in range(4)]
    assert sum(len(r) for r in alone) > 20  # enough detections for chunking to matter
    for groups, chunk in (([[0, 1], [2, 3]], 100), ([[0, 1, 2, 3]], 100), ([[0, 1, 2, 3]], 7)):
        results = [r for g in groups for r in run(g, chunk)]
        for i, (ours, ref) in enumerate(zip(results, alone, strict=True)):
            assert len(ours) == len(ref), (groups, chunk, i)
            torch.testing.assert_close(ours.boxes, ref.boxes, rtol=0, atol=1e-8)
            torch.testing.assert_close(ours.scores, ref.scores, rtol=0, atol=1e-10)
            assert torch.equal(ours.labels, ref.labels)
            assert ours.masks.shape == (len(ref), *sizes[i])
            assert torch.equal(ours.masks, ref.masks), (groups, chunk, i)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"mask_head\.stage_sizes"):
        RefineMaskHeadConfig(stage_sizes=(14, 28, 60))
    with pytest.raises(ValueError, match=r"mask_head\.stage_loss_weights"):
        RefineMaskHeadConfig(stage_loss_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"mask_head\.variant"):
        RefineMaskHeadConfig(variant="fast")
    with pytest.raises(ValueError, match=r"mask_head\.conv_channels"):
        RefineMaskHeadConfig(conv_channels=24)
    with pytest.raises(ConfigError, match=r"mask_head: unknown choice 'pointrend'.*fcn"):
        apply_overrides(
            get_config("mask_rcnn_r18_fpn_small"), ["model.roi_head.mask_head=pointrend"]
        )
    from test_models import tiny_config

    # Widths and the first stage's size come from the neck and the head: nothing to match.
    cfg = tiny_config()
    cfg.roi_head.mask_head = RefineMaskHeadConfig(
        conv_channels=32, stage_sizes=(7, 14, 28), stage_loss_weights=(1.0, 1.0, 1.0)
    )
    head = TwoStageDetector(cfg, num_classes=3).roi_head
    assert head.mask_roi_extractor.output_size == 7
    assert head.mask_head.instance_convs[0].conv.in_channels == 32
    cfg.roi_head.mask_head = RefineMaskHeadConfig(conv_channels=32, semantic_level="p9")
    with pytest.raises(
        ValueError, match=r"mask_head\.semantic_level names feature levels \['p9'\]"
    ):
        TwoStageDetector(cfg, num_classes=3)
