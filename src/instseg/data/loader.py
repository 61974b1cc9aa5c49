"""Batching: padding collate, repeat-factor sampling and an aspect-ratio grouped, resumable
batch order.

The batch order of every epoch is a pure function of ``(seed, epoch)``, and each sample
carries its own random seed (for scale choice and flip), so iteration ``i`` of a run always
sees the same batch with the same augmentation: a resumed run continues exactly, whatever
the number of loader workers.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..structures import ImageBatch, ImageInfo, InstanceTargets

Sample = tuple[Tensor, InstanceTargets, ImageInfo]


def pad_images(images: Sequence[Tensor], size_divisor: int = 32) -> ImageBatch:
    """Stack ``(3, h, w)`` images into one zero-padded batch whose size is a multiple of
    ``size_divisor``."""
    if not images:
        raise ValueError("cannot batch zero images")
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    height = -(-max(h for h, _ in sizes) // size_divisor) * size_divisor
    width = -(-max(w for _, w in sizes) // size_divisor) * size_divisor
    tensor = torch.stack(
        [F.pad(im, (0, width - w, 0, height - h)) for im, (h, w) in zip(images, sizes, strict=True)]
    )
    return ImageBatch(tensor, sizes)


def make_collate(size_divisor: int = 32):
    """A collate function for :class:`~instseg.data.coco.CocoDataset` samples."""

    def collate(samples: list[Sample]) -> tuple[ImageBatch, list[InstanceTargets], list[ImageInfo]]:
        images, targets, infos = zip(*samples, strict=True)
        return pad_images(images, size_divisor), list(targets), list(infos)

    return collate


def repeat_factors(category_sets: Sequence[Iterable[int]], threshold: float) -> list[float]:
    """Per-image repeat factors of class-balanced sampling (LVIS, Gupta et al. 2019), as
    mmengine's ``ClassBalancedDataset._get_repeat_factors`` with ``oversample_thr=threshold``.

    For ``N`` images, with ``category_sets[i]`` the categories of image ``i``:

    - ``f(c) = |{i : c in category_sets[i]}| / N``, the fraction of images containing ``c``;
    - ``r(c) = max(1, sqrt(threshold / f(c)))``;
    - ``r(i) = max over c in category_sets[i] of r(c)``, and 1 for an image without any.
    """
    sets = [set(categories) for categories in category_sets]
    if not sets:
        raise ValueError("repeat factors of an empty dataset")
    if not threshold > 0:
        raise ValueError(f"the repeat threshold must be positive, got {threshold!r}")
    counts = Counter(c for categories in sets for c in categories)
    num_images = len(sets)
    category_repeat = {
        c: max(1.0, math.sqrt(threshold / (n / num_images))) for c, n in counts.items()
    }
    return [max((category_repeat[c] for c in cats), default=1.0) for cats in sets]


def repeat_counts(factors: Sequence[float]) -> list[int]:
    """How many times each image appears in every epoch: ``ceil(r(i))``, mmengine's
    deterministic rounding (``ClassBalancedDataset`` lists image ``i`` ``ceil(r(i))`` times;
    detectron2's sampler rounds stochastically instead)."""
    return [math.ceil(r) for r in factors]


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of images of the same orientation (landscape or portrait), shuffled per epoch.

    Grouping by aspect ratio keeps padding small (mmdet ``GroupSampler``). Yields lists of
    ``(dataset_index, sample_seed)``. ``batches(epoch)`` is deterministic given ``seed``;
    ``start_batch`` skips the first batches of the first epoch, for resuming mid-epoch.

    ``repeats[i]`` (default 1) is how many times image ``i`` appears in every epoch (repeat-
    factor sampling, :func:`repeat_counts`): an epoch goes over the repeated index list as
    mmengine's ``ClassBalancedDataset``, each copy a position of its own, with its own place
    in the shuffle and its own sample seed.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[float],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        repeats: Sequence[int] | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if repeats is None:
            indices = list(range(len(aspect_ratios)))
        else:
            if len(repeats) != len(aspect_ratios):
                raise ValueError(f"{len(repeats)} repeat counts for {len(aspect_ratios)} images")
            bad = [n for n in repeats if isinstance(n, bool) or not isinstance(n, int) or n < 1]
            if bad:
                raise ValueError(f"repeat counts must be integers >= 1, got {bad[:3]}")
            indices = [i for i, n in enumerate(repeats) for _ in range(n)]
        self.num_samples = len(indices)
        self.groups = [
            [i for i in indices if aspect_ratios[i] >= 1],
            [i for i in indices if aspect_ratios[i] < 1],
        ]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    def batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches: list[list[int]] = []
        for group in self.groups:
            order = (
                [group[i] for i in torch.randperm(len(group), generator=g)]
                if self.shuffle
                else group
            )
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g)]
        seeds = torch.randint(0, 2**31 - 1, (sum(len(b) for b in batches),), generator=g).tolist()
        it = iter(seeds)
        return [[(i, next(it)) for i in batch] for batch in batches]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        yield from self.batches(self.epoch)[self.start_batch :]

    def __len__(self) -> int:
        return len(self.batches(self.epoch)) - self.start_batch


def make_loader(
    dataset,
    batch_sampler: torch.utils.data.Sampler,
    *,
    size_divisor: int = 32,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
    worker_init_fn: Callable[[int], None] | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` in the batches of ``batch_sampler``, padded by
    :func:`make_collate`.

    ``generator`` draws the loader's base seed when it is iterated (None: the global torch
    RNG, as DataLoader does); ``worker_init_fn`` runs in each worker process.
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=make_collate(size_divisor),
        num_workers=num_workers,
        generator=generator,
        worker_init_fn=worker_init_fn,
        persistent_workers=False,
    )


def build_loader(
    dataset,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
    size_divisor: int = 32,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` with grouped batches (shuffled when ``train``)."""
    sampler = GroupedBatchSampler(
        [r.aspect_ratio for r in dataset.records], batch_size, shuffle=train, seed=seed
    )
    return make_loader(dataset, sampler, size_divisor=size_divisor, num_workers=num_workers)
