"""Reusable building blocks shared by backbones, necks and heads."""

from .norm import NORM_KINDS, FrozenBatchNorm2d, build_norm

__all__ = ["NORM_KINDS", "FrozenBatchNorm2d", "build_norm"]
