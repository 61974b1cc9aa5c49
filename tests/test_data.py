"""COCO-format reading, validation, transforms and batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from instseg.data import (
    Category,
    CocoDataset,
    DataError,
    DetectionTransform,
    GroupedBatchSampler,
    TransformConfig,
    build_loader,
    decode_masks,
    read_image,
    rescaled_size,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rect_poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _write_dataset(root: Path, annotations=None, images=None, categories=None) -> Path:
    """Four small images of different modes and a json covering every annotation form."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    specs = [
        ("rgb.png", "RGB", (40, 60)),
        ("gray.png", "L", (50, 30)),
        ("rgba.png", "RGBA", (40, 60)),
        ("deep.png", "I;16", (32, 48)),
    ]
    image_entries = []
    for i, (name, mode, (h, w)) in enumerate(specs, start=1):
        if mode == "I;16":
            Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16)).save(
                root / "images" / name
            )
        else:
            channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
            array = rng.integers(0, 255, (h, w, channels), dtype=np.uint8)
            Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(
                root / "images" / name
            )
        image_entries.append({"id": i * 10, "file_name": name, "height": h, "width": w})
    rle_mask = np.zeros((50, 30), np.uint8, order="F")
    rle_mask[10:30, 5:20] = 1
    compressed = mask_utils.encode(np.asfortranarray(rle_mask))
    compressed["counts"] = compressed["counts"].decode()
    uncompressed_mask = np.zeros((40, 60), np.uint8)
    uncompressed_mask[5:15, 30:50] = 1
    flat = uncompressed_mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))  # run starts
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    if annotations is None:
        annotations = [
            {
                "id": 1,
                "image_id": 10,
                "category_id": 7,
                "bbox": [5, 5, 20, 10],
                "iscrowd": 0,
                "segmentation": _rect_poly(5, 5, 25, 15),
                "area": 200,
            },
            {
                "id": 2,
                "image_id": 10,
                "category_id": 3,
                "bbox": [30, 20, 10, 10],
                "iscrowd": 0,
                "segmentation": _rect_poly(30, 20, 40, 30),
                "area": 100,
            },
            {
                "id": 3,
                "image_id": 20,
                "category_id": 3,
                "bbox": [5, 10, 15, 20],
                "iscrowd": 0,
                "segmentation": compressed,
                "area": 300,
            },
            {
                "id": 4,
                "image_id": 30,
                "category_id": 7,
                "bbox": [30, 5, 20, 10],
                "iscrowd": 0,
                "segmentation": {"size": [40, 60], "counts": counts},
                "area": 200,
            },
            {
                "id": 5,
                "image_id": 30,
                "category_id": 3,
                "bbox": [0, 0, 10, 10],
                "iscrowd": 1,
                "segmentation": compressed | {"size": [40, 60]},
                "area": 100,
            },
            {
                "id": 6,
                "image_id": 30,
                "category_id": 3,
                "bbox": [1, 1, 0, 5],
                "iscrowd": 0,
                "segmentation": _rect_poly(1, 1, 1, 6),
                "area": 0,
            },
            {
                "id": 7,
                "image_id": 30,
                "category_id": 3,
                "bbox": [1, 1, 5, 5],
                "iscrowd": 0,
                "segmentation": [],
                "area": 25,
            },
        ]
    payload = {
        "images": image_entries if images is None else images,
        "annotations": annotations,
        "categories": categories
        or [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}, {"id": 9, "name": "unused"}],
    }
    path = root / "ann.json"
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture
def dataset_dir(tmp_path):
    return tmp_path, _write_dataset(tmp_path)


def test_parse_and_validate(dataset_dir):
    root, ann = dataset_dir
    ds = CocoDataset(ann, root / "images")
    assert len(ds) == 4 and ds.empty_images == 1
    assert [c.id for c in ds.categories] == [3, 7, 9]
    assert ds.skipped == {"zero or negative box": 1, "empty or degenerate segmentation": 1}
    by_id = {r.image_id: r for r in ds.records}
    np.testing.assert_allclose(by_id[10].boxes, [[5, 5, 25, 15], [30, 20, 40, 30]])
    assert ds.labels_of(by_id[10]).tolist() == [1, 0]  # category 7 -> label 1, 3 -> 0
    np.testing.assert_allclose(by_id[30].crowd_boxes, [[0, 0, 10, 10]])
    assert len(by_id[30].boxes) == 1  # crowd and the two bad annotations are not targets
    assert len(CocoDataset(ann, root / "images", skip_empty=True)) == 3


def test_image_modes_read_as_rgb(dataset_dir):
    root, _ = dataset_dir
    for name, size in [
        ("rgb.png", (40, 60)),
        ("gray.png", (50, 30)),
        ("rgba.png", (40, 60)),
        ("deep.png", (32, 48)),
    ]:
        image = read_image(root / "images" / name, size)
        assert image.dtype == np.uint8 and image.shape == (*size, 3)
    deep = np.asarray(Image.open(root / "images" / "deep.png")).astype(np.float64)
    np.testing.assert_allclose(
        read_image(root / "images" / "deep.png")[..., 0], np.round(deep / 257), atol=1
    )
    gray = np.asarray(Image.open(root / "images" / "gray.png"))
    assert (read_image(root / "images" / "gray.png") == gray[..., None]).all()


def test_masks_polygon_and_rle_forms(dataset_dir):
    root, ann = dataset_dir
    ds = CocoDataset(ann, root / "images")
    by_id = {r.image_id: r for r in ds.records}
    poly = decode_masks(by_id[10].segmentations, 40, 60)
    assert poly.shape == (2, 40, 60) and poly.dtype == torch.bool
    # pycocotools rasterises the polygon (5,5)-(25,15) to rows 5..14 and columns 5..24.
    assert poly[0, 5:15, 5:25].all() and poly[0].sum() == 200
    compressed = decode_masks(by_id[20].segmentations, 50, 30)
    assert compressed[0].sum() == 300 and compressed[0, 10:30, 5:20].all()
    uncompressed = decode_masks(by_id[30].segmentations, 40, 60)
    assert uncompressed[0].sum() == 200 and uncompressed[0, 5:15, 30:50].all()
    # Resized decoding: polygons scale exactly, RLE by nearest neighbour.
    half = decode_masks(by_id[10].segmentations, 40, 60, (20, 30))
    assert half.shape == (2, 20, 30) and abs(int(half[0].sum()) - 50) <= 12
    half_rle = decode_masks(by_id[20].segmentations, 50, 30, (25, 15))
    # Nearest neighbour reads source floor(2 * i): rows 10..29 -> 5..14, columns 5..19 -> 3..9.
    assert half_rle[0].sum() == 70 and half_rle[0, 5:15, 3:10].all()


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda d: d.pop("annotations"), DataError, "missing key 'annotations'"),
        (lambda d: d["annotations"][0].update(image_id=999), DataError, "unknown image id 999"),
        (lambda d: d["annotations"][0].update(category_id=42), DataError, "unknown category id 42"),
        (lambda d: d["images"].append(dict(d["images"][0])), DataError, "duplicate image id"),
        (lambda d: d["categories"].append({"id": 3, "name": "x"}), DataError, "duplicate category"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2]), DataError, "annotation 1: bbox"),
        (lambda d: d["images"][0].update(file_name="absent.png"), FileNotFoundError, "absent.png"),
    ],
)
def test_bad_json_entries_are_named(dataset_dir, mutate, error, match):
    root, ann = dataset_dir
    data = json.loads(ann.read_text())
    mutate(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(error, match=match):
        CocoDataset(ann, root / "images")


def test_bad_files_are_named(dataset_dir, tmp_path):
    root, ann = dataset_dir
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        CocoDataset(root / "nope.json", root / "images")
    broken = root / "broken.json"
    broken.write_text('{"images": [1, 2,, 3]}')
    with pytest.raises(DataError, match=r"broken.json: malformed json at line 1 column"):
        CocoDataset(broken, root / "images")
    (root / "images" / "rgb.png").write_bytes(b"not a png at all")
    ds = CocoDataset(ann, root / "images")
    with pytest.raises(DataError, match=r"corrupt or unreadable image .*rgb\.png"):
        ds[0]
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / "images" / "rgb.png")
    with pytest.raises(DataError, match=r"rgb\.png is 10x10 but the json says 40x60"):
        ds[0]


def test_model_categories_must_cover_the_dataset(dataset_dir):
    root, ann = dataset_dir
    with pytest.raises(DataError, match=r"category ids \[7, 9\] are not among"):
        CocoDataset(ann, root / "images", categories=[Category(3, "circle")])
    wider = [Category(1, "a"), Category(3, "circle"), Category(7, "square"), Category(9, "u")]
    ds = CocoDataset(ann, root / "images", categories=wider)
    assert ds.labels_of(ds.records[0]).tolist() == [2, 1]


def test_rescaled_size_matches_mmcv_rule():
    assert rescaled_size(480, 640, (1333, 800)) == (800, 1067)
    assert rescaled_size(427, 640, (1333, 800)) == (800, 1199)
    assert rescaled_size(300, 1000, (1333, 800)) == (400, 1333)
    assert rescaled_size(256, 256, (512, 320)) == (320, 320)


def test_transform_resize_flip_keeps_boxes_and_masks_consistent(dataset_dir):
    root, ann = dataset_dir
    cfg = TransformConfig(scales=((120, 80),), flip_prob=1.0)
    ds = CocoDataset(ann, root / "images", transform=DetectionTransform(cfg, train=True))
    image, targets, info = ds[(0, 123)]
    assert info.image_size == (80, 120) and info.flipped and info.scale == (2.0, 2.0)
    assert image.shape == (3, 80, 120)
    # Box (5,5)-(25,15) scaled by 2 and flipped in a width of 120.
    torch.testing.assert_close(targets.boxes[0], torch.tensor([70.0, 10.0, 110.0, 30.0]))
    ys, xs = torch.nonzero(targets.masks[0], as_tuple=True)
    assert (xs.min().item(), xs.max().item() + 1) == (70, 110)
    assert (ys.min().item(), ys.max().item() + 1) == (10, 30)
    # The normalised image is the flipped, resized, normalised raw image.
    raw = torch.from_numpy(read_image(root / "images" / "rgb.png")).permute(2, 0, 1).float()
    resized = torch.nn.functional.interpolate(
        raw[None], (80, 120), mode="bilinear", align_corners=False
    )[0]
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    torch.testing.assert_close(image, ((resized - mean) / std).flip(-1))
    test_ds = CocoDataset(ann, root / "images", transform=DetectionTransform(cfg, train=False))
    _, test_targets, test_info = test_ds[(0, 123)]
    assert not test_info.flipped
    torch.testing.assert_close(test_targets.boxes[0], torch.tensor([10.0, 10.0, 50.0, 30.0]))


def test_sample_seed_makes_augmentation_deterministic(dataset_dir):
    root, ann = dataset_dir
    cfg = TransformConfig(scales=((120, 80), (90, 60), (60, 40)), flip_prob=0.5)
    ds = CocoDataset(ann, root / "images", transform=DetectionTransform(cfg, train=True))
    outcomes = {(ds[(0, s)][2].image_size, ds[(0, s)][2].flipped) for s in range(40)}
    assert len(outcomes) == 6  # every scale, flipped and not
    a, b = ds[(0, 7)], ds[(0, 7)]
    torch.testing.assert_close(a[0], b[0])
    assert a[2] == b[2]


def test_transform_gets_plain_values_not_the_dataset(dataset_dir):
    """The dataset hands its transform the labels and the mask flag, never itself; a direct
    call with the item's seed gives the item bit for bit."""
    root, ann = dataset_dir
    cfg = TransformConfig(scales=((120, 80), (90, 60)), flip_prob=0.5)
    transform = DetectionTransform(cfg, train=True)
    calls = []

    def recording(image, record, labels, with_masks, rng):
        calls.append((record.image_id, labels.tolist(), with_masks))
        return transform(image, record, labels, with_masks, rng)

    for with_masks in (True, False):
        ds = CocoDataset(ann, root / "images", transform=recording, with_masks=with_masks)
        for i, record in enumerate(ds.records):
            image, targets, info = ds[(i, 11)]
            labels = ds.labels_of(record)
            assert calls[-1] == (record.image_id, labels.tolist(), with_masks)
            raw = read_image(ds.path_of(record))
            rng = torch.Generator().manual_seed(11)
            d_image, d_targets, d_info = transform(raw, record, labels, with_masks, rng)
            assert torch.equal(image, d_image) and info == d_info
            assert torch.equal(targets.boxes, d_targets.boxes)
            assert torch.equal(targets.labels, d_targets.labels)
            if with_masks:
                assert torch.equal(targets.masks, d_targets.masks)
            else:
                assert targets.masks is None
    with pytest.raises(ValueError, match="labels for"):
        transform(raw, record, np.append(labels, 0), True, torch.Generator())


def test_sampler_groups_orientation_and_is_resumable():
    ratios = [1.5, 0.6, 1.2, 0.7, 1.0, 0.5, 2.0, 1.1, 0.9]
    sampler = GroupedBatchSampler(ratios, batch_size=2, seed=3)
    epoch0 = sampler.batches(0)
    assert sampler.batches(0) == epoch0 and sampler.batches(1) != epoch0
    flat = sorted(i for batch in epoch0 for i, _ in batch)
    assert flat == list(range(len(ratios)))
    for batch in epoch0:
        assert len({ratios[i] >= 1 for i, _ in batch}) == 1
    sampler.set_epoch(0, start_batch=2)
    assert list(sampler) == epoch0[2:] and len(sampler) == len(epoch0) - 2
    assert GroupedBatchSampler(ratios, 2, shuffle=False).batches(0)[0] == [
        (i, s) for i, s in GroupedBatchSampler(ratios, 2, shuffle=False).batches(0)[0]
    ]


def test_loader_pads_to_divisor(dataset_dir):
    root, ann = dataset_dir
    cfg = TransformConfig(scales=((100, 70),), flip_prob=0.0, size_divisor=32)
    ds = CocoDataset(ann, root / "images", transform=DetectionTransform(cfg, train=False))
    batches = list(build_loader(ds, batch_size=2, train=False))
    assert sum(len(b[0]) for b in batches) == 4
    for images, targets, infos in batches:
        assert images.tensor.shape[-2] % 32 == 0 and images.tensor.shape[-1] % 32 == 0
        for i, (h, w) in enumerate(images.image_sizes):
            assert (h, w) == infos[i].image_size
            assert images.tensor[i, :, h:, :].abs().sum() == 0
            assert images.tensor[i, :, :, w:].abs().sum() == 0
        assert len(targets) == len(infos)


@pytest.mark.skipif(not (SHARED / "coco-val-6").is_dir(), reason="shared/data/coco-val-6 absent")
def test_coco_val6_crowd_is_ignore_region():
    ds = CocoDataset(SHARED / "coco-val-6" / "annotations.json", SHARED / "coco-val-6" / "images")
    assert len(ds) == 6 and ds.empty_images == 1 and len(ds.categories) == 80
    assert sum(len(r.boxes) for r in ds.records) == 35
    assert sum(len(r.crowd_boxes) for r in ds.records) == 1
    transform = DetectionTransform(TransformConfig(scales=((533, 320),)), train=False)
    for i in range(len(ds)):
        record = ds.records[i]
        image = read_image(ds.path_of(record))
        _, targets, info = transform(image, record, ds.labels_of(record), True, torch.Generator())
        assert targets.masks.shape == (len(targets), *info.image_size)
        assert (targets.masks.flatten(1).sum(1) > 0).all()
        assert min(info.image_size) == 320 or max(info.image_size) == 533


@pytest.mark.skipif(not (SHARED / "dsb2018-nuclei-48").is_dir(), reason="shared/data nuclei absent")
def test_nuclei_rle_masks_match_boxes():
    ds = CocoDataset(
        SHARED / "dsb2018-nuclei-48" / "instances.json", SHARED / "dsb2018-nuclei-48" / "images"
    )
    assert len(ds) == 48 and sum(len(r.boxes) for r in ds.records) == 2885
    record = max(ds.records, key=lambda r: len(r.boxes))
    masks = decode_masks(record.segmentations, record.height, record.width)
    ys = masks.any(2).float().argmax(1)
    xs = masks.any(1).float().argmax(1)
    np.testing.assert_allclose(xs.numpy(), np.floor(record.boxes[:, 0]), atol=1)
    np.testing.assert_allclose(ys.numpy(), np.floor(record.boxes[:, 1]), atol=1)
