"""Whole detectors, and the protocol the rest of the library speaks to."""

from .base import Detector, ModelConfig, PyramidDetector
from .two_stage import TwoStageConfig, TwoStageDetector

ModelChoice = TwoStageConfig
"""The detector configs an experiment can name (by ``kind``); a new detector adds its
config here (``TwoStageConfig | OneStageConfig``)."""

__all__ = [
    "Detector",
    "ModelChoice",
    "ModelConfig",
    "PyramidDetector",
    "TwoStageConfig",
    "TwoStageDetector",
]
