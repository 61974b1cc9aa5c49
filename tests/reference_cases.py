"""Recorded outputs that a refactor must not change (issue 11).

Each case is a zoo config, narrowed where it is a COCO recipe, built with weights that
depend only on each parameter's *name* (so construction order does not matter, and a
renamed parameter is caught), run on fixed inputs: the training losses and gradient norms
(one forward at a fixed RNG seed), and the detections (boxes, scores, labels, mask areas and
a hash of the masks) of ``predict``. Two short training runs (RefineMask and GRoIE small
configs) record their per-iteration losses and a hash of their final weights.

``python tests/reference_cases.py`` records ``tests/fixtures/refactor_reference.*`` from the
current code; ``python tests/reference_cases.py --check`` compares the current code with the
recording exactly (bit for bit, including the weight hashes: same machine only) and prints
every difference. ``tests/test_reference.py`` compares with tolerances, on any machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn.modules.batchnorm import _NormBase

from instseg.configs import apply_overrides, get_config
from instseg.data import ShapesConfig, generate_shapes
from instseg.layers.norm import FrozenBatchNorm2d
from instseg.runner import build_model, run_train
from instseg.structures import ImageBatch, ImageInfo, InstanceTargets

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TENSORS = FIXTURES / "refactor_reference.safetensors"
META = FIXTURES / "refactor_reference.json"
NUM_CLASSES = 3

# The COCO recipes narrowed to CPU widths; the small configs keep their own widths. These
# keys are the construction recipe, not the recording: the narrowed models must stay the
# same models (same parameter names and shapes, checked) however the keys are spelled.
NARROW = [
    "model.backbone.base_width=8",
    "model.neck.out_channels=16",
    "model.roi_head.box_head.fc_channels=32",
]
REFINE_NARROW = [*NARROW, "model.roi_head.mask_head.conv_channels=32"]
PRROI = [
    "model.roi_head.box_extractor.op=prroi_pool",
    "model.roi_head.mask_extractor.op=prroi_pool",
]
# The recording was made with NCHW maps, before the backbone's channels_last option (default
# on) existed; channels-last only reorders float sums (test_models checks the two layouts
# agree), so every case and run here keeps NCHW to stay comparable bit for bit.
NCHW = "model.backbone.channels_last=false"
# Likewise before the backbone's fold_norm (default on): folding the fixed norms into the
# convs only rounds differently (test_backbone checks fold and no fold agree in float64).
UNFOLDED = "model.backbone.fold_norm=false"
# Low thresholds so that random weights give many detections with spread scores.
TEST = ["model.roi_head.score_thr=0.01", NCHW, UNFOLDED]

CASES: dict[str, tuple[str, list[str]]] = {
    "faster_small": ("faster_rcnn_r18_fpn_small", TEST),
    "mask_small": ("mask_rcnn_r18_fpn_small", TEST),
    "mask_small_prroi": ("mask_rcnn_r18_fpn_small", [*TEST, *PRROI]),
    "groie_small": ("mask_rcnn_r18_fpn_groie_small", TEST),
    "refinemask_small": ("refinemask_r18_fpn_small", TEST),
    "faster_better_r50": ("refinemask_r50_fpn_faster_better_1x_coco", [*REFINE_NARROW, *TEST]),
    "gcnet_groie_r50": (
        "mask_rcnn_r50_fpn_syncbn-backbone_r4_gcb_c3-c5_groie_1x_coco",
        [*NARROW, *TEST],
    ),
    "faster_groie_r50": ("faster_rcnn_r50_fpn_groie_1x_coco", [*NARROW, *TEST]),
}

RUN_OVERRIDES = [
    NCHW,
    UNFOLDED,
    "data.train_scales=((128,80),(128,96))",
    "data.test_scale=(128,96)",
    "model.roi_head.sampler.num=64",
    "train.batch_size=2",
    "train.max_iters=3",
    "train.log_every=1",
    "train.checkpoint_every=0",
    "train.schedule.warmup_iters=1",
]
RUNS = {"refinemask_run": "refinemask_r18_fpn_small", "groie_run": "mask_rcnn_r18_fpn_groie_small"}


# ----------------------------------------------------------------------------- the inputs


def named_weights(model: torch.nn.Module) -> None:
    """Overwrite every parameter and buffer with values drawn from a generator seeded by the
    CRC of its name: independent of the order in which modules were built."""
    state = model.state_dict()
    norm_types = (_NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm, FrozenBatchNorm2d)
    norm_keys = {
        f"{prefix}.{leaf}"
        for prefix, module in model.named_modules()
        if isinstance(module, norm_types)
        for leaf in ("weight", "bias", "running_mean", "running_var")
    }
    new = {}
    for key, value in state.items():
        if not value.is_floating_point():
            new[key] = value
            continue
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "running_var" or (key in norm_keys and leaf == "weight"):
            new[key] = 0.5 + torch.rand(value.shape, generator=g)
        elif leaf in ("running_mean", "bias") or value.dim() <= 1:
            new[key] = 0.1 * torch.randn(value.shape, generator=g)
        else:
            fan_in = value[0].numel()
            new[key] = torch.randn(value.shape, generator=g) / fan_in**0.5
    # Spread the class scores (random weights otherwise give near-ties).
    for key in new:
        if key.endswith("fc_cls.weight"):
            new[key] = new[key] * 8.0
    model.load_state_dict(new)


def make_inputs() -> tuple[ImageBatch, list[InstanceTargets], list[ImageInfo]]:
    """Two images of different sizes padded together, with boxes, masks, labels and one
    crowd region; ``infos`` map the first back to a smaller original image."""
    g = torch.Generator().manual_seed(2024)
    sizes = [(96, 128), (80, 112)]
    images = torch.randn(2, 3, 96, 128, generator=g) * 0.3
    images[1, :, 80:, :] = 0
    images[1, :, :, 112:] = 0
    targets = []
    for i, (h, w) in enumerate(sizes):
        n = 3 + i
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 12 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35])
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w - 1.0, h - 1.0]))], 1)
        masks = torch.zeros(n, h, w, dtype=torch.bool)
        for k, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
            masks[k, y1:y2, x1:x2] = True
            masks[k, y1 : (y1 + y2) // 2, x1 : (x1 + x2) // 2] = False  # not a rectangle
            images[i, k % 3, y1:y2, x1:x2] += 1.5
        labels = torch.arange(n) % NUM_CLASSES
        ignore = torch.tensor([[2.0, 2.0, 14.0, 14.0]]) if i == 0 else torch.zeros(0, 4)
        targets.append(InstanceTargets(boxes, labels, masks, ignore))
    infos = [
        ImageInfo(1, "a.png", (48, 64), sizes[0], scale=(2.0, 2.0)),
        ImageInfo(2, "b.png", sizes[1], sizes[1]),
    ]
    return ImageBatch(images, sizes), targets, infos


def build_case(name: str) -> torch.nn.Module:
    config, overrides = CASES[name]
    cfg = apply_overrides(get_config(config), overrides)
    model = build_model(cfg, NUM_CLASSES)
    named_weights(model)
    return model


# --------------------------------------------------------------------------- the outputs


def _mask_hash(masks: torch.Tensor) -> str:
    packed = np.packbits(masks.to(torch.uint8).numpy().reshape(-1))
    shape = ",".join(str(s) for s in masks.shape)
    return hashlib.sha256(shape.encode() + packed.tobytes()).hexdigest()


def case_outputs(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (losses, gradient norms, detections) and JSON facts (keys and shapes, mask
    hashes) of one case."""
    model = build_case(name)
    images, targets, infos = make_inputs()
    tensors: dict[str, torch.Tensor] = {}
    model.train()
    torch.manual_seed(7)
    losses = model(images, targets)
    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    total.backward()
    for key, value in losses.items():
        tensors[f"{name}/loss/{key}"] = value.detach().double().reshape(1)
    for part, module in model.named_children():
        grads = [p.grad.double().pow(2).sum() for p in module.parameters() if p.grad is not None]
        if grads:
            tensors[f"{name}/grad/{part}"] = torch.stack(grads).sum().sqrt().reshape(1)
    model.eval()
    with torch.no_grad():
        results = model.predict(images, infos)
    facts: dict = {"keys": {k: list(v.shape) for k, v in model.state_dict().items()}}
    facts["mask_hash"] = []
    for i, result in enumerate(results):
        tensors[f"{name}/pred/{i}/boxes"] = result.boxes.double()
        tensors[f"{name}/pred/{i}/scores"] = result.scores.double()
        tensors[f"{name}/pred/{i}/labels"] = result.labels.long()
        if result.masks is not None:
            tensors[f"{name}/pred/{i}/mask_area"] = result.masks.flatten(1).sum(1).long()
            facts["mask_hash"].append(_mask_hash(result.masks))
    return tensors, facts


def run_outputs(name: str, root: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-iteration losses of a short run through the real trainer, and the hash of its
    final weights."""
    data = root / "data"
    ann = data / "train.json"
    if not ann.is_file():
        shapes = ShapesConfig(num_images=6, image_size=(96, 128), max_size=48, seed=5)
        ann = generate_shapes(data, shapes)
    cfg = apply_overrides(get_config(RUNS[name]), RUN_OVERRIDES)
    cfg.data.train_ann, cfg.data.train_images = str(ann), str(data)
    work = root / name
    run_train(cfg, work)
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    keys = sorted(k for k in log[0] if k.startswith("loss_"))
    tensors = {f"{name}/{k}": torch.tensor([r[k] for r in log], dtype=torch.float64) for k in keys}
    weights = load_file(work / "model_final.safetensors")
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode() + weights[key].numpy().tobytes())
    return tensors, {"weights_sha256": digest.hexdigest()}


# float32 sums are split by thread: the recording's thread count (test_reference pins it).
RECORDED_THREADS = 2


def record_all() -> tuple[dict[str, torch.Tensor], dict]:
    torch.set_num_threads(RECORDED_THREADS)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"cases": {}, "runs": {}}
    for name in CASES:
        t, facts = case_outputs(name)
        tensors |= t
        meta["cases"][name] = facts
    with tempfile.TemporaryDirectory() as tmp:
        for name in RUNS:
            t, facts = run_outputs(name, Path(tmp))
            tensors |= t
            meta["runs"][name] = facts
    return tensors, meta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare exactly, do not write")
    args = parser.parse_args()
    tensors, meta = record_all()
    if not args.check:
        FIXTURES.mkdir(exist_ok=True)
        save_file(tensors, str(TENSORS))
        META.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        print(f"wrote {TENSORS} ({len(tensors)} tensors) and {META}")
        return 0
    old = load_file(str(TENSORS))
    old_meta = json.loads(META.read_text())
    problems = [f"missing {k}" for k in old if k not in tensors]
    problems += [f"new {k}" for k in tensors if k not in old]
    for key in sorted(set(old) & set(tensors)):
        a, b = old[key], tensors[key]
        if a.shape != b.shape or not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else "shape"
            problems.append(f"{key}: differs (max abs diff {diff})")
    if old_meta != meta:
        for part in ("cases", "runs"):
            for name in old_meta[part]:
                for fact, value in old_meta[part][name].items():
                    if meta[part].get(name, {}).get(fact) != value:
                        problems.append(f"{part}/{name}/{fact} differs")
    print("\n".join(problems) if problems else f"identical: {len(old)} tensors, all facts")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
