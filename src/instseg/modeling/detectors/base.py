"""What every detector is to the rest of the library, and the part they all share.

The runner, the CLI, checkpoints and evaluation speak only to :class:`Detector` (training
losses, predictions, whether it predicts masks) and build it from a :class:`ModelConfig`
(which also raises the detection cap for a larger COCO ``maxDets``). A new detector is a
config with ``kind``/``build`` and a module with ``forward``/``predict``, listed in
:data:`instseg.modeling.detectors.ModelChoice`.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from ...structures import ImageBatch, ImageInfo, Instances, InstanceTargets, TrainingContext
from ..backbone import ResNet, ResNetConfig
from ..features import Features, FeatureSpec
from ..neck import FPN, FPNConfig


class Detector(Protocol):
    """An ``nn.Module`` that trains on and predicts whole batches of padded images."""

    with_masks: bool

    def __call__(
        self,
        images: ImageBatch,
        targets: list[InstanceTargets],
        context: TrainingContext | None = None,
    ) -> dict[str, Tensor]:
        """Training: ``loss*`` terms (summed by the trainer) and other scalars (logged)."""
        ...

    def predict(self, images: ImageBatch, infos: list[ImageInfo] | None = None) -> list[Instances]:
        """Detections per image, in original image coordinates when ``infos`` is given."""
        ...


class ModelConfig(Protocol):
    """A detector's config: tagged by ``kind``; builds the detector for ``num_classes``."""

    kind: str

    @property
    def with_masks(self) -> bool: ...

    def build(self, num_classes: int) -> nn.Module: ...

    def raise_detection_cap(self, max_dets: int) -> None:
        """Keep at least ``max_dets`` detections per image (test-time settings only)."""
        ...


class PyramidDetector(nn.Module):
    """Backbone -> neck, shared by every detector: ``features(images)`` gives the neck's
    maps by level name, ``feature_specs`` what they are (name, width, stride)."""

    def __init__(self, backbone: ResNetConfig, neck: FPNConfig) -> None:
        super().__init__()
        self.backbone = ResNet(backbone)
        self.neck = FPN(self.backbone.out_channels, neck, self.backbone.strides)

    @property
    def feature_specs(self) -> list[FeatureSpec]:
        return self.neck.output_specs

    def features(self, images: ImageBatch) -> Features:
        maps = self.neck(self.backbone(images.tensor))
        return {spec.name: m for spec, m in zip(self.neck.output_specs, maps, strict=True)}
