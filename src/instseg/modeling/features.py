"""What a neck publishes about its feature maps, so every later part is built from it.

A :class:`FeatureSpec` names one map (``"p2"`` for stride 4, ``"p3"`` for 8, ...) with its
width and stride. The neck's ``output_specs`` list them finest first; the RPN, the RoI
extractors and the heads take the specs of the levels they read instead of repeating
widths and strides in their configs, and read the maps by name from :data:`Features`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

Features = dict[str, Tensor]
"""Feature maps by level name, finest first (``{"p2": (B, C, H/4, W/4), ...}``)."""


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    channels: int
    stride: int


def level_name(stride: int, prefix: str = "p") -> str:
    """``"p2"`` for stride 4: the FPN convention of naming a level by log2 of its stride."""
    level = math.log2(stride)
    if stride <= 0 or level != int(level):
        raise ValueError(f"a feature stride must be a power of two, got {stride}")
    return f"{prefix}{int(level)}"


def pyramid_specs(channels: int, strides: Sequence[int] = (4, 8, 16, 32, 64)) -> list[FeatureSpec]:
    """Specs of an FPN of one width: ``p2..p6`` by default."""
    return [FeatureSpec(level_name(s), channels, s) for s in strides]


def select_specs(specs: Sequence[FeatureSpec], names: Sequence[str], key: str) -> list[FeatureSpec]:
    """The specs named ``names``, in that order; ``key`` names the config field in errors."""
    by_name = {s.name: s for s in specs}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(
            f"{key} names feature levels {missing} that the neck does not give; it gives "
            f"{[s.name for s in specs]}"
        )
    if not names:
        raise ValueError(f"{key} must name at least one feature level")
    return [by_name[n] for n in names]


def common_width(specs: Sequence[FeatureSpec], key: str) -> int:
    """The one width shared by ``specs`` (heads shared across levels need it)."""
    widths = {s.channels for s in specs}
    if len(widths) != 1:
        raise ValueError(
            f"{key} reads levels of different widths {[(s.name, s.channels) for s in specs]}"
        )
    return widths.pop()
