"""Helpers shared by the RoI operators: argument checks, layout changes, ragged ranges.

Every operator validates its arguments up front and raises a ``ValueError`` that names the
bad argument, so that a shape or device mistake never surfaces as an index error deep inside
a gather. Where torchvision rejects the same mistake, the error is also an instance of the
class torchvision raises (``AssertionError``, ``RuntimeError``, ``IndexError``, ...), so code
written against torchvision keeps catching it.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Iterable, Sequence

import numpy as np
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


class ArgumentNotImplementedError(ArgumentRuntimeError, NotImplementedError):
    """A dtype torchvision's kernels have no implementation for (``NotImplementedError``,
    itself a ``RuntimeError``)."""


class ArgumentIndexError(ValueError, IndexError):
    """A tensor with too few dimensions or columns, where torchvision fails indexing it
    (``IndexError``)."""


class ArgumentTypeError(ValueError, TypeError):
    """A value of the wrong kind where torchvision raises ``TypeError``."""


class ArgumentAttributeError(ValueError, AttributeError):
    """A non-tensor where torchvision expects a tensor and fails looking up one of its
    attributes (``AttributeError``)."""


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``value`` as a ``(height, width)`` pair of positive ints.

    Reads ``value`` as torchvision's ``_pair`` does (an iterable is taken as is, anything
    else is repeated twice); ints are whatever torchvision's operator schema takes as one
    (``bool``, numpy integers, one-element integer tensors).
    """
    if isinstance(value, Iterable):
        try:
            items = tuple(value)
        except TypeError as exc:  # a 0-d tensor
            raise ArgumentTypeError(
                f"{name} must be an int or a pair (h, w), got {value!r}"
            ) from exc
    else:
        items = (value, value)
    if len(items) < 2:
        raise ArgumentIndexError(f"{name} must be an int or a pair (h, w), got {value!r}")
    if len(items) > 2:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
    try:
        h, w = (operator.index(v) for v in items)
    except TypeError as exc:
        raise ArgumentRuntimeError(f"{name} must hold ints, got {value!r}") from exc
    if h <= 0 or w <= 0:
        raise ArgumentRuntimeError(f"{name} must be positive, got {value!r}")
    return h, w


def check_int(value: object, name: str) -> int:
    """``value`` as an int, accepting what torchvision's operator schema takes as one
    (``bool``, numpy integers, one-element integer tensors)."""
    try:
        return operator.index(value)
    except TypeError as exc:
        raise ArgumentRuntimeError(f"{name} must be an int, got {value!r}") from exc


def check_float(value: object, name: str) -> float:
    """``value`` as a float: a real number or a one-element real tensor, as torchvision's
    operator schema accepts."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if not isinstance(value, numbers.Real):
        raise ArgumentRuntimeError(f"{name} must be a float, got {value!r}")
    return float(value)


def check_bool(value: object, name: str) -> bool:
    """``value`` as a bool: ``None`` (false), ints, numpy bools, as torchvision accepts."""
    if value is not None and not isinstance(value, (numbers.Integral, np.bool_)):
        raise ArgumentRuntimeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_feature_map(
    input: Tensor,
    name: str = "input",
    not_tensor: type[ValueError] = ArgumentAttributeError,
    dtype_error: type[ValueError] = ArgumentNotImplementedError,
) -> None:
    """A ``(B, C, H, W)`` floating-point tensor, else an error naming ``name``.

    The classes are torchvision's: a non-tensor fails an attribute lookup (``not_tensor``:
    roi_pool's operator schema rejects it instead), too few dimensions fail indexing, and its
    kernels are not implemented for integer dtypes (``dtype_error``).
    """
    if not isinstance(input, Tensor):
        raise not_tensor(f"{name} must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ArgumentIndexError(f"{name} must be [B, C, H, W], got shape {tuple(input.shape)}")
    if not input.is_floating_point():
        raise dtype_error(f"{name} must be floating point, got {input.dtype}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an operator computes in: half and bfloat16 are promoted to float32."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type."""
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4 takes no device type
        if device.type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device.type == "cuda" and torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def _rois_from_list(boxes: Sequence[Tensor], input: Tensor, name: str) -> Tensor:
    """torchvision's ``convert_boxes_to_roi_format``: one ``(L_i, 4)`` tensor per image.

    An empty list gives no RoIs (torchvision's ``torch.cat`` of no tensors raises instead).
    """
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor):
            raise ArgumentAttributeError(
                f"{name}[{i}] must be a Tensor[L, 4], got {type(b).__name__}"
            )
        if b.dim() < 2:
            raise ArgumentIndexError(f"{name}[{i}] must be a Tensor[L, 4], got {tuple(b.shape)}")
        if b.dim() != 2 or b.shape[1] != 4:
            raise ArgumentAssertionError(
                f"{name}[{i}] must be a Tensor[L, 4], got {tuple(b.shape)}"
            )
    if len(boxes) == 0:
        return input.new_zeros((0, 5))
    ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(ids), torch.cat(list(boxes))], dim=1)


def as_rois(
    boxes: Tensor | Sequence[Tensor],
    input: Tensor,
    name: str = "boxes",
    dtype_error: type[ValueError] = ArgumentRuntimeError,
    mixed_dtypes: bool = False,
) -> Tensor:
    """Validated ``(K, 5)`` RoIs ``(batch_idx, x1, y1, x2, y2)`` for ``input``.

    Accepts the torchvision forms: a ``(K, 5)`` tensor, or a list with one ``(L_i, 4)`` box
    tensor per image (the batch index is then the list position; an empty list is no RoIs).
    The batch index is truncated to int, as the C++ kernels do, and must lie in ``[0, B)``;
    coordinates must be finite (torchvision checks neither: it reads out of bounds, or
    crashes on NaN).

    The RoI dtype must be the feature dtype, except that float32 RoIs are accepted with
    float16/bfloat16 features (as under autocast); with ``mixed_dtypes`` any mix of float16,
    bfloat16 and float32 is accepted (torchvision's roi_align under autocast). A non-float
    RoI tensor raises ``dtype_error``.
    """
    if isinstance(boxes, (list, tuple)):
        rois = _rois_from_list(boxes, input, name)
    elif isinstance(boxes, Tensor):
        rois = boxes
        if rois.dim() < 2:
            raise ArgumentIndexError(
                f"{name} must be [K, 5] (batch_idx, x1, y1, x2, y2), got shape {tuple(rois.shape)}"
            )
    else:
        raise ArgumentAssertionError(
            f"{name} must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}"
        )

    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ArgumentAssertionError(
            f"{name} must be [K, 5] (batch_idx, x1, y1, x2, y2), got shape {tuple(rois.shape)}"
        )
    if not rois.is_floating_point():
        raise dtype_error(f"{name} must be floating point, got {rois.dtype}")
    if rois.device != input.device:
        raise ArgumentRuntimeError(
            f"{name} are on {rois.device} but the feature map is on {input.device}"
        )
    single = (torch.float32, *_LOW_PRECISION)
    low_precision_input = input.dtype in _LOW_PRECISION and rois.dtype == torch.float32
    autocast_mix = mixed_dtypes and input.dtype in single and rois.dtype in single
    if rois.dtype != input.dtype and not (low_precision_input or autocast_mix):
        raise ArgumentRuntimeError(
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


def empty_output(input: Tensor, k: int, channels: int, ph: int, pw: int) -> Tensor:
    """A ``(k, C, ph, pw)`` result with no elements (``k == 0`` or ``C == 0``) that is still
    connected to ``input`` for autograd."""
    return input.reshape(-1)[:0].reshape(k, channels, ph, pw)


def channels_last_table(input: Tensor, dtype: torch.dtype) -> Tensor:
    """The feature map as a ``(B*H*W, C)`` row table, the layout ``embedding_bag`` gathers from.

    A view when ``input`` is already channels-last; otherwise one copy of the map (never one
    per RoI).
    """
    b, c, h, w = input.shape
    return input.to(dtype).permute(0, 2, 3, 1).reshape(b * h * w, c)


def bags_to_nchw(
    rows: Tensor, k: int, ph: int, pw: int, dtype: torch.dtype, channels_last: bool = False
) -> Tensor:
    """``(K*ph*pw, C)`` per-bin rows back to a ``(K, C, ph, pw)`` tensor: contiguous, or with
    ``channels_last`` a channels-last view of the rows (no copy)."""
    c = rows.shape[-1]
    nchw = rows.view(k, ph, pw, c).permute(0, 3, 1, 2)
    if channels_last:
        return nchw.to(dtype)
    return nchw.to(dtype, memory_format=torch.contiguous_format)


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
