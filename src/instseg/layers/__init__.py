"""Reusable building blocks shared by backbones, necks, heads and RoI extractors."""

from .context_block import ContextBlock
from .conv_module import ACTIVATIONS, ConvModule, ConvModuleConfig
from .generalized_attention import GeneralizedAttention, GeneralizedAttentionConfig
from .init import WEIGHT_INITS, init_weight
from .non_local import NonLocal2d, NonLocalConfig
from .norm import NORM_KINDS, FrozenBatchNorm2d, build_norm, conv_norm, fixed_affine

__all__ = [
    "ACTIVATIONS",
    "NORM_KINDS",
    "WEIGHT_INITS",
    "ContextBlock",
    "ConvModule",
    "ConvModuleConfig",
    "FrozenBatchNorm2d",
    "GeneralizedAttention",
    "GeneralizedAttentionConfig",
    "NonLocal2d",
    "NonLocalConfig",
    "build_norm",
    "conv_norm",
    "fixed_affine",
    "init_weight",
]
