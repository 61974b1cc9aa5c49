"""Whole detectors, and the protocol the rest of the library speaks to."""

from .base import Detector, ModelConfig, PyramidDetector
from .one_stage import OneStageConfig, OneStageDetector
from .two_stage import TwoStageConfig, TwoStageDetector

ModelChoice = TwoStageConfig | OneStageConfig
"""The detector configs an experiment can name (by ``kind``); a new detector adds its
config here."""

__all__ = [
    "Detector",
    "ModelChoice",
    "ModelConfig",
    "OneStageConfig",
    "OneStageDetector",
    "PyramidDetector",
    "TwoStageConfig",
    "TwoStageDetector",
]
