"""Dense (per-location) heads: the RPN."""

from .rpn import RPNConfig, RPNHead

__all__ = ["RPNConfig", "RPNHead"]
