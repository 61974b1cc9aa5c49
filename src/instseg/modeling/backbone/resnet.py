"""ResNet-18/34/50/101 backbone: torchvision's layout, mmdet's freezing semantics.

Parameter and buffer names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0`` ...), less the classifier, so a torchvision ImageNet state dict
loads key for key. Bottlenecks put the stride on the 3x3 conv ('pytorch' style, as
torchvision and mmdet's default) or, with ``style="caffe"``, on the first 1x1 conv (the MSRA
weights of detectron2/cvpods, ``STRIDE_IN_1X1=True``). ``frozen_stages`` and ``norm_eval``
behave as in mmdet's ``ResNet`` (spec §1.5: Mask R-CNN R50-FPN uses ``frozen_stages=1``,
``norm_eval=True``).
GCNet context blocks plug into chosen stages under mmdet's plugin name (spec §2.3).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from instseg.layers import NORM_KINDS, build_norm, conv_norm
from instseg.layers.context_block import ContextBlock

logger = logging.getLogger("instseg.backbone")

RESNET_DEPTHS: tuple[int, ...] = (18, 34, 50, 101)
RESNET_STYLES: tuple[str, ...] = ("pytorch", "caffe")
_STAGE_STRIDES = (4, 8, 16, 32)
_GN_GROUPS = 32


@dataclass
class ResNetConfig:
    """What ResNet to build and how to train it.

    ``frozen_stages = k >= 0`` freezes the stem and ``layer1..layerk`` (no gradients, norms in
    eval mode); ``-1`` freezes nothing. ``norm_eval`` keeps every BN / SyncBN in eval mode
    while training. ``base_width`` is the stem width (64 = standard); every channel count
    scales with it, so tests can build narrow nets. ``zero_init_residual`` starts the last
    norm of every residual branch at weight 0 (mmdet's default), so that each block starts as
    the identity: without it, a net trained from scratch with frozen norms (``norm_eval``)
    diverges. ``weights`` is a local checkpoint loaded at construction (``.safetensors`` or a
    torch file), after initialisation.

    ``context_block_stages[i]`` puts a GCNet ``ContextBlock`` (``ratio=context_block_ratio``,
    attention pooling, channel-add fusion) in every block of ``layer{i+1}``, on the residual
    branch after its last norm and before the addition (mmdet's 'after_conv3' plugin
    position; BasicBlocks get it after bn2, an extension: mmdet's BasicBlock takes no
    plugins). The GCNet configs use ``(False, True, True, True)`` (c3-c5) with ratio 1/4 and
    ``norm="SyncBN"``, ``norm_eval=False``. The block keeps its own init (its last conv at
    zero, so it starts as the identity) and is frozen with its stage.

    ``channels_last`` runs the network in channels-last (NHWC) memory format: the images are
    converted on entry and every later map (neck, heads, the RoI extractors' gathers)
    inherits the layout. oneDNN's CPU convolutions and tensor-core GPUs are faster on it
    (R-50-FPN Mask R-CNN at 800x1333 on our 2-core CPU: training 23% faster); the numbers
    are the same up to float summation order. The weights keep their layout, so checkpoints
    do not depend on it.

    ``fold_norm`` folds each norm with fixed statistics (FrozenBN, and BN / SyncBN in eval
    mode: all of them with ``norm_eval``) into the conv before it, in training as at
    inference: the scale multiplies the weights and the shift is the bias, so no pass over
    the map applies them (R-50-FPN Mask R-CNN at 800x1333 on our 2-core CPU: training step
    14% and inference 13% faster). Trainable norm weights still get their gradients. The
    numbers are the same up to float32 rounding; ``False`` keeps the official operation order
    (conv, then the norm), which the tests that compare with mmdetection's recorded outputs
    use, where near-tied random-weight scores would reorder.

    ``style``: "pytorch" (stride on the 3x3 conv of a Bottleneck) or "caffe" (on its first
    1x1 conv: detectron2's MSRA R-50, with ``norm="FrozenBN"``, ``frozen_stages=1`` for
    ``FREEZE_AT=2``, and BGR input with std 1, set in ``data``).
    """

    depth: int = 50
    norm: str = "BN"
    frozen_stages: int = 1
    norm_eval: bool = True
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    base_width: int = 64
    zero_init_residual: bool = True
    weights: str | None = None
    context_block_stages: tuple[bool, bool, bool, bool] = (False, False, False, False)
    context_block_ratio: float = 0.25
    channels_last: bool = True
    style: str = "pytorch"
    fold_norm: bool = True

    def __post_init__(self) -> None:
        if self.style not in RESNET_STYLES:
            raise ValueError(
                f"ResNetConfig.style must be one of {list(RESNET_STYLES)}, got {self.style!r}"
            )
        if self.depth not in RESNET_DEPTHS:
            raise ValueError(
                f"ResNetConfig.depth must be one of {list(RESNET_DEPTHS)}, got {self.depth!r}"
            )
        if self.norm not in NORM_KINDS:
            raise ValueError(
                f"ResNetConfig.norm must be one of {list(NORM_KINDS)}, got {self.norm!r}"
            )
        if not isinstance(self.frozen_stages, int) or not -1 <= self.frozen_stages <= 4:
            raise ValueError(
                f"ResNetConfig.frozen_stages must be an int in -1..4, got {self.frozen_stages!r}"
            )
        indices = tuple(self.out_indices)
        if (
            not indices
            or any(not isinstance(i, int) or not 0 <= i <= 3 for i in indices)
            or list(indices) != sorted(set(indices))
        ):
            raise ValueError(
                "ResNetConfig.out_indices must be a non-empty, strictly increasing subset of "
                f"0..3, got {self.out_indices!r}"
            )
        self.out_indices = indices
        if not isinstance(self.fold_norm, bool):
            raise ValueError(f"ResNetConfig.fold_norm must be a bool, got {self.fold_norm!r}")
        if not isinstance(self.base_width, int) or self.base_width <= 0:
            raise ValueError(
                f"ResNetConfig.base_width must be a positive int, got {self.base_width!r}"
            )
        if self.norm == "GN" and self.base_width % _GN_GROUPS != 0:
            raise ValueError(
                f"ResNetConfig.base_width must be a multiple of {_GN_GROUPS} with norm='GN' "
                f"(GroupNorm({_GN_GROUPS}) on the stem), got {self.base_width}"
            )
        stages = self.context_block_stages
        if (
            not isinstance(stages, (tuple, list))
            or len(stages) != 4
            or any(not isinstance(s, bool) for s in stages)
        ):
            raise ValueError(
                "ResNetConfig.context_block_stages must be 4 bools (layer1..layer4), "
                f"got {stages!r}"
            )
        self.context_block_stages = tuple(stages)  # type: ignore[assignment]
        ratio = self.context_block_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(
                f"ResNetConfig.context_block_ratio must be a number in (0, 1], got {ratio!r}"
            )
        if not isinstance(self.channels_last, bool):
            raise ValueError(
                f"ResNetConfig.channels_last must be true or false, got {self.channels_last!r}"
            )
        if self.weights is not None:
            self.weights = os.fspath(self.weights)


@dataclass
class WeightsReport:
    """Outcome of ``ResNet.load_weights``; names are after prefix stripping.

    ``missing``: model entries the file did not provide (BN step counters excepted).
    ``unexpected``: file entries the model has no place for. ``ignored``: entries dropped on
    purpose (the classifier ``fc.*``, non-backbone parts of a detector checkpoint, BN step
    counters the model's norm layers do not keep).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs: the counts, then the names that need attention."""
        text = (
            f"loaded {len(self.loaded)}, missing {len(self.missing)}, "
            f"unexpected {len(self.unexpected)}, ignored {len(self.ignored)}"
        )
        if self.missing:
            text += f"; missing: {', '.join(self.missing)}"
        if self.unexpected:
            text += f"; unexpected: {', '.join(self.unexpected)}"
        return text


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class _Conv1x1(nn.Conv2d):
    """A 1x1 convolution. Strided on a channels-last map, it reads the subsampled map with
    stride 1 (the same products): torch 2.13's oneDNN crashes in the weight gradient of a
    strided 1x1 convolution on channels-last maps for some shapes (8 input channels with an
    odd batch: ``tests/test_backbone.py`` keeps such a case)."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.stride != (1, 1) and x.is_contiguous(memory_format=torch.channels_last):
            sy, sx = self.stride
            return nn.functional.conv2d(x[:, :, ::sy, ::sx], weight, bias)
        return super()._conv_forward(x, weight, bias)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return _Conv1x1(in_channels, out_channels, 1, stride=stride, bias=False)


def _conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor, fold: bool) -> Tensor:
    return conv_norm(conv, norm, x) if fold else norm(conv(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs plus identity (ResNet-18/34); with ``context_ratio``, a ``context_block``
    after bn2."""

    expansion = 1
    fold_norm = True  # ResNetConfig.fold_norm, set by ResNet

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int,
        norm: str,
        downsample: nn.Module | None = None,
        context_ratio: float | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn1 = build_norm(norm, planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = build_norm(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        # Only blocks that have one get the attribute: other state dicts stay torchvision's.
        if context_ratio is not None:
            self.context_block = ContextBlock(planes, context_ratio)

    def forward(self, x: Tensor) -> Tensor:
        fold = self.fold_norm
        identity = x if self.downsample is None else _conv_norm(*self.downsample, x, fold)
        out = self.relu(_conv_norm(self.conv1, self.bn1, x, fold))
        out = _conv_norm(self.conv2, self.bn2, out, fold)
        if hasattr(self, "context_block"):
            out = self.context_block(out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4, plus identity (ResNet-50/101). The stride is on the
    3x3 conv, or on the first 1x1 with ``stride_in_1x1`` (caffe style); with
    ``context_ratio``, a ``context_block`` after bn3."""

    expansion = 4
    fold_norm = True  # ResNetConfig.fold_norm, set by ResNet

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int,
        norm: str,
        downsample: nn.Module | None = None,
        context_ratio: float | None = None,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_channels, planes, stride if stride_in_1x1 else 1)
        self.bn1 = build_norm(norm, planes)
        self.conv2 = _conv3x3(planes, planes, 1 if stride_in_1x1 else stride)
        self.bn2 = build_norm(norm, planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = build_norm(norm, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        if context_ratio is not None:
            self.context_block = ContextBlock(planes * self.expansion, context_ratio)

    def forward(self, x: Tensor) -> Tensor:
        fold = self.fold_norm
        identity = x if self.downsample is None else _conv_norm(*self.downsample, x, fold)
        out = self.relu(_conv_norm(self.conv1, self.bn1, x, fold))
        out = self.relu(_conv_norm(self.conv2, self.bn2, out, fold))
        out = _conv_norm(self.conv3, self.bn3, out, fold)
        if hasattr(self, "context_block"):
            out = self.context_block(out)
        return self.relu(out + identity)


_ARCH: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


def _make_stage(
    block: type[BasicBlock] | type[Bottleneck],
    in_channels: int,
    planes: int,
    num_blocks: int,
    stride: int,
    norm: str,
    context_ratio: float | None = None,
    caffe_style: bool = False,
) -> nn.Sequential:
    """One stage; the first block changes stride/width through a 1x1 conv + norm shortcut.
    ``context_ratio`` (when set) gives every block a ContextBlock of that ratio;
    ``caffe_style`` puts a Bottleneck's stride on its first 1x1 conv."""
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            _conv1x1(in_channels, out_channels, stride), build_norm(norm, out_channels)
        )
    first = (
        Bottleneck(in_channels, planes, stride, norm, downsample, context_ratio, True)
        if caffe_style and block is Bottleneck
        else block(in_channels, planes, stride, norm, downsample, context_ratio)
    )
    blocks = [first]
    blocks += [
        block(out_channels, planes, 1, norm, context_ratio=context_ratio)
        for _ in range(num_blocks - 1)
    ]
    return nn.Sequential(*blocks)


_CAFFE2_BLOCK = re.compile(r"^res(\d)_(\d+)_branch(1|2a|2b|2c)_(w|bn_s|bn_b)$")
_CAFFE2_STEM = {
    "conv1_w": "conv1.weight",
    "res_conv1_bn_s": "bn1.weight",
    "res_conv1_bn_b": "bn1.bias",
    "fc1000_w": "fc.weight",
    "fc1000_b": "fc.bias",
}
_CAFFE2_PART = {"2a": "1", "2b": "2", "2c": "3"}  # branch2x: the block's conv number


def caffe2_resnet_names(blobs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detectron's Caffe2 names (the MSRA ImageNet ``R-50.pkl`` / ``R-101.pkl`` of the
    detectron2 and cvpods recipes) as ours: ``res{s}_{b}_branch2{a,b,c}_{w,bn_s,bn_b}`` is
    ``layer{s-1}.{b}.conv{1,2,3}.weight`` / ``bn{1,2,3}.{weight,bias}``, ``branch1`` the
    ``downsample`` conv and norm, ``res_conv1_bn`` the stem's norm. Their BatchNorm is folded
    into the scale and shift, so every norm gets running mean 0 and variance 1 (detectron2's
    FrozenBatchNorm then computes the same ``x * s / sqrt(1 + eps) + b``). Solver state
    (``*_momentum``) is dropped; other names are kept as they are."""
    out: dict[str, Tensor] = {}
    norms = []
    for name, tensor in blobs.items():
        if name.endswith("_momentum"):
            continue
        match = _CAFFE2_BLOCK.match(name)
        if name in _CAFFE2_STEM:
            ours = _CAFFE2_STEM[name]
        elif match is not None:
            stage, block, branch, kind = match.groups()
            prefix = f"layer{int(stage) - 1}.{block}."
            if branch == "1":
                conv, norm = f"{prefix}downsample.0", f"{prefix}downsample.1"
            else:
                part = _CAFFE2_PART[branch]
                conv, norm = f"{prefix}conv{part}", f"{prefix}bn{part}"
            ours = {"w": f"{conv}.weight", "bn_s": f"{norm}.weight", "bn_b": f"{norm}.bias"}[kind]
        else:
            ours = name
        if name.endswith("_bn_s"):
            norms.append(ours[: -len(".weight")])
        out[ours] = tensor
    for norm in norms:
        channels = out[f"{norm}.weight"].shape[0]
        out.setdefault(f"{norm}.running_mean", torch.zeros(channels))
        out.setdefault(f"{norm}.running_var", torch.ones(channels))
    return out


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a name -> tensor mapping from ``.safetensors``, a torch file or a Detectron
    ``.pkl``, never unpickling code.

    Torch files are read with ``weights_only=True`` and may hold the mapping directly or
    under ``"state_dict"`` / ``"model"`` (mmdet, detectron2-style trainers); ``.pkl`` files
    build numpy arrays only, and Caffe2 names (MSRA ``R-50.pkl``) become ours
    (:func:`caffe2_resnet_names`).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"weights file not found: {file}")
    if file.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ImportError(
                f"reading {file} needs the 'safetensors' package: pip install safetensors"
            ) from exc
        return dict(load_file(str(file), device="cpu"))
    if file.suffix == ".pkl":  # Detectron / detectron2: numpy arrays only
        from instseg.safe_pickle import load_arrays

        obj: Any = load_arrays(file)
    else:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise ValueError(f"cannot read {file} as a torch weights file: {exc}") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "blobs"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{file} does not hold a state dict (got {type(obj).__name__})")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise ValueError(
                f"{file} does not hold a state dict: entry {name!r} is a "
                f"{type(value).__name__}, not a tensor"
            )
    if "conv1_w" in obj:  # Detectron's Caffe2 names (MSRA R-50.pkl / R-101.pkl)
        return caffe2_resnet_names(obj)
    return dict(obj)


def _strip_prefixes(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Drop DDP's ``module.`` and a detector's ``backbone.`` prefix.

    When any name starts with ``backbone.`` the file is a whole-detector checkpoint: only
    those entries are kept, the rest (neck, heads) are returned as ignored.
    """
    names = {}
    for name, tensor in state.items():
        while name.startswith("module."):
            name = name[len("module.") :]
        names[name] = tensor
    if not any(name.startswith("backbone.") for name in names):
        return names, []
    kept = {n[len("backbone.") :]: t for n, t in names.items() if n.startswith("backbone.")}
    return kept, [n for n in names if not n.startswith("backbone.")]


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm))


class ResNet(nn.Module):
    """ResNet feature extractor: ``forward(images)`` returns the maps of ``cfg.out_indices``.

    Stage ``i`` (``layer{i+1}``, C2..C5) has stride ``4 * 2**i``. ``out_channels`` and
    ``strides`` describe the returned maps in order. Stages after the last requested one
    are kept (so checkpoints load key for key) but not run.
    """

    def __init__(self, cfg: ResNetConfig | None = None) -> None:
        super().__init__()
        cfg = ResNetConfig() if cfg is None else cfg
        self.cfg = cfg
        block, counts = _ARCH[cfg.depth]
        width = cfg.base_width

        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = build_norm(cfg.norm, width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        stages: list[nn.Sequential] = []
        stage_channels: list[int] = []
        in_channels = width
        for i, num_blocks in enumerate(counts):
            planes = width * 2**i
            context_ratio = cfg.context_block_ratio if cfg.context_block_stages[i] else None
            stride = 1 if i == 0 else 2
            stages.append(
                _make_stage(
                    block,
                    in_channels,
                    planes,
                    num_blocks,
                    stride,
                    cfg.norm,
                    context_ratio,
                    caffe_style=cfg.style == "caffe",
                )
            )
            in_channels = planes * block.expansion
            stage_channels.append(in_channels)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        for stage in stages:
            for block_module in stage:
                block_module.fold_norm = cfg.fold_norm

        self._out_indices = tuple(cfg.out_indices)
        self.out_channels: list[int] = [stage_channels[i] for i in self._out_indices]
        self.strides: list[int] = [_STAGE_STRIDES[i] for i in self._out_indices]

        self._init_weights()
        for module in self._frozen_modules():
            for param in module.parameters():
                param.requires_grad_(False)
        self.train()

        if cfg.weights is not None:
            report = self.load_weights(cfg.weights)
            logger.info("ResNet-%d weights from %s: %s", cfg.depth, cfg.weights, report.summary())
            if report.missing or report.unexpected:
                logger.warning(
                    "ResNet-%d weights from %s did not match exactly: %s",
                    cfg.depth,
                    cfg.weights,
                    report.summary(),
                )

    def _stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _frozen_modules(self) -> list[nn.Module]:
        """The stem and ``layer1..layerk`` for ``frozen_stages = k >= 0``; none for -1."""
        k = self.cfg.frozen_stages
        if k < 0:
            return []
        return [self.conv1, self.bn1, *self._stages()[:k]]

    def _init_weights(self) -> None:
        """Kaiming-normal (fan_out, relu) convs, norms at weight 1 / bias 0 (mmcv, torchvision);
        the last norm of each residual branch at 0 with ``zero_init_residual``. Context blocks
        keep their own init (as in mmdet with a pretrained backbone, the GCNet configs' case)."""
        own_init = {
            id(m) for cb in self.modules() if isinstance(cb, ContextBlock) for m in cb.modules()
        }
        for module in self.modules():
            if id(module) in own_init:
                continue
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.cfg.zero_init_residual:
            for block in self.modules():
                if isinstance(block, Bottleneck):
                    nn.init.zeros_(block.bn3.weight)
                elif isinstance(block, BasicBlock):
                    nn.init.zeros_(block.bn2.weight)

    def train(self, mode: bool = True) -> ResNet:
        """Set the mode, then put frozen stages (and every BN when ``norm_eval``) back in eval."""
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.cfg.norm_eval:
                for module in self.modules():
                    if _is_batchnorm(module):
                        module.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"ResNet expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(_conv_norm(self.conv1, self.bn1, x, self.cfg.fold_norm)))
        outs: list[Tensor] = []
        last = self._out_indices[-1]
        for i, stage in enumerate(self._stages()[: last + 1]):
            x = stage(x)
            if i in self._out_indices:
                outs.append(x)
        return outs

    def load_weights(self, path: str | os.PathLike[str]) -> WeightsReport:
        """Load a checkpoint (torchvision / mmdet / DDP names) into this model.

        ``module.`` / ``backbone.`` prefixes are stripped and ``fc.*`` ignored. Shapes are
        checked before anything is copied, so a mismatch (``ValueError``) leaves the model
        untouched; so does a file none of whose entries belong to a ResNet.
        """
        state, ignored = _strip_prefixes(read_state_dict(path))
        own = self.state_dict()
        report = WeightsReport(ignored=ignored)
        to_load: dict[str, Tensor] = {}
        for name, tensor in state.items():
            if name.startswith("fc."):
                report.ignored.append(name)
            elif name not in own:
                # A BN step counter has no home in FrozenBN / GN layers; it carries no weights.
                if name.endswith("num_batches_tracked"):
                    report.ignored.append(name)
                else:
                    report.unexpected.append(name)
            elif tensor.shape != own[name].shape:
                raise ValueError(
                    f"{path}: shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, "
                    f"model {tuple(own[name].shape)}"
                )
            else:
                to_load[name] = tensor
        if not to_load:
            raise ValueError(
                f"{path}: no entry matches a ResNet-{self.cfg.depth} parameter or buffer "
                f"(first names in the file: {list(state)[:5]})"
            )
        report.loaded = [name for name in own if name in to_load]
        report.missing = [
            name for name in own if name not in to_load and not name.endswith("num_batches_tracked")
        ]
        self.load_state_dict(to_load, strict=False)
        return report
