"""The experiment schema: what a run is made of (model, data, training, evaluation).

The model is one of the detector configs of :data:`instseg.modeling.detectors.ModelChoice`,
tagged by ``kind``. Saved configs (``config.json``, checkpoint jsons) of the earlier
format are upgraded on load by :func:`instseg.configs.compat.upgrade_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine import TrainConfig
from ..modeling.detectors import ModelChoice, TwoStageConfig


@dataclass
class DataConfig:
    """Where the data is and how images are sized. Paths may also come from the CLI."""

    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    train_scales: tuple[tuple[int, int], ...] = ((1333, 800),)
    test_scale: tuple[int, int] = (1333, 800)
    flip_prob: float = 0.5
    skip_empty: bool = True

    def __post_init__(self) -> None:
        if not self.train_scales:
            raise ValueError("data.train_scales must not be empty")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"data.flip_prob must be in [0, 1], got {self.flip_prob}")


@dataclass
class EvalConfig:
    max_dets: int = 100
    batch_size: int = 2

    def __post_init__(self) -> None:
        if self.max_dets < 10:
            raise ValueError(f"eval.max_dets must be at least 10, got {self.max_dets}")


@dataclass
class ExperimentConfig:
    """Everything a run needs. ``num_classes=None`` takes the training set's categories."""

    name: str = "custom"
    description: str = ""
    num_classes: int | None = None
    model: ModelChoice = field(default_factory=TwoStageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_iters=1000))
    eval: EvalConfig = field(default_factory=EvalConfig)
