"""The R-CNN box head (mmdet ``Shared2FCBBoxHead``) and mask head (``FCNMaskHead``).

Parameter names follow mmdet's so that its checkpoints map key for key.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class BoxHeadConfig:
    in_channels: int = 256
    roi_size: int = 7
    fc_channels: int = 1024
    num_fcs: int = 2


class Shared2FCBoxHead(nn.Module):
    """Flatten, ``num_fcs`` x (fc + ReLU), then a ``num_classes + 1``-way classifier
    (background last) and class-specific deltas ``(4 * num_classes)``."""

    def __init__(self, cfg: BoxHeadConfig, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        dims = [cfg.in_channels * cfg.roi_size * cfg.roi_size] + [cfg.fc_channels] * cfg.num_fcs
        self.shared_fcs = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        self.fc_cls = nn.Linear(dims[-1], num_classes + 1)
        self.fc_reg = nn.Linear(dims[-1], 4 * num_classes)
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class _ConvReLU(nn.Module):
    """conv3x3 + ReLU, named ``conv`` as in mmcv's ConvModule (no norm, so with bias)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x))


@dataclass
class MaskHeadConfig:
    in_channels: int = 256
    conv_channels: int = 256
    num_convs: int = 4


class FCNMaskHead(nn.Module):
    """``num_convs`` x (conv3x3 + ReLU), a 2x deconv + ReLU, and a 1x1 conv to one mask logit
    map per class: 14x14 RoI features give 28x28 masks."""

    def __init__(self, cfg: MaskHeadConfig, num_classes: int) -> None:
        super().__init__()
        channels = [cfg.in_channels] + [cfg.conv_channels] * cfg.num_convs
        self.convs = nn.ModuleList(_ConvReLU(a, b) for a, b in pairwise(channels))
        self.upsample = nn.ConvTranspose2d(channels[-1], cfg.conv_channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(cfg.conv_channels, num_classes, 1)
        for layer in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))


def select_class(per_class: Tensor, labels: Tensor) -> Tensor:
    """``per_class[i, labels[i]]`` for a ``(N, C, ...)`` tensor."""
    return per_class[torch.arange(per_class.shape[0], device=per_class.device), labels]
