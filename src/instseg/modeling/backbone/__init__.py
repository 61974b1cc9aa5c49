"""Backbones: image -> multi-scale feature maps with known channels and strides."""

from .resnet import (
    RESNET_DEPTHS,
    BasicBlock,
    Bottleneck,
    ResNet,
    ResNetConfig,
    WeightsReport,
    read_state_dict,
)

__all__ = [
    "RESNET_DEPTHS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ResNetConfig",
    "WeightsReport",
    "read_state_dict",
]
