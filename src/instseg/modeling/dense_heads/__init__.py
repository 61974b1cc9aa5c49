"""Dense (per-location) heads: the RPN and FCOS."""

from .fcos import FCOSHead, FCOSHeadConfig
from .rpn import RPNConfig, RPNHead

__all__ = ["FCOSHead", "FCOSHeadConfig", "RPNConfig", "RPNHead"]
