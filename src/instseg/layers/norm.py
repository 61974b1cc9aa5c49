"""Normalisation layers for backbones and heads, chosen by a short name in typed configs.

``FrozenBatchNorm2d`` is a BatchNorm whose statistics and affine terms are fixed buffers:
detectors fine-tune from ImageNet weights with a few images per GPU, too few for useful
batch statistics. Its state-dict keys match ``nn.BatchNorm2d`` (less ``num_batches_tracked``)
so ImageNet checkpoints load into either.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

NORM_KINDS: tuple[str, ...] = ("FrozenBN", "BN", "SyncBN", "GN")


class FrozenBatchNorm2d(nn.Module):
    """``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` with fixed buffers.

    Equal to ``nn.BatchNorm2d`` in eval mode with the same statistics, in any mode. Nothing
    here is a parameter, so nothing is trained and no optimizer sees it.
    """

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # BatchNorm checkpoints carry a step counter that has no meaning here; drop it so a
        # strict load of an nn.BatchNorm2d state dict succeeds.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:
        # One multiply-add per element: the statistics folded into a scale and a shift.
        scale, shift = _scale_shift(self)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(shape).to(x.dtype) + shift.view(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the whole global batch: every rank of
    the default process group contributes its images (mmdet's / detectron2's ``SyncBN``).

    Outside a multi-process group (one process, eval mode, frozen statistics) it is exactly
    ``nn.BatchNorm2d``. Inside one, the per-channel mean and then the variance around it are
    summed over ranks with a differentiable all-reduce (:class:`_AllReduceSum`, whose
    backward all-reduces the gradient too), so forward and backward equal BatchNorm over the
    concatenated batch. Unlike ``nn.SyncBatchNorm`` this runs on CPU (gloo) as on GPU; its
    state-dict keys are BatchNorm's, so checkpoints move between the two.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _distributed_world() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        count = x.new_tensor([x.numel() / x.shape[1]])
        # One reduction for the sums and the count, a second for the squared deviations around
        # the global mean (two passes: no cancellation in E[x^2] - E[x]^2).
        totals = all_reduce(torch.cat([x.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce(centred.pow(2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        y = centred * (var + self.eps).rsqrt().view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class _AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over the ranks of the default group, differentiable: the
    gradient of every rank's input is the sum of the ranks' output gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad


def _distributed_world() -> int:
    """The size of the default process group, 1 without one."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def fixed_affine(norm: nn.Module) -> tuple[Tensor, Tensor] | None:
    """``(scale, shift)`` with ``norm(y) == y * scale + shift`` per channel when the norm uses
    fixed statistics (FrozenBatchNorm2d; BatchNorm / SyncBN in eval mode with running
    statistics); None otherwise (training-mode BN, GroupNorm). Trainable affine terms stay in
    the graph, so gradients reach them through the scale and shift."""
    fixed = isinstance(norm, FrozenBatchNorm2d) or (
        isinstance(norm, nn.BatchNorm2d)
        and not norm.training
        and norm.running_mean is not None
        and norm.running_var is not None
    )
    return _scale_shift(norm) if fixed else None


def _scale_shift(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """A BatchNorm's running statistics and affine terms as one per-channel scale and shift."""
    scale = (norm.running_var + norm.eps).rsqrt()
    if norm.weight is not None:
        scale = norm.weight * scale
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = norm.bias + shift
    return scale, shift


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))`` in one convolution when the norm is a fixed per-channel affine
    (:func:`fixed_affine`): its scale goes into the weights and its shift becomes the bias,
    which saves a pass over the map forward and backward. Equal up to float rounding (the
    scale multiplies each product instead of the sum)."""
    affine = fixed_affine(norm)
    if affine is None:
        return norm(conv(x))
    scale, shift = affine
    weight = conv.weight * scale.to(conv.weight.dtype).view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return conv._conv_forward(x, weight, bias.to(conv.weight.dtype))


def build_norm(kind: str, channels: int, num_groups: int = 32) -> nn.Module:
    """Make the norm layer named ``kind`` (one of ``NORM_KINDS``) for ``channels`` channels.

    ``"BN"`` and ``"SyncBN"`` (:class:`SyncBatchNorm2d`) use PyTorch defaults (eps 1e-5,
    momentum 0.1); ``"GN"`` is
    ``nn.GroupNorm(num_groups, channels)``, which needs ``channels % num_groups == 0``.
    """
    if channels <= 0:
        raise ValueError(f"channels must be positive, got {channels}")
    if kind == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if kind == "BN":
        return nn.BatchNorm2d(channels)
    if kind == "SyncBN":
        return SyncBatchNorm2d(channels)
    if kind == "GN":
        if num_groups <= 0 or channels % num_groups != 0:
            raise ValueError(
                f"GN needs channels divisible by num_groups, got channels={channels}, "
                f"num_groups={num_groups}"
            )
        return nn.GroupNorm(num_groups, channels)
    raise ValueError(f"unknown norm kind {kind!r}; valid kinds are {', '.join(NORM_KINDS)}")
