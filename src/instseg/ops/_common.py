"""Helpers shared by the RoI operators: argument checks, layout changes, ragged ranges.

Every operator validates its arguments up front and raises a ``ValueError`` that names the
bad argument, so that a shape or device mistake never surfaces as an index error deep inside
a gather.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class ArgumentAssertionError(ValueError, AssertionError):
    """A bad argument where torchvision fails an assertion (``torch._assert``).

    Catchable as our ``ValueError`` and as the ``AssertionError`` code written against
    torchvision expects.
    """


class ArgumentRuntimeError(ValueError, RuntimeError):
    """A bad argument where torchvision's compiled kernel raises (``TORCH_CHECK``).

    Catchable as our ``ValueError`` and as the ``RuntimeError`` code written against
    torchvision expects.
    """


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``value`` as a ``(height, width)`` pair of positive ints."""
    if isinstance(value, int):
        h = w = value
    else:
        items = tuple(value)
        if len(items) != 2:
            raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
        h, w = items
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (h, w)):
        raise ValueError(f"{name} must hold ints, got {value!r}")
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return h, w


def check_feature_map(input: Tensor, name: str = "input") -> None:
    if not isinstance(input, Tensor):
        raise ValueError(f"{name} must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"{name} must be [B, C, H, W], got shape {tuple(input.shape)}")
    if not input.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {input.dtype}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an operator computes in: half and bfloat16 are promoted to float32."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def as_rois(boxes: Tensor | Sequence[Tensor], input: Tensor, name: str = "boxes") -> Tensor:
    """Validated ``(K, 5)`` RoIs ``(batch_idx, x1, y1, x2, y2)`` for ``input``.

    Accepts the torchvision forms: a ``(K, 5)`` tensor, or a list with one ``(L_i, 4)`` box
    tensor per image (the batch index is then the list position). The batch index is truncated
    to int, as the C++ kernels do, and must lie in ``[0, B)``; coordinates must be finite.
    """
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[-1] != 4:
                shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(f"{name}[{i}] must be a Tensor[L, 4], got {shape}")
        if len(boxes) == 0:
            rois = input.new_zeros((0, 5))
        else:
            ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
            rois = torch.cat([torch.cat(ids), torch.cat(list(boxes))], dim=1)
    elif isinstance(boxes, Tensor):
        rois = boxes
    else:
        raise ValueError(f"{name} must be a Tensor[K, 5] or a list of Tensor[L, 4]")

    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"{name} must be [K, 5] (batch_idx, x1, y1, x2, y2), got shape {tuple(rois.shape)}"
        )
    if not rois.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {rois.dtype}")
    if rois.device != input.device:
        raise ValueError(f"{name} are on {rois.device} but the feature map is on {input.device}")
    low_precision_input = input.dtype in _LOW_PRECISION and rois.dtype == torch.float32
    if rois.dtype != input.dtype and not low_precision_input:
        raise ValueError(
            f"{name} dtype {rois.dtype} does not match the feature map dtype {input.dtype}"
        )
    if rois.shape[0] > 0:
        batch = rois[:, 0].detach().long()
        lo, hi = int(batch.min()), int(batch.max())
        if lo < 0 or hi >= input.shape[0]:
            raise ValueError(
                f"{name} batch index out of range: got [{lo}, {hi}] for a batch of {input.shape[0]}"
            )
        if not bool(torch.isfinite(rois.detach()).all()):
            raise ValueError(f"{name} contain NaN or inf coordinates")
    return rois


def empty_output(input: Tensor, channels: int, ph: int, pw: int) -> Tensor:
    """A (0, C, ph, pw) result that is still connected to ``input`` for autograd."""
    return input.reshape(-1)[:0].reshape(0, channels, ph, pw)


def channels_last_table(input: Tensor, dtype: torch.dtype) -> Tensor:
    """The feature map as a ``(B*H*W, C)`` row table, the layout ``embedding_bag`` gathers from.

    A view when ``input`` is already channels-last; otherwise one copy of the map (never one
    per RoI).
    """
    b, c, h, w = input.shape
    return input.to(dtype).permute(0, 2, 3, 1).reshape(b * h * w, c)


def bags_to_nchw(rows: Tensor, k: int, ph: int, pw: int, dtype: torch.dtype) -> Tensor:
    """``(K*ph*pw, C)`` per-bin rows back to a contiguous ``(K, C, ph, pw)`` tensor."""
    c = rows.shape[-1]
    return (
        rows.view(k, ph, pw, c).permute(0, 3, 1, 2).to(dtype, memory_format=torch.contiguous_format)
    )


def ragged_arange(counts: Tensor) -> tuple[Tensor, Tensor]:
    """For group sizes ``counts`` (1-D, non-negative), each element's group and its rank in it.

    ``ragged_arange(tensor([2, 0, 3]))`` gives groups ``[0, 0, 2, 2, 2]`` and ranks
    ``[0, 1, 0, 1, 2]``: the flat enumeration of a ragged array without a Python loop.
    """
    groups = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.arange(groups.numel(), device=counts.device) - starts[groups]
    return groups, ranks


def bag_offsets(sizes: Tensor) -> Tensor:
    """``embedding_bag`` offsets (start of each bag) for consecutive bags of ``sizes``."""
    return torch.cumsum(sizes, 0) - sizes
