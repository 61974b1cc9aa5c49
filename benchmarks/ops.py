"""Speed of instseg's operators, side by side with torchvision's where those load.

Times forward and forward+backward of roi_align (7x7 and 14x14, sampling 0 and 2), roi_pool
and prroi_pool2d for 512 RoIs on a 256-channel 200x272 map (stride 4 of an 800x1088 image),
the same RoIs pooled from FPN levels P2-P5 with the level mapping of spec §1.2; NMS on 5000
boxes, 80 classes, 10 groups and the RPN's per-image case; paste_masks_in_image for 300
masks on an 800x1333 image. Where ``torchvision.ops`` loads (its CPU kernels load in the
torchvision environment of ``shared/DESIGN.md``, not with our CPU torch; its CUDA kernels on
a GPU machine), the same calls go through torchvision in the same run: the table shows
ours/theirs time and the max abs difference (for NMS: 0 when the kept boxes are the same).
Writes the rows as JSON with ``--json``.

    python benchmarks/ops.py [--device cpu|cuda|all] [--repeat N] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from _timing import median_seconds
from instseg import ops

STRIDES = (4, 8, 16, 32)
IMAGE_H, IMAGE_W = 800, 1088


@dataclass
class Row:
    device: str
    case: str
    pass_: str
    ours_ms: float
    ref_ms: float | None
    ratio: float | None
    max_abs_diff: float | None


def load_torchvision():
    """torchvision.ops if its compiled ops run here, else None (with the reason printed)."""
    try:
        import torchvision

        x = torch.zeros(1, 1, 4, 4)
        torchvision.ops.roi_align(x, torch.tensor([[0.0, 0, 0, 2, 2]]), 2)
        return torchvision.ops
    except Exception as exc:  # import errors and "operator torchvision::... does not exist"
        print(f"torchvision.ops unavailable ({type(exc).__name__}: {str(exc)[:80]})")
        return None


def timeit(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after one warm-up call."""
    return median_seconds(fn, device, repeat) * 1e3


def random_rois(n: int, batch: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """RoIs with log-uniform sizes between 16 and 512 pixels, centres inside the image."""
    g = torch.Generator().manual_seed(seed)
    size = torch.exp(torch.empty(n, 2).uniform_(math.log(16), math.log(512), generator=g))
    centre = torch.rand(n, 2, generator=g) * torch.tensor([IMAGE_W, IMAGE_H])
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
    batch_idx = torch.randint(0, batch, (n, 1), generator=g).float()
    return torch.cat([batch_idx, boxes], 1).to(device)


def fpn_levels(rois: torch.Tensor) -> torch.Tensor:
    """Spec §1.2: floor(log2(sqrt(area) / 56 + 1e-6)) clamped to [0, 3]."""
    scale = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).sqrt()
    return torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, 3).long()


def multi_level(pool: Callable, feats: list[torch.Tensor], rois: torch.Tensor, size: int):
    """Pool each RoI from its FPN level only (SingleRoIExtractor)."""
    levels = fpn_levels(rois)
    out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], size, size)
    for level, feat in enumerate(feats):
        idx = torch.where(levels == level)[0]
        if idx.numel():
            out[idx] = pool(feat, rois[idx], 1.0 / STRIDES[level])
    return out


def same_kept(ours: list[torch.Tensor], theirs: list[torch.Tensor], scores) -> bool:
    """Same kept boxes in the same score order; boxes of tied scores may come in any order
    (torchvision's sort is not stable, ours breaks ties by index)."""
    for a, b, s in zip(ours, theirs, scores, strict=True):
        if not (set(a.tolist()) == set(b.tolist()) and torch.equal(s[a], s[b])):
            return False
    return True


def rpn_nms_inputs(nms_pre: int, device: torch.device, seed: int):
    """What the RPN gives ``batched_nms`` for one 800x1344 image: per FPN level P2-P6 the top
    ``nms_pre`` anchors (3 ratios, 8 strides wide) decoded with small deltas, scored high
    near 12 random objects as a trained RPN does, and their level as the group."""
    g = torch.Generator().manual_seed(seed)
    size = torch.exp(torch.empty(12, 2).uniform_(math.log(32), math.log(400), generator=g))
    centre = torch.rand(12, 2, generator=g) * torch.tensor([1344.0, 800.0])
    objects = torch.cat([centre - size / 2, centre + size / 2], 1)
    boxes, scores, levels = [], [], []
    for level, stride in enumerate((4, 8, 16, 32, 64)):
        ys, xs = torch.meshgrid(
            torch.arange(0, 800, stride).float(),
            torch.arange(0, 1344, stride).float(),
            indexing="ij",
        )
        xy = torch.stack([xs.flatten(), ys.flatten()], 1).repeat_interleave(3, 0)
        ratio = torch.tensor([0.5, 1.0, 2.0]).repeat(xy.shape[0] // 3)
        half = 4 * stride * torch.stack([ratio.rsqrt(), ratio.sqrt()], 1)
        anchors = torch.cat([xy - half, xy + half], 1)
        anchors += torch.randn(anchors.shape, generator=g) * stride * 0.2
        iou = ops.box_iou(anchors, objects).nan_to_num(0).max(1).values
        score = torch.sigmoid(6 * iou - 3 + torch.randn(iou.shape, generator=g))
        top = score.topk(min(nms_pre, score.numel())).indices
        boxes.append(ops.clip_boxes_to_image(anchors[top], (800, 1344)))
        scores.append(score[top])
        levels.append(torch.full_like(top, level))
    return torch.cat(boxes).to(device), torch.cat(scores).to(device), torch.cat(levels).to(device)


def nms_cases(device: torch.device, tv, quick: bool):
    """(case, ours, theirs or None, scores per call) for the NMS rows; each call returns the
    list of kept indices of its NMS calls."""
    n = 1000 if quick else 5000
    boxes = random_rois(n, 1, device, seed=1)[:, 1:]
    scores = torch.rand(n, generator=torch.Generator().manual_seed(1)).to(device)
    classes = torch.randint(0, 80, (n,), generator=torch.Generator().manual_seed(2)).to(device)
    groups = torch.arange(10, device=device).repeat_interleave(n // 5)
    wide = random_rois(2 * n, 1, device, seed=3)[:, 1:]
    wide_scores = torch.rand(2 * n, generator=torch.Generator().manual_seed(3)).to(device)
    cases = [
        (f"nms 0.7 ({n} boxes)", lambda lib: [lib.nms(boxes, scores, 0.7)], [scores]),
        (
            f"batched_nms 0.5 ({n} boxes, 80 classes)",
            lambda lib: [lib.batched_nms(boxes, scores, classes, 0.5)],
            [scores],
        ),
        (
            f"batched_nms 0.7 (10 groups of {n // 5})",
            lambda lib: [lib.batched_nms(wide, wide_scores, groups, 0.7)],
            [wide_scores],
        ),
    ]
    for nms_pre in (1000, 2000) if quick else (2000, 5000):
        images = [rpn_nms_inputs(nms_pre, device, seed) for seed in (0, 1)]
        cases.append(
            (
                f"RPN nms 0.7 ({nms_pre}/level, 5 levels, batch 2)",
                lambda lib, images=images: [lib.batched_nms(b, s, lv, 0.7) for b, s, lv in images],
                [s for _, s, _ in images],
            )
        )
    for case, call, case_scores in cases:
        ref = (lambda call=call: call(tv)) if tv is not None else None
        yield case, (lambda call=call: call(ops)), ref, case_scores


HEADER = f"{'dev':5s} {'case':38s} {'pass':8s} {'ours ms':>9s} {'tv ms':>9s} {'ratio':>6s}  diff"


def report(rows: list[Row], row: Row) -> None:
    """Append ``row`` and print it as a table line (diff: max abs, or 0/1 for nms equality)."""
    rows.append(row)
    ref = f"{row.ref_ms:9.2f}" if row.ref_ms is not None else f"{'-':>9s}"
    ratio = f"{row.ratio:6.2f}" if row.ratio is not None else f"{'-':>6s}"
    diff = f"{row.max_abs_diff:.1e}" if row.max_abs_diff is not None else "-"
    print(f"{row.device:5s} {row.case:38s} {row.pass_:8s} {row.ours_ms:9.2f} {ref} {ratio}  {diff}")


def measure(
    rows: list[Row],
    device: torch.device,
    case: str,
    ours: Callable[[], torch.Tensor],
    ref: Callable[[], torch.Tensor] | None,
    grads: list[torch.Tensor],
    repeat: int,
) -> None:
    """Forward and forward+backward rows for one case."""

    def backward(fn):
        def run():
            for g in grads:
                g.grad = None
            out = fn()
            out.backward(torch.ones_like(out))

        return run

    ours_out = ours().detach()
    diff = None
    if ref is not None:
        diff = float((ours_out.double() - ref().detach().double()).abs().max())
    for pass_, wrap in (("fwd", lambda f: f), ("fwd+bwd", backward)):
        t_ours = timeit(wrap(ours), device, repeat)
        t_ref = timeit(wrap(ref), device, repeat) if ref is not None else None
        ratio = t_ours / t_ref if t_ref else None
        report(rows, Row(device.type, case, pass_, t_ours, t_ref, ratio, diff))


def bench_device(device: torch.device, tv, args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    n_rois, channels, batch = (64, 32, 2) if args.quick else (512, 256, 2)
    g = torch.Generator().manual_seed(0)
    shapes = [(IMAGE_H // s, IMAGE_W // s) for s in STRIDES]
    feats = [
        torch.randn(batch, channels, h, w, generator=g).to(device).requires_grad_()
        for h, w in shapes
    ]
    p2 = feats[0]
    rois = random_rois(n_rois, batch, device)
    rois_grad = rois.clone().requires_grad_()
    repeat = args.repeat

    def align(size, sampling, lib=ops):
        return lambda: lib.roi_align(p2, rois, size, 0.25, sampling, True)

    for size in (7, 14):
        for sampling in (0, 2):
            ref = align(size, sampling, lib=tv) if tv else None
            case = f"roi_align {size}x{size} s{sampling} P2"
            measure(rows, device, case, align(size, sampling), ref, [p2], repeat)

    def fpn_align(size, lib):
        pool = lambda f, r, s: lib.roi_align(f, r, size, s, 2, True)  # noqa: E731
        return lambda: multi_level(pool, feats, rois, size)

    for size in (7, 14):
        case = f"roi_align {size}x{size} s2 FPN P2-P5"
        ref = fpn_align(size, tv) if tv else None
        measure(rows, device, case, fpn_align(size, ops), ref, feats, repeat)

    ours = lambda: ops.roi_pool(p2, rois, 7, 0.25)  # noqa: E731
    ref = (lambda: tv.roi_pool(p2, rois, 7, 0.25)) if tv else None
    measure(rows, device, "roi_pool 7x7 P2", ours, ref, [p2], repeat)

    def prroi(size):
        return lambda: ops.prroi_pool2d(p2, rois_grad, size, size, 0.25)

    for size in (7, 14):
        case = f"prroi_pool2d {size}x{size} P2 (+box grad)"
        measure(rows, device, case, prroi(size), None, [p2, rois_grad], repeat)
    pool = lambda f, r, s: ops.prroi_pool2d(f, r, 7, 7, s)  # noqa: E731
    ours = lambda: multi_level(pool, feats, rois, 7)  # noqa: E731
    measure(rows, device, "prroi_pool2d 7x7 FPN P2-P5", ours, None, feats, repeat)

    # NMS and mask pasting have no backward.
    for case, ours, ref, scores in nms_cases(device, tv, args.quick):
        t_ours = timeit(ours, device, repeat)
        t_ref = same = None
        if ref is not None:
            t_ref = timeit(ref, device, repeat)
            same = float(not same_kept(ours(), ref(), scores))
        ratio = t_ours / t_ref if t_ref is not None else None
        report(rows, Row(device.type, case, "fwd", t_ours, t_ref, ratio, same))

    n_masks = 30 if args.quick else 300
    masks = torch.rand(n_masks, 1, 28, 28, generator=g).to(device)
    mask_boxes = random_rois(n_masks, 1, device, seed=2)[:, 1:]
    t = timeit(lambda: ops.paste_masks_in_image(masks, mask_boxes, (800, 1333)), device, repeat)
    case = f"paste_masks {n_masks} on 800x1333"
    report(rows, Row(device.type, case, "fwd", t, None, None, None))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per case (median)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)

    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda" and not devices:
        print("CUDA requested but not available", file=sys.stderr)
        return 1

    tv = load_torchvision()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
    print(HEADER)
    rows: list[Row] = []
    for device in devices:
        if device.type == "cpu" and tv is not None and not _tv_runs_on(tv, device):
            rows += bench_device(device, None, args)
        else:
            rows += bench_device(device, tv, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
    return 0


def _tv_runs_on(tv, device: torch.device) -> bool:
    try:
        tv.roi_align(
            torch.zeros(1, 1, 4, 4, device=device),
            torch.tensor([[0.0, 0, 0, 2, 2]], device=device),
            2,
        )
        return True
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
