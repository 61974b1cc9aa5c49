"""The LVIS v1 and Cityscapes training recipes (issue 16): repeat-factor sampling (mmengine
``ClassBalancedDataset``), mmdet 2.x "range" multi-scale, ``train.load_from``, by-epoch
schedules, LVIS ``coco_url`` file names and the six zoo configs.

Expected values are computed by hand in the comments, never by calling the code under test.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from instseg.configs import apply_overrides, get_config
from instseg.configs.schema import DataConfig
from instseg.data import CocoDataset, DataError, ShapesConfig, generate_shapes
from instseg.data.coco import ImageRecord
from instseg.data.loader import GroupedBatchSampler, repeat_counts, repeat_factors
from instseg.data.transforms import DetectionTransform, TransformConfig, sample_range_scale
from instseg.engine import CheckpointError, ScheduleConfig, TrainConfig, train
from instseg.engine.trainer import load_initial_weights
from instseg.structures import ImageBatch, ImageInfo, InstanceTargets

# ------------------------------------------------------------------- repeat factors

# Eight images and their categories; with t = 0.5:
#   f(1) = 6/8 = 0.75   r(1) = max(1, sqrt(0.5 / 0.75))  = 1
#   f(2) = 2/8 = 0.25   r(2) = sqrt(0.5 / 0.25)          = sqrt(2) = 1.41421356...
#   f(3) = 1/8          r(3) = sqrt(0.5 / 0.125)         = sqrt(4) = 2 (exactly)
#   f(4) = 1/8          r(4) = 2
# image factors: max over the image's categories, 1 for image 6 (no category);
# copies per epoch: ceil -> [2, 2, 2, 1, 1, 1, 1, 2] (ceil(2.0) = 2, not 3).
HAND_CATEGORIES = [[1, 2], [1, 2, 2], [1, 3], [1], [1, 1], [1], [], [4]]
HAND_FACTORS = [math.sqrt(2), math.sqrt(2), 2.0, 1.0, 1.0, 1.0, 1.0, 2.0]
HAND_COPIES = [2, 2, 2, 1, 1, 1, 1, 2]


def test_repeat_factors_follow_the_formula_on_a_hand_made_dataset():
    factors = repeat_factors(HAND_CATEGORIES, 0.5)
    assert factors == pytest.approx(HAND_FACTORS, rel=1e-12)
    assert repeat_counts(factors) == HAND_COPIES
    # A threshold below every frequency repeats nothing.
    assert repeat_factors(HAND_CATEGORIES, 0.1) == [1.0] * 8


def test_repeat_factors_at_the_lvis_threshold():
    # 2000 images: category 7 in one image, f = 5e-4, r = sqrt(1e-3 / 5e-4) = sqrt(2) -> 2
    # copies; category 8 in 8 images, f = 4e-3 > 1e-3 -> r = 1; category 9 in every image.
    # Image 0 holds 7, 8 and 9: its factor is the largest, sqrt(2).
    sets = [[9] for _ in range(2000)]
    sets[0] = [7, 8, 9]
    for i in range(1, 8):
        sets[i] = [8, 9]
    factors = repeat_factors(sets, 1e-3)
    assert factors[0] == pytest.approx(math.sqrt(2), rel=1e-12)
    assert factors[1:] == [1.0] * 1999
    assert sum(repeat_counts(factors)) == 2001


def test_repeat_factors_reject_bad_input():
    with pytest.raises(ValueError, match="empty"):
        repeat_factors([], 1e-3)
    with pytest.raises(ValueError, match="positive"):
        repeat_factors([[1]], 0.0)


# ---------------------------------------------------------- sampler with repeated indices

RATIOS = [1.5, 0.5, 1.0, 2.0, 0.7, 1.2, 1.3, 0.9]  # landscape: 0 2 3 5 6; portrait: 1 4 7


def test_sampler_epoch_lists_each_image_ceil_r_times_grouped_by_orientation():
    sampler = GroupedBatchSampler(RATIOS, batch_size=2, seed=4, repeats=HAND_COPIES)
    # Landscape copies: 2 + 2 + 1 + 1 + 1 = 7 -> 4 batches; portrait: 2 + 1 + 2 = 5 -> 3.
    assert sampler.num_samples == 12
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert len(batches) == 7
        flat = [i for batch in batches for i, _ in batch]
        assert Counter(flat) == Counter({i: n for i, n in enumerate(HAND_COPIES)})
        for batch in batches:
            assert len({RATIOS[i] >= 1 for i, _ in batch}) == 1
        # Every copy is a sample of its own: its own seed (so its own scale and flip).
        seeds = [s for batch in batches for _, s in batch]
        assert len(set(seeds)) == len(seeds)
    assert sampler.batches(0) != sampler.batches(1)


def test_sampler_with_repeats_is_deterministic_and_resumable():
    a = GroupedBatchSampler(RATIOS, batch_size=3, seed=9, repeats=HAND_COPIES)
    b = GroupedBatchSampler(RATIOS, batch_size=3, seed=9, repeats=HAND_COPIES)
    for epoch in (0, 5):
        assert a.batches(epoch) == b.batches(epoch)
        b.set_epoch(epoch, start_batch=2)
        assert list(b) == a.batches(epoch)[2:] and len(b) == len(a.batches(epoch)) - 2
    assert a.batches(0) != GroupedBatchSampler(RATIOS, 3, seed=10, repeats=HAND_COPIES).batches(0)


def test_sampler_without_repeats_is_unchanged():
    """One copy of each image draws exactly what the sampler drew before repeats existed, so
    runs without ``repeat_threshold`` keep their data order (and recorded references)."""
    plain = GroupedBatchSampler(RATIOS, batch_size=2, seed=7)
    ones = GroupedBatchSampler(RATIOS, batch_size=2, seed=7, repeats=[1] * len(RATIOS))
    for epoch in range(3):
        assert plain.batches(epoch) == ones.batches(epoch)
    with pytest.raises(ValueError, match="8 images"):
        GroupedBatchSampler(RATIOS, 2, repeats=[1, 2])
    with pytest.raises(ValueError, match=">= 1"):
        GroupedBatchSampler(RATIOS, 2, repeats=[1] * 7 + [0])


# ------------------------------------------------------------------ range multi-scale


def test_range_scale_bounds_and_distribution():
    g = torch.Generator().manual_seed(0)
    draws = [sample_range_scale(((2048, 800), (2048, 1024)), g) for _ in range(4500)]
    assert {long for long, _ in draws} == {2048}
    shorts = np.array([short for _, short in draws])
    # Uniform over the 225 integers 800..1024, both ends included: mean 912, and each of
    # the 9 bins of 25 values gets 1/9 of the draws (500 expected, sd about 21).
    assert shorts.min() == 800 and shorts.max() == 1024
    assert abs(shorts.mean() - 912) < 3
    counts = np.bincount((shorts - 800) // 25, minlength=9)
    assert len(counts) == 9 and np.all(np.abs(counts - 500) < 100), counts
    # Long and short edges come from max/min of each scale, drawn independently (mmdet 2.x).
    g = torch.Generator().manual_seed(1)
    draws = [sample_range_scale(((1333, 640), (800, 1000)), g) for _ in range(2000)]
    longs, shorts = np.array(draws).T
    assert (longs.min(), longs.max(), shorts.min(), shorts.max()) == (1000, 1333, 640, 800)
    assert abs(np.corrcoef(longs, shorts)[0, 1]) < 0.1


def _blank_record(height: int, width: int) -> ImageRecord:
    return ImageRecord(1, "x.png", height, width, np.zeros((0, 4), np.float32), np.zeros(0, int))


def test_range_mode_transform_resizes_to_the_sampled_short_edge():
    """A 32x64 image with scales (64, 20)-(64, 32): the long edge is 64, so the image is
    sized by the sampled short edge s: s x 2s. The draws are the long edge, the short edge,
    then the flip, from the sample's generator."""
    cfg = TransformConfig(scales=((64, 20), (64, 32)), flip_prob=0.5, scale_mode="range")
    transform = DetectionTransform(cfg, train=True)
    image = np.zeros((32, 64, 3), np.uint8)
    record = _blank_record(32, 64)
    seen = set()
    for seed in range(60):
        _, _, info = transform(image, record, np.zeros(0, np.int64), False, _gen(seed))
        g = _gen(seed)
        _, short = sample_range_scale(cfg.scales, g)
        flip = float(torch.rand((), generator=g)) < 0.5
        assert info.image_size == (short, 2 * short) and info.flipped == flip
        seen.add(short)
    assert seen <= set(range(20, 33)) and len(seen) >= 10
    # Test time: the first scale, nothing drawn.
    _, _, info = DetectionTransform(cfg, train=False)(image, record, np.zeros(0), False, _gen(0))
    assert info.image_size == (20, 40)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_scale_mode_is_validated_with_the_key():
    # One scale in range mode is that scale (mmdet's Resize checks the count first).
    assert DataConfig(train_scales=((2048, 800),), train_scale_mode="range")
    with pytest.raises(ValueError, match=r"data\.train_scale_mode 'range'.*3 scales"):
        DataConfig(train_scales=((1, 1), (2, 2), (3, 3)), train_scale_mode="range")
    with pytest.raises(ValueError, match=r"data\.train_scale_mode must be one of"):
        DataConfig(train_scale_mode="ratio")
    with pytest.raises(ValueError, match=r"data\.repeat_threshold"):
        DataConfig(repeat_threshold=0.0)
    with pytest.raises(ValueError, match="scale_mode 'range'"):
        TransformConfig(scales=((1, 1), (2, 2), (3, 3)), scale_mode="range")


# ----------------------------------------------------------------- LVIS coco_url names


def _lvis_json(path: Path, images: list[dict]) -> Path:
    data = {
        "images": images,
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 3,
                "bbox": [1, 1, 4, 4],
                "area": 16.0,
                "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]],
            },
        ],
        "categories": [{"id": 3, "name": "aerosol_can", "frequency": "c"}],
    }
    path.write_text(json.dumps(data))
    return path


def test_lvis_images_are_read_by_coco_url(tmp_path):
    from PIL import Image

    (tmp_path / "train2017").mkdir()
    Image.new("RGB", (8, 6)).save(tmp_path / "train2017" / "000000155379.jpg")
    Image.new("RGB", (8, 6)).save(tmp_path / "kept.png")
    url = "http://images.cocodataset.org/train2017/000000155379.jpg"
    ann = _lvis_json(
        tmp_path / "lvis.json",
        [
            {"id": 7, "coco_url": url, "height": 6, "width": 8, "neg_category_ids": []},
            {"id": 8, "file_name": "kept.png", "coco_url": url, "height": 6, "width": 8},
        ],
    )
    dataset = CocoDataset(ann, tmp_path)
    paths = {r.image_id: dataset.path_of(r) for r in dataset.records}
    assert paths == {7: tmp_path / "train2017/000000155379.jpg", 8: tmp_path / "kept.png"}
    image, record = dataset[0]
    assert image.shape == (6, 8, 3) and record.category_ids.tolist() == [3]  # no iscrowd key

    missing = _lvis_json(
        tmp_path / "missing.json",
        [
            {
                "id": 7,
                "coco_url": "http://images.cocodataset.org/val2017/1.jpg",
                "height": 6,
                "width": 8,
            }
        ],
    )
    with pytest.raises(FileNotFoundError, match=r"val2017/1\.jpg"):
        CocoDataset(missing, tmp_path)
    nameless = _lvis_json(tmp_path / "nameless.json", [{"id": 7, "height": 6, "width": 8}])
    with pytest.raises(DataError, match=r"nameless\.json: images\[0\] \(id 7\).*coco_url"):
        CocoDataset(nameless, tmp_path)


# ------------------------------------------------------------------- toy training parts


@dataclass
class _Record:
    width: int
    height: int
    category_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def aspect_ratio(self) -> float:
        return self.width / self.height


class _ToyData(torch.utils.data.Dataset):
    """The hand-made dataset's categories on small images (landscape or portrait)."""

    def __init__(self) -> None:
        self.records = [
            _Record(12, 8, np.asarray(c, np.int64))
            if RATIOS[i] >= 1
            else _Record(8, 12, np.asarray(c, np.int64))
            for i, c in enumerate(HAND_CATEGORIES)
        ]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        record = self.records[index]
        h, w = record.height, record.width
        image = torch.rand(3, h, w, generator=_gen(seed))
        targets = InstanceTargets(torch.tensor([[1.0, 1.0, 5.0, 5.0]]), torch.tensor([0]))
        return image, targets, ImageInfo(index, f"{index}.png", (h, w), (h, w))


class _ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, images: ImageBatch, targets: list, context=None) -> dict:
        out = self.head(F.relu(self.conv(images.tensor)))
        return {"loss_toy": F.mse_loss(out, torch.ones_like(out)) + 0.01 * torch.randn(())}


def _toy(seed: int = 0) -> _ToyModel:
    torch.manual_seed(seed)
    return _ToyModel()


def _cfg(**overrides) -> TrainConfig:
    kwargs = dict(
        max_iters=9,
        batch_size=2,
        log_every=1,
        seed=5,
        size_divisor=4,
        schedule=ScheduleConfig(base_lr=0.1, warmup_iters=0, steps=(5,)),
    )
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stop_at(k: int):
    def on_iteration(iteration: int, values: dict) -> None:
        if iteration == k:
            os.kill(os.getpid(), signal.SIGTERM)

    return on_iteration


# ------------------------------------------------------- repeats and epochs in the trainer


def test_training_with_repeats_resumes_exactly(tmp_path):
    # Threshold 0.5 on the hand-made dataset: 12 samples per epoch, in 4 landscape and 3
    # portrait batches of 2: 7 iterations per epoch; 9 iterations cross an epoch boundary.
    model = _toy()
    full = train(model, _ToyData(), _cfg(), tmp_path / "full", repeat_threshold=0.5)
    assert full.iteration == 9
    state = json.loads((tmp_path / "full" / "model_final.json").read_text())["state"]
    assert (state["epoch"], state["batch"], state["repeat_threshold"]) == (1, 2, 0.5)

    first = train(
        _toy(), _ToyData(), _cfg(), tmp_path / "cut", on_iteration=_stop_at(4), repeat_threshold=0.5
    )
    assert (first.status, first.iteration) == ("interrupted", 4)
    torch.rand(5)  # disturb the global RNG between the runs
    resumed = _toy(1)
    train(resumed, _ToyData(), _cfg(), tmp_path / "cut", resume=True, repeat_threshold=0.5)
    assert _equal(_weights(resumed), _weights(model))
    with pytest.raises(ValueError, match=r"data\.repeat_threshold\) was 0\.5, now 0\.25"):
        train(_toy(), _ToyData(), _cfg(), tmp_path / "cut", resume=True, repeat_threshold=0.25)
    with pytest.raises(ValueError, match=r"was 0\.5, now None"):
        train(_toy(), _ToyData(), _cfg(), tmp_path / "cut", resume=True)


def test_by_epoch_schedule_counts_epochs_of_the_repeated_list(tmp_path, capsys):
    # 2 epochs, lr x0.1 after epoch 1. Without repeats: 5 landscape + 3 portrait images in
    # batches of 2 -> 3 + 2 = 5 iterations per epoch, 10 in all; with threshold 0.5 the
    # epoch has 12 samples -> 4 + 3 = 7 iterations, 14 in all.
    schedule = ScheduleConfig(base_lr=0.1, warmup_iters=0, steps=(1,))
    cfg = _cfg(by_epoch=True, max_iters=2, schedule=schedule)
    plain = train(_toy(), _ToyData(), cfg, tmp_path / "plain")
    assert [h["lr"] for h in plain.history] == pytest.approx([0.1] * 5 + [0.01] * 5)
    repeated = train(_toy(), _ToyData(), cfg, tmp_path / "rep", repeat_threshold=0.5)
    assert [h["lr"] for h in repeated.history] == pytest.approx([0.1] * 7 + [0.01] * 7)
    err = capsys.readouterr().err
    assert "12 images per epoch from 8" in err
    assert "2 epochs of 7 iterations = 14 iterations" in err
    # A resumed by-epoch run resolves the same schedule and ends where the full one did.
    cut = train(
        _toy(), _ToyData(), cfg, tmp_path / "cut", on_iteration=_stop_at(9), repeat_threshold=0.5
    )
    assert cut.iteration == 9
    rest = train(_toy(), _ToyData(), cfg, tmp_path / "cut", resume=True, repeat_threshold=0.5)
    assert [h["lr"] for h in rest.history] == pytest.approx([0.01] * 5)


# ----------------------------------------------------------------------------- load_from


def _narrow_mask_rcnn(num_classes: int, seed: int) -> nn.Module:
    cfg = apply_overrides(get_config("mask_rcnn_r18_fpn_small"), NARROW)
    torch.manual_seed(seed)
    return cfg.model.build(num_classes)


def test_load_from_skips_mismatched_shapes_and_lists_them(tmp_path):
    coco = _narrow_mask_rcnn(80, seed=1)
    source = _weights(coco)
    dropped = "backbone.layer1.0.conv1.weight"
    file_tensors = {k: v for k, v in source.items() if k != dropped}
    file_tensors["extra.unused"] = torch.zeros(2)
    path = tmp_path / "coco.safetensors"
    save_file(file_tensors, str(path))

    city = _narrow_mask_rcnn(8, seed=2)
    before = _weights(city)
    report = load_initial_weights(city, path)
    after = _weights(city)
    # The class-specific layers: 81-way classifier, 80 x 4 deltas, 80 mask logits.
    assert {k for k, _, _ in report.mismatched} == {
        "roi_head.bbox_head.fc_cls.weight",
        "roi_head.bbox_head.fc_cls.bias",
        "roi_head.bbox_head.fc_reg.weight",
        "roi_head.bbox_head.fc_reg.bias",
        "roi_head.mask_head.conv_logits.weight",
        "roi_head.mask_head.conv_logits.bias",
    }
    shapes = {k: (a, b) for k, a, b in report.mismatched}
    assert shapes["roi_head.bbox_head.fc_cls.bias"] == ((81,), (9,))
    assert report.missing == [dropped] and report.unexpected == ["extra.unused"]
    assert len(report.loaded) == len(before) - 7
    for key in before:
        if key in report.loaded:
            assert torch.equal(after[key], source[key]), key
        else:  # skipped: the model's own initialisation stays
            assert torch.equal(after[key], before[key]), key
    assert not torch.equal(before["rpn_head.rpn_conv.weight"], source["rpn_head.rpn_conv.weight"])
    summary = report.summary()
    assert "skipped 6 with another shape" in summary and "(81,)" in summary
    assert dropped in summary and "extra.unused" in summary


def test_load_from_errors_name_the_key_and_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.load_from.*nowhere\.safetensors"):
        load_initial_weights(_toy(), tmp_path / "nowhere.safetensors")
    (tmp_path / "w.pth").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"train\.load_from.*w\.pth"):
        load_initial_weights(_toy(), tmp_path / "w.pth")
    save_file({"other": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"train\.load_from: no tensor"):
        load_initial_weights(_toy(), tmp_path / "other.safetensors")
    # Through train(): the run stops before writing anything.
    cfg = _cfg(load_from=str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"train\.load_from"):
        train(_toy(), _ToyData(), cfg, tmp_path / "work")
    assert not list((tmp_path / "work").iterdir())


def test_load_from_initialises_fresh_runs_only(tmp_path):
    save_file(_weights(_toy(seed=42)), str(tmp_path / "init.safetensors"))
    cfg = _cfg(load_from=str(tmp_path / "init.safetensors"))
    # Loading by hand, then training without load_from, is what load_from does.
    by_hand = _toy()
    load_initial_weights(by_hand, tmp_path / "init.safetensors")
    train(by_hand, _ToyData(), _cfg(), tmp_path / "by_hand")
    loaded = _toy()
    train(loaded, _ToyData(), cfg, tmp_path / "loaded")
    assert _equal(_weights(loaded), _weights(by_hand))
    # A resumed run restores its checkpoint and never reads load_from (here: gone).
    train(_toy(), _ToyData(), cfg, tmp_path / "cut", on_iteration=_stop_at(3))
    (tmp_path / "init.safetensors").unlink()
    resumed = _toy(7)
    train(resumed, _ToyData(), cfg, tmp_path / "cut", resume=True)
    assert _equal(_weights(resumed), _weights(by_hand))


# --------------------------------------------------------------------------- the configs

NEW = [
    "mask_rcnn_r50_fpn_1x_lvis_v1",
    "mask_rcnn_r101_fpn_1x_lvis_v1",
    "refinemask_r50_fpn_1x_lvis_v1",
    "refinemask_r101_fpn_1x_lvis_v1",
    "mask_rcnn_r50_fpn_1x_cityscapes",
    "refinemask_r50_fpn_1x_cityscapes",
]


def test_lvis_recipes_match_their_files():
    for name in NEW[:4]:
        cfg = get_config(name)
        assert cfg.num_classes == 1203 and cfg.data.repeat_threshold == 1e-3
        assert cfg.data.train_scale_mode == "value"
        assert cfg.data.train_scales == tuple((1333, s) for s in (640, 672, 704, 736, 768, 800))
        assert cfg.data.test_scale == (1333, 800) and cfg.eval.max_dets == 300
        roi = cfg.model.roi_head
        assert (roi.score_thr, roi.max_per_image, roi.nms_iou) == (1e-4, 300, 0.5)
        t = cfg.train
        assert (t.by_epoch, t.max_iters, t.schedule.steps, t.batch_size) == (True, 12, (8, 11), 16)
        assert (t.schedule.base_lr, t.schedule.warmup_iters, t.schedule.warmup_ratio) == (
            0.02,
            500,
            0.001,
        )
        assert t.load_from is None
        assert cfg.model.backbone.depth == (101 if "r101" in name else 50)
        refine = name.startswith("refinemask")
        assert roi.box_head.loss_cls_weight == roi.box_head.loss_bbox_weight == (2 if refine else 1)
        assert roi.box_head.loss_bbox_beta == 0.0  # L1 in both files
        assert t.schedule.grad_clip == (35.0 if refine else None)
        if refine:  # stage_num_classes=[1203, 1203, 1203, 1]
            assert roi.mask_head.kind == "refinemask" and roi.mask_head.class_agnostic_last_stage
            assert roi.mask_head.stage_loss_weights == (0.25, 0.5, 0.75, 1.0)
        else:
            assert roi.mask_head.kind == "fcn"
        assert "75,128" in cfg.description and "mmdet" in cfg.description


def test_cityscapes_recipes_match_their_files():
    mmdet, refine = get_config(NEW[4]), get_config(NEW[5])
    for cfg in (mmdet, refine):
        assert cfg.num_classes == 8 and cfg.data.repeat_threshold is None
        assert cfg.data.train_scale_mode == "range"
        assert cfg.data.train_scales == ((2048, 800), (2048, 1024))
        assert cfg.data.test_scale == (2048, 1024)
        s = cfg.train.schedule
        assert (s.base_lr, s.warmup_iters, s.warmup_ratio) == (0.01, 500, 0.001)
        assert not cfg.train.by_epoch and cfg.model.roi_head.box_head.loss_bbox_beta == 1.0
        assert (cfg.model.roi_head.score_thr, cfg.model.roi_head.max_per_image) == (0.05, 100)
    # mmdet: 8 images per iteration; 8 epochs of 8 x 2975 = 23,800 images = 23,800
    # iterations, the step after 7 epochs at 20,825; COCO init, box loss weight 1, no clip.
    assert (mmdet.train.batch_size, mmdet.train.max_iters) == (8, 23_800)
    assert mmdet.train.schedule.steps == (20_825,) and mmdet.train.schedule.grad_clip is None
    assert mmdet.train.load_from == "checkpoints/mask_rcnn_r50_fpn_1x_coco.safetensors"
    assert mmdet.model.roi_head.box_head.loss_bbox_weight == 1.0
    assert mmdet.model.roi_head.mask_head.kind == "fcn"
    # RefineMask: 16 per iteration: 190,400 / 16 = 11,900; 7 epochs: 10,412.5 -> 10,412;
    # no COCO init, box losses x2, clip 35, class-specific last stage ([8, 8, 8, 8]).
    assert (refine.train.batch_size, refine.train.max_iters) == (16, 11_900)
    assert refine.train.schedule.steps == (10_412,) and refine.train.schedule.grad_clip == 35.0
    assert refine.train.load_from is None
    head = refine.model.roi_head
    assert head.box_head.loss_cls_weight == head.box_head.loss_bbox_weight == 2.0
    assert head.mask_head.kind == "refinemask" and not head.mask_head.class_agnostic_last_stage


# Narrowed as tests/test_training.py narrows the R-50 recipes (same depth and structure).
NARROW = [
    "model.backbone.base_width=8",
    "model.neck.out_channels=16",
    "model.roi_head.box_head.fc_channels=32",
]
TINY = [
    "data.test_scale=(96,64)",
    "train.batch_size=4",
    "train.log_every=1",
    "train.checkpoint_every=0",
    "train.schedule.warmup_iters=0",
    "train.schedule.steps=()",
    "model.roi_head.sampler.num=32",  # few RoIs: 1203-class mask logits per RoI are costly
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, Path]:
    """Four synthetic images (two orientations likely), and an LVIS-style copy of their
    json: ``coco_url`` instead of ``file_name``, no ``iscrowd``."""
    root = tmp_path_factory.mktemp("shapes")
    ann = generate_shapes(
        root, ShapesConfig(num_images=4, image_size=(64, 80), max_size=40, seed=3)
    )
    data = json.loads(ann.read_text())
    for image in data["images"]:
        image["coco_url"] = "http://images.cocodataset.org/" + image.pop("file_name")
    for annotation in data["annotations"]:
        annotation.pop("iscrowd", None)
    lvis = root / "lvis_style.json"
    lvis.write_text(json.dumps(data))
    return ann, lvis


@pytest.mark.parametrize("name", NEW)
def test_new_recipe_trains_at_a_tiny_size(name, shapes, tmp_path):
    ann, lvis = shapes
    narrow = [*NARROW]
    if name.startswith("refinemask"):
        narrow.append("model.roi_head.mask_head.conv_channels=32")
    if "lvis" in name:  # one epoch, by_epoch as the recipe: 1-2 iterations of 4 images
        sizes = ["data.train_scales=((96,48),(96,64))", "train.max_iters=1"]
        ann = lvis
    else:  # range mode kept: short edges sampled in [48, 64]
        sizes = ["data.train_scales=((96,48),(96,64))", "train.max_iters=2"]
    cfg = apply_overrides(get_config(name), [*narrow, *TINY, *sizes])
    if cfg.train.load_from is not None:  # COCO-like weights: 80 classes into 8
        path = tmp_path / "coco.safetensors"
        save_file(_weights(_build(cfg, 80, seed=1)), str(path))
        cfg.train.load_from = str(path)
    transform = DetectionTransform(
        TransformConfig(
            scales=cfg.data.train_scales,
            flip_prob=cfg.data.flip_prob,
            scale_mode=cfg.data.train_scale_mode,
        ),
        train=True,
    )
    dataset = CocoDataset(ann, ann.parent, transform, skip_empty=True)
    model = _build(cfg, cfg.num_classes, seed=0)
    result = train(
        model, dataset, cfg.train, tmp_path / "work", repeat_threshold=cfg.data.repeat_threshold
    )
    assert result.status == "finished" and 1 <= result.iteration <= 2
    for record in result.history:
        assert math.isfinite(record["total"]) and record["loss_mask"] > 0
    if cfg.model.roi_head.mask_head.kind == "refinemask":
        assert "loss_semantic" in result.history[0]


def _build(cfg, num_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return cfg.model.build(num_classes)
