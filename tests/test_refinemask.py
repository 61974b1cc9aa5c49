"""RefineMask's boundary pieces (spec §3.5, §3.6, §3.8) against loop references and
hand-made masks."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from instseg.modeling.roi.refinemask import block_target, merge_stage_logits, refine_mask_loss


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
