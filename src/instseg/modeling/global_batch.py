"""Loss normalisers and random choices over the global batch, which data-parallel training
splits across ranks.

A loss averaged over a batch divides a sum by a count: sampled anchors or RoIs, positive
points, mask pixels. Under DDP every rank holds part of the batch and the gradients of the
ranks' losses are averaged, so each rank must divide its own sum by the *mean over ranks*
of the counts (the global count over the world size): the average of the ranks' gradients
is then the gradient of the global batch's loss, the one a single process holding the whole
batch computes. mmdet does this for FCOS's ``num_pos`` (``reduce_mean``); here every
normaliser does it, so a run's losses and updates do not depend on the world size.

Random choices are made per image from the image's own seed
(:meth:`instseg.structures.InstanceTargets.generator`), so they do not depend on which rank
holds the image either; a choice over the whole batch (Grid R-CNN's ``max_num_grid``
positives) draws one permutation of the global batch from a seed every rank shares.

The trainer turns the cross-rank reductions on with :func:`across_ranks` around the forward
pass. Outside it (a single process, inference, a unit test) every function here is the
plain single-process computation, bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

_ACTIVE: list[bool] = [False]


@contextlib.contextmanager
def across_ranks() -> Iterator[None]:
    """Reduce the normalisers over the default process group inside the block (training
    forward passes under DDP; every rank must run the same losses in the same order)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("across_ranks() needs an initialised default process group")
    previous = _ACTIVE[0]
    _ACTIVE[0] = True
    try:
        yield
    finally:
        _ACTIVE[0] = previous


def syncing() -> bool:
    """Whether normalisers are reduced across ranks (inside :func:`across_ranks`)."""
    return _ACTIVE[0]


def collective_device() -> torch.device:
    """Where the default group's collectives run: CUDA for NCCL, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values: list[float]) -> list[float]:
    buffer = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(buffer)
    return buffer.tolist()


def normaliser(count: float | Tensor, minimum: float | None = None) -> float | Tensor:
    """The divisor of a loss summed over this rank's part of the batch.

    One process: ``count``, raised to ``minimum`` when given (the value and type the
    single-process code has always used). Across ranks: the global count, raised to
    ``minimum``, over the world size (a Python float).
    """
    if not syncing():
        if minimum is None:
            return count
        if isinstance(count, Tensor):
            return count.clamp(min=minimum)
        return max(count, minimum)
    local = float(count.detach()) if isinstance(count, Tensor) else float(count)
    (total,) = _all_reduce([local])
    if minimum is not None:
        total = max(total, minimum)
    return total / dist.get_world_size()


def batch_mean(losses: Tensor) -> Tensor:
    """The mean of per-element ``losses`` over the global batch (``losses.mean()`` in one
    process; across ranks an empty tensor contributes nothing, and a batch with no element
    at all gives 0)."""
    if not syncing():
        return losses.mean()
    return losses.sum() / normaliser(losses.numel(), minimum=1)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """``F.cross_entropy`` averaged over the global batch (the plain call in one process:
    its mean is not bit-identical to the mean of the per-element losses)."""
    if not syncing():
        return F.cross_entropy(logits, labels)
    return batch_mean(F.cross_entropy(logits, labels, reduction="none"))


def binary_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``F.binary_cross_entropy_with_logits`` averaged over the global batch (the plain call
    in one process: its fused backward rounds differently from the per-element mean's)."""
    if not syncing():
        return F.binary_cross_entropy_with_logits(logits, targets)
    return batch_mean(F.binary_cross_entropy_with_logits(logits, targets, reduction="none"))


def empty_loss(zero_source: Tensor, normalisers: int = 1) -> Tensor:
    """The zero loss of a part of the batch with nothing to average: ``zero_source * 0``
    (keeping the parameters behind ``zero_source`` in the graph, as DDP needs), after
    taking part in the ``normalisers`` collective reductions the non-empty ranks run."""
    if syncing():
        for _ in range(normalisers):
            normaliser(0)
    return zero_source * 0.0


def permutation(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A random permutation of ``range(n)`` on ``device``, drawn from the CPU ``generator``
    (None: the global torch RNG on ``device``)."""
    if generator is None:
        return torch.randperm(n, device=device)
    return torch.randperm(n, generator=generator).to(device)


def offset_in_batch(count: int) -> tuple[int, int]:
    """``(items on lower ranks, items on every rank)`` for ``count`` items here, so the
    ranks' items are numbered as one process holding the whole batch numbers them
    (``(0, count)`` in one process)."""
    if not syncing():
        return 0, count
    counts = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=collective_device())
    counts[dist.get_rank()] = count
    dist.all_reduce(counts)
    per_rank = [int(c) for c in counts.tolist()]
    return sum(per_rank[: dist.get_rank()]), sum(per_rank)


def random_subset(
    count: int, max_count: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Indices of this rank's ``count`` items kept when ``max_count`` items of the global
    batch are chosen at random (all of them when there are fewer), in the order drawn.

    ``generator`` (a CPU generator every rank seeds alike) draws one permutation of the
    global batch; None uses the global torch RNG, which only one process may do.
    """
    offset, total = offset_in_batch(count)
    if generator is None and syncing():
        raise ValueError("a random choice over the global batch needs a seeded generator")
    if generator is None:
        return torch.randperm(total)[:max_count].to(device)
    chosen = torch.randperm(total, generator=generator)[:max_count]
    mine = chosen[(chosen >= offset) & (chosen < offset + count)] - offset
    return mine.to(device)
