"""Feature Pyramid Network as mmdet's ``FPN`` with ``add_extra_convs=False``.

Each input level gets a 1x1 lateral conv; coarser laterals are nearest-upsampled to the
finer level's exact size and added, top down; a 3x3 conv smooths each sum. Levels beyond
the inputs come from ``max_pool2d(kernel 1, stride 2)`` on the last output (P6 for
Mask R-CNN, spec §1.5). Module names follow mmdet checkpoints (``lateral_convs.{i}.conv``,
``fpn_convs.{i}.conv``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..features import FeatureSpec, level_name


@dataclass
class FPNConfig:
    """Output width of every level and how many levels to return (inputs plus extra ones)."""

    out_channels: int = 256
    num_outs: int = 5

    def __post_init__(self) -> None:
        if not isinstance(self.out_channels, int) or self.out_channels <= 0:
            raise ValueError(
                f"FPNConfig.out_channels must be a positive int, got {self.out_channels!r}"
            )
        if not isinstance(self.num_outs, int) or self.num_outs <= 0:
            raise ValueError(f"FPNConfig.num_outs must be a positive int, got {self.num_outs!r}")


class _ConvWithBias(nn.Module):
    """A biased conv held under ``.conv`` so parameter names match mmcv's ConvModule."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class FPN(nn.Module):
    """``forward(features)`` maps C-levels (finest first) to ``cfg.num_outs`` P-levels.

    ``in_strides`` are the strides of the inputs (default ``4, 8, 16, ...``, i.e. C2 onward);
    ``strides`` and ``out_channels`` describe the outputs, extra levels doubling the stride,
    and ``output_specs`` name them (``p2`` for stride 4, ...) for the parts built on them.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        cfg: FPNConfig | None = None,
        in_strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        cfg = FPNConfig() if cfg is None else cfg
        self.cfg = cfg
        self.in_channels = list(in_channels)
        if not self.in_channels or any(c <= 0 for c in self.in_channels):
            raise ValueError(
                f"FPN in_channels must be a non-empty list of positive ints, got {in_channels!r}"
            )
        num_ins = len(self.in_channels)
        if cfg.num_outs < num_ins:
            raise ValueError(
                f"FPNConfig.num_outs ({cfg.num_outs}) must be at least the number of input "
                f"levels ({num_ins})"
            )
        strides = [4 * 2**i for i in range(num_ins)] if in_strides is None else list(in_strides)
        if len(strides) != num_ins or any(s <= 0 for s in strides):
            raise ValueError(
                f"FPN in_strides must give one positive stride per input level ({num_ins}), "
                f"got {in_strides!r}"
            )
        for _ in range(cfg.num_outs - num_ins):
            strides.append(strides[-1] * 2)
        self.strides: list[int] = strides
        self.out_channels: list[int] = [cfg.out_channels] * cfg.num_outs
        self.output_specs: list[FeatureSpec] = [
            FeatureSpec(level_name(s), c, s)
            for s, c in zip(strides, self.out_channels, strict=True)
        ]

        self.lateral_convs = nn.ModuleList(
            _ConvWithBias(c, cfg.out_channels, 1) for c in self.in_channels
        )
        self.fpn_convs = nn.ModuleList(
            _ConvWithBias(cfg.out_channels, cfg.out_channels, 3) for _ in self.in_channels
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != len(self.in_channels):
            raise ValueError(
                f"FPN was built for {len(self.in_channels)} input levels, got {len(features)}"
            )
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            finer = laterals[i - 1]
            laterals[i - 1] = finer + F.interpolate(
                laterals[i], size=finer.shape[-2:], mode="nearest"
            )
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=True)]
        while len(outs) < self.cfg.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs
