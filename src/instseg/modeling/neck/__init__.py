"""Necks: backbone feature maps -> the pyramid levels the heads read."""

from .fpn import FPN, FPNConfig

__all__ = ["FPN", "FPNConfig"]
