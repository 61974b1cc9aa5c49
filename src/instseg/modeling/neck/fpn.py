"""Feature Pyramid Network as mmdet's ``FPN``.

Each input level from ``start_level`` on gets a 1x1 lateral conv; coarser laterals are
nearest-upsampled to the finer level's exact size and added, top down; a 3x3 conv smooths
each sum. Levels beyond the inputs come either from ``max_pool2d(kernel 1, stride 2)`` on
the last output (``add_extra_convs="none"``: P6 for Mask R-CNN, spec §1.5) or from stride-2
3x3 convs (FCOS/CondInst, spec §4.2: the first reads the last input, lateral or output as
``add_extra_convs`` says, each later one the previous extra level, after a ReLU with
``relu_before_extra_convs``). Module names follow mmdet checkpoints (``lateral_convs.{i}.conv``,
``fpn_convs.{i}.conv``, the extra convs continuing ``fpn_convs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ...layers import WEIGHT_INITS, init_weight
from ..features import FeatureSpec, level_name

EXTRA_CONV_SOURCES = ("none", "on_input", "on_lateral", "on_output")


@dataclass
class FPNConfig:
    """Output width of every level, how many levels to return (inputs plus extra ones), the
    first backbone level used (``start_level=1``: C3 on, as FCOS) and how extra levels are
    made (``add_extra_convs``, one of :data:`EXTRA_CONV_SOURCES`; ``"none"`` max-pools).
    ``init`` initialises the conv weights (biases 0): "xavier_uniform" (mmdet) or
    "c2_xavier" (detectron2)."""

    out_channels: int = 256
    num_outs: int = 5
    start_level: int = 0
    add_extra_convs: Literal["none", "on_input", "on_lateral", "on_output"] = "none"
    relu_before_extra_convs: bool = False
    init: str = "xavier_uniform"

    def __post_init__(self) -> None:
        if self.init not in WEIGHT_INITS:
            raise ValueError(f"FPNConfig.init must be one of {WEIGHT_INITS}, got {self.init!r}")
        if self.add_extra_convs not in EXTRA_CONV_SOURCES:
            raise ValueError(
                f"FPNConfig.add_extra_convs must be one of {EXTRA_CONV_SOURCES}, "
                f"got {self.add_extra_convs!r}"
            )
        if not isinstance(self.start_level, int) or self.start_level < 0:
            raise ValueError(
                f"FPNConfig.start_level must be a non-negative int, got {self.start_level!r}"
            )
        if not isinstance(self.relu_before_extra_convs, bool):
            raise ValueError(
                "FPNConfig.relu_before_extra_convs must be true or false, got "
                f"{self.relu_before_extra_convs!r}"
            )
        if not isinstance(self.out_channels, int) or self.out_channels <= 0:
            raise ValueError(
                f"FPNConfig.out_channels must be a positive int, got {self.out_channels!r}"
            )
        if not isinstance(self.num_outs, int) or self.num_outs <= 0:
            raise ValueError(f"FPNConfig.num_outs must be a positive int, got {self.num_outs!r}")


class _ConvWithBias(nn.Module):
    """A biased conv held under ``.conv`` so parameter names match mmcv's ConvModule."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2
        )

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
        all_channels = list(in_channels)
        if not all_channels or any(c <= 0 for c in all_channels):
            raise ValueError(
                f"FPN in_channels must be a non-empty list of positive ints, got {in_channels!r}"
            )
        all_strides = (
            [4 * 2**i for i in range(len(all_channels))] if in_strides is None else list(in_strides)
        )
        if len(all_strides) != len(all_channels) or any(s <= 0 for s in all_strides):
            raise ValueError(
                f"FPN in_strides must give one positive stride per input level "
                f"({len(all_channels)}), got {in_strides!r}"
            )
        if cfg.start_level >= len(all_channels):
            raise ValueError(
                f"FPNConfig.start_level ({cfg.start_level}) must be below the number of input "
                f"levels ({len(all_channels)})"
            )
        self.num_inputs = len(all_channels)
        self.in_channels = all_channels[cfg.start_level :]
        num_ins = len(self.in_channels)
        if cfg.num_outs < num_ins:
            raise ValueError(
                f"FPNConfig.num_outs ({cfg.num_outs}) must be at least the number of used input "
                f"levels ({num_ins})"
            )
        strides = all_strides[cfg.start_level :]
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
        if cfg.add_extra_convs != "none":
            for i in range(cfg.num_outs - num_ins):
                width = (
                    self.in_channels[-1]
                    if i == 0 and cfg.add_extra_convs == "on_input"
                    else cfg.out_channels
                )
                self.fpn_convs.append(_ConvWithBias(width, cfg.out_channels, 3, stride=2))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                init_weight(module.weight, cfg.init)
                nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != self.num_inputs:
            raise ValueError(
                f"FPN was built for {self.num_inputs} input levels, got {len(features)}"
            )
        inputs = list(features)[self.cfg.start_level :]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            finer = laterals[i - 1]
            laterals[i - 1] = finer + F.interpolate(
                laterals[i], size=finer.shape[-2:], mode="nearest"
            )
        num_ins = len(laterals)
        outs = [conv(x) for conv, x in zip(self.fpn_convs[:num_ins], laterals, strict=True)]
        extra = self.cfg.add_extra_convs
        if extra == "none":
            while len(outs) < self.cfg.num_outs:
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            return outs
        sources = {"on_input": inputs[-1], "on_lateral": laterals[-1], "on_output": outs[-1]}
        for i in range(num_ins, self.cfg.num_outs):
            if i == num_ins:
                x = sources[extra]
            else:
                x = F.relu(outs[-1]) if self.cfg.relu_before_extra_convs else outs[-1]
            outs.append(self.fpn_convs[i](x))
        return outs
