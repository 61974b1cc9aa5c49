"""GCNet's global context block (Cao et al., 2019), as mmcv's ``ContextBlock`` (spec §2.3).

One (C, 1, 1) context vector per image (a softmax-weighted or plain spatial mean of the
map) goes through a bottleneck transform and is broadcast back onto every position, by
addition and/or sigmoid gating. It is a cheap stand-in for a non-local block, whose
attention maps GCNet found to be almost the same for every query. The GRoIE GCNet configs
put one after conv3 of every ResNet bottleneck in c3-c5. Names and init are mmcv's; the
last conv of each fusion branch starts at zero, so a fresh channel-add block is the
identity (a channel-mul branch starts as a gate of sigmoid(0) = 1/2, as in mmcv).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

POOLING_TYPES: tuple[str, ...] = ("att", "avg")
FUSION_TYPES: tuple[str, ...] = ("channel_add", "channel_mul")


def _transform(channels: int, planes: int) -> nn.Sequential:
    """conv1x1 C->planes, LayerNorm over (planes, 1, 1), ReLU, conv1x1 planes->C."""
    return nn.Sequential(
        nn.Conv2d(channels, planes, 1),
        nn.LayerNorm([planes, 1, 1]),
        nn.ReLU(inplace=True),
        nn.Conv2d(planes, channels, 1),
    )


class ContextBlock(nn.Module):
    """``x * sigmoid(mul(context)) + add(context)`` with ``planes = int(C * ratio)``.

    ``pooling_type``: ``"att"`` weighs positions by ``softmax(conv_mask(x))`` over H*W,
    ``"avg"`` averages them. ``fusion_types``: a non-empty subset of ``"channel_add"`` and
    ``"channel_mul"`` (the gate is applied before the addition, as in mmcv).
    """

    def __init__(
        self,
        in_channels: int,
        ratio: float,
        pooling_type: str = "att",
        fusion_types: Sequence[str] = ("channel_add",),
    ) -> None:
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels <= 0:
            raise ValueError(f"ContextBlock in_channels must be positive, got {in_channels!r}")
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not ratio > 0:
            raise ValueError(f"ContextBlock ratio must be a positive number, got {ratio!r}")
        planes = int(in_channels * ratio)
        if planes < 1:
            raise ValueError(
                f"ContextBlock ratio {ratio} leaves int({in_channels} * {ratio}) = {planes} "
                "bottleneck channels; it needs at least 1"
            )
        if pooling_type not in POOLING_TYPES:
            raise ValueError(
                f"ContextBlock pooling_type must be one of {list(POOLING_TYPES)}, "
                f"got {pooling_type!r}"
            )
        if (
            isinstance(fusion_types, str)
            or not isinstance(fusion_types, Sequence)
            or not fusion_types
            or any(f not in FUSION_TYPES for f in fusion_types)
            or len(set(fusion_types)) != len(fusion_types)
        ):
            raise ValueError(
                "ContextBlock fusion_types must be a non-empty sequence of distinct values from "
                f"{list(FUSION_TYPES)}, got {fusion_types!r}"
            )
        self.in_channels = in_channels
        self.ratio = ratio
        self.planes = planes
        self.pooling_type = pooling_type
        self.fusion_types = tuple(fusion_types)

        if pooling_type == "att":
            self.conv_mask = nn.Conv2d(in_channels, 1, 1)
        else:
            self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.channel_add_conv: nn.Sequential | None = None
        self.channel_mul_conv: nn.Sequential | None = None
        if "channel_add" in self.fusion_types:
            self.channel_add_conv = _transform(in_channels, planes)
        if "channel_mul" in self.fusion_types:
            self.channel_mul_conv = _transform(in_channels, planes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv's init: ``conv_mask`` Kaiming-normal (fan_in, ReLU gain) with bias 0, the last
        conv of each fusion branch all zero; the rest keep PyTorch's defaults."""
        if self.pooling_type == "att":
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)
        for branch in (self.channel_add_conv, self.channel_mul_conv):
            if branch is not None:
                nn.init.zeros_(branch[-1].weight)
                nn.init.zeros_(branch[-1].bias)

    def spatial_pool(self, x: Tensor) -> Tensor:
        """The (N, C, 1, 1) context vector."""
        if self.pooling_type == "avg":
            return self.avg_pool(x)
        n, c, h, w = x.shape
        mask = self.conv_mask(x).view(n, h * w, 1).softmax(dim=1)  # (N, HW, 1)
        return torch.bmm(x.reshape(n, c, h * w), mask).view(n, c, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ContextBlock expects (N, {self.in_channels}, H, W) input, got {tuple(x.shape)}"
            )
        context = self.spatial_pool(x)
        out = x
        if self.channel_mul_conv is not None:
            out = out * torch.sigmoid(self.channel_mul_conv(context))
        if self.channel_add_conv is not None:
            out = out + self.channel_add_conv(context)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, planes={self.planes}, "
            f"pooling_type={self.pooling_type!r}, fusion_types={self.fusion_types}"
        )
