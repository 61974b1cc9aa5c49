"""Training engine: learning-rate schedule, safetensors checkpoints, the training loop."""

from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_weights_only,
    read_checkpoint_state,
    remove_checkpoint,
    save_checkpoint,
)
from .schedule import ScheduleConfig, build_optimizer, lr_at
from .trainer import TrainConfig, TrainResult, train

__all__ = [
    "CheckpointError",
    "ScheduleConfig",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "latest_checkpoint",
    "load_checkpoint",
    "load_weights_only",
    "lr_at",
    "read_checkpoint_state",
    "remove_checkpoint",
    "save_checkpoint",
    "train",
]
