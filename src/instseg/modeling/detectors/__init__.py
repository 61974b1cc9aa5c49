"""Whole detectors."""

from .two_stage import TwoStageConfig, TwoStageDetector

__all__ = ["TwoStageConfig", "TwoStageDetector"]
