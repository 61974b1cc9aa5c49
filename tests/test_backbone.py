"""Tests for ``instseg.layers.norm``, the ResNet backbone and the FPN neck.

Architecture facts are checked against numbers re-derived from torchvision's ResNet
definition (key names, state-dict sizes, parameter counts from its model docs), and the FPN
against a loop-by-loop float64 reference written here. Models are narrow (``base_width`` 8
or 16) and inputs tiny; full-width models are only built on the ``meta`` device.
"""

from __future__ import annotations

import logging
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from instseg.layers import NORM_KINDS, FrozenBatchNorm2d, build_norm
from instseg.layers.norm import SyncBatchNorm2d
from instseg.modeling.backbone import ResNet, ResNetConfig, WeightsReport
from instseg.modeling.neck import FPN, FPNConfig

H, W = 64, 96


def tiny(depth: int = 18, **kwargs) -> ResNet:
    kwargs.setdefault("base_width", 8)
    return ResNet(ResNetConfig(depth=depth, **kwargs))


def randomise_(model: nn.Module, seed: int) -> None:
    """Give every parameter and float buffer distinct random values (variances positive)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(seed + 3)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)


def bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm))]


# --------------------------------------------------------------------------------------------
# layers.norm
# --------------------------------------------------------------------------------------------


def test_frozen_bn_equals_batchnorm_eval_and_loads_its_state_dict():
    bn = nn.BatchNorm2d(6)
    bn.train()
    bn(torch.randn(4, 6, 5, 5) * 3 + 1)  # move the running stats away from 0 / 1
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    bn.eval()
    frozen = FrozenBatchNorm2d(6)
    # strict load of a BatchNorm2d state dict, num_batches_tracked included
    assert "num_batches_tracked" in bn.state_dict()
    frozen.load_state_dict(bn.state_dict())
    assert sorted(frozen.state_dict()) == sorted(
        k for k in bn.state_dict() if k != "num_batches_tracked"
    )
    assert list(frozen.parameters()) == []
    x = torch.randn(2, 6, 7, 9)
    torch.testing.assert_close(frozen(x), bn(x))
    frozen.train()  # no mode dependence
    torch.testing.assert_close(frozen(x), bn(x))


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("FrozenBN", FrozenBatchNorm2d),
        ("BN", nn.BatchNorm2d),
        ("SyncBN", SyncBatchNorm2d),
        ("GN", nn.GroupNorm),
    ],
)
def test_build_norm_kinds(kind, cls):
    assert kind in NORM_KINDS
    layer = build_norm(kind, 64)
    assert type(layer) is cls
    if kind == "GN":
        assert layer.num_groups == 32 and layer.num_channels == 64
        assert build_norm("GN", 64, num_groups=16).num_groups == 16


def test_build_norm_errors():
    with pytest.raises(ValueError) as err:
        build_norm("LN", 8)
    for kind in NORM_KINDS:
        assert kind in str(err.value)
    with pytest.raises(ValueError, match="num_groups"):
        build_norm("GN", 48)


# --------------------------------------------------------------------------------------------
# ResNet: shapes and architecture
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "channels"),
    [
        (18, [8, 16, 32, 64]),
        (34, [8, 16, 32, 64]),
        (50, [32, 64, 128, 256]),
        (101, [32, 64, 128, 256]),
    ],
)
def test_resnet_output_shapes_and_strides(depth, channels):
    model = tiny(depth)
    assert model.out_channels == channels
    assert model.strides == [4, 8, 16, 32]
    with torch.no_grad():
        outs = model(torch.randn(2, 3, H, W))
    assert [tuple(o.shape) for o in outs] == [
        (2, c, H // s, W // s) for c, s in zip(channels, model.strides, strict=True)
    ]


def test_resnet_out_indices_subset():
    model = tiny(50, out_indices=(1, 3))
    assert model.out_channels == [64, 256]
    assert model.strides == [8, 32]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, H, W))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 8, 12), (1, 256, 2, 3)]


def test_odd_input_sizes_through_resnet_and_fpn():
    backbone = tiny(50)
    neck = FPN(backbone.out_channels, FPNConfig(out_channels=16, num_outs=5))
    h, w = 65, 97
    with torch.no_grad():
        outs = neck(backbone(torch.randn(1, 3, h, w)))
    # every stride-2 step here (7x7 conv, 3x3 max-pool, 3x3 conv, 1x1 max-pool) maps n -> ceil(n/2)
    expected = []
    for _ in range(2):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    for _ in range(5):
        expected.append((1, 16, h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    assert (
        [tuple(o.shape) for o in outs]
        == expected
        == [
            (1, 16, 17, 25),
            (1, 16, 9, 13),
            (1, 16, 5, 7),
            (1, 16, 3, 4),
            (1, 16, 2, 2),
        ]
    )
    assert neck.strides == [4, 8, 16, 32, 64]


BN_KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in BN_KEYS]


# torchvision resnet18, written out from its BasicBlock / _make_layer definitions.
R18_LAYER1_0 = [
    "layer1.0.conv1.weight",
    *_bn("layer1.0.bn1"),
    "layer1.0.conv2.weight",
    *_bn("layer1.0.bn2"),
]
R18_LAYER2_0 = [
    "layer2.0.conv1.weight",
    *_bn("layer2.0.bn1"),
    "layer2.0.conv2.weight",
    *_bn("layer2.0.bn2"),
    "layer2.0.downsample.0.weight",
    *_bn("layer2.0.downsample.1"),
]
# torchvision resnet50: layer1.0 already needs a projection shortcut (64 -> 256 channels).
R50_LAYER1_0 = [
    "layer1.0.conv1.weight",
    *_bn("layer1.0.bn1"),
    "layer1.0.conv2.weight",
    *_bn("layer1.0.bn2"),
    "layer1.0.conv3.weight",
    *_bn("layer1.0.bn3"),
    "layer1.0.downsample.0.weight",
    *_bn("layer1.0.downsample.1"),
]


def _meta_resnet(depth: int, norm: str = "BN") -> ResNet:
    with torch.device("meta"):
        return ResNet(ResNetConfig(depth=depth, norm=norm))


# torchvision state-dict sizes include fc.weight and fc.bias (2 entries) and one
# num_batches_tracked per BN; parameter counts are torchvision's docs figures minus the fc
# layer (512*1000+1000 = 513000 for 18/34, 2048*1000+1000 = 2049000 for 50/101).
# BN layers: r18 20, r34 36, r50 53, r101 104 (stem + per-block + one per projection).
@pytest.mark.parametrize(
    ("depth", "tv_entries", "num_bn", "tv_params", "fc_params"),
    [
        (18, 122, 20, 11_689_512, 513_000),
        (34, 218, 36, 21_797_672, 513_000),
        (50, 320, 53, 25_557_032, 2_049_000),
        (101, 626, 104, 44_549_160, 2_049_000),
    ],
)
def test_state_dict_matches_torchvision_sizes(depth, tv_entries, num_bn, tv_params, fc_params):
    model = _meta_resnet(depth)
    state = model.state_dict()
    assert len(state) == tv_entries - 2
    assert not any(k.startswith("fc.") for k in state)
    assert sum(k.endswith("num_batches_tracked") for k in state) == num_bn
    assert sum(p.numel() for p in model.parameters()) == tv_params - fc_params
    # FrozenBN keeps the same names less the step counters
    frozen = _meta_resnet(depth, norm="FrozenBN").state_dict()
    assert len(frozen) == tv_entries - 2 - num_bn
    assert set(frozen) == {k for k in state if not k.endswith("num_batches_tracked")}


def test_resnet18_key_names_and_shapes():
    state = _meta_resnet(18).state_dict()
    keys = list(state)
    assert keys[:6] == ["conv1.weight", *_bn("bn1")]
    assert [k for k in keys if k.startswith("layer1.0.")] == R18_LAYER1_0
    assert [k for k in keys if k.startswith("layer2.0.")] == R18_LAYER2_0
    assert not any(k.startswith("layer1.") and "downsample" in k for k in keys)
    assert keys[-1] == "layer4.1.bn2.num_batches_tracked"
    for prefix, blocks in zip(["layer1", "layer2", "layer3", "layer4"], [2, 2, 2, 2], strict=True):
        assert {k.split(".")[1] for k in keys if k.startswith(prefix + ".")} == {
            str(i) for i in range(blocks)
        }
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer2.0.conv1.weight"].shape == (128, 64, 3, 3)
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert state["layer2.0.downsample.1.running_var"].shape == (128,)
    assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)


def test_resnet50_key_names_shapes_and_pytorch_style_stride():
    model = _meta_resnet(50)
    state = model.state_dict()
    assert [k for k in state if k.startswith("layer1.0.")] == R50_LAYER1_0
    assert {k.split(".")[1] for k in state if k.startswith("layer3.")} == {str(i) for i in range(6)}
    assert state["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert state["layer2.0.conv1.weight"].shape == (128, 256, 1, 1)
    assert state["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)
    assert model.out_channels == [256, 512, 1024, 2048]


def test_resnet101_block_counts():
    keys = _meta_resnet(101).state_dict()
    counts = [
        len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5)
    ]
    assert counts == [3, 4, 23, 3]


def test_init_kaiming_fan_out_and_unit_norms():
    model = tiny(18, base_width=16, zero_init_residual=False)
    weight = model.layer3[1].conv2.weight  # 64 x 64 x 3 x 3, fan_out 576
    assert weight.std().item() == pytest.approx(math.sqrt(2.0 / 576), rel=0.05)
    # a 1x1 expand conv tells fan_out (256) from fan_in (64)
    expand = tiny(50, base_width=16).layer3[1].conv3.weight  # 256 x 64 x 1 x 1
    assert expand.std().item() == pytest.approx(math.sqrt(2.0 / 256), rel=0.05)
    for m in bn_modules(model):
        assert torch.equal(m.weight, torch.ones_like(m.weight))
        assert torch.equal(m.bias, torch.zeros_like(m.bias))


@pytest.mark.parametrize("depth", [18, 50])
def test_zero_init_residual_makes_every_block_start_as_identity(depth):
    model = tiny(depth).eval()
    last_norms = {"bn2"} if depth == 18 else {"bn3"}
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in last_norms and name.startswith("layer"):
            assert torch.equal(m.weight, torch.zeros_like(m.weight)), name
        elif isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), name
    # A block without a downsample then maps a non-negative input to itself.
    block = model.layer2[1]
    x = torch.rand(1, block.conv1.in_channels, 8, 8)
    assert torch.equal(block(x), x)


# --------------------------------------------------------------------------------------------
# ResNet: freezing and norm_eval
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 2, 4])
def test_frozen_stages(frozen_stages):
    model = tiny(18, frozen_stages=frozen_stages, norm_eval=False)
    model.train()
    groups = {
        0: [model.conv1, model.bn1],
        1: [model.layer1],
        2: [model.layer2],
        3: [model.layer3],
        4: [model.layer4],
    }
    outs = model(torch.randn(2, 3, H, W))
    if frozen_stages < 4:
        sum(o.sum() for o in outs).backward()
    for stage, modules in groups.items():
        frozen = stage <= frozen_stages
        for module in modules:
            for param in module.parameters():
                assert param.requires_grad is not frozen
                if frozen:
                    assert param.grad is None
                else:
                    assert param.grad is not None
            # frozen stages keep their norms in eval mode; the rest train (norm_eval=False)
            for m in bn_modules(module):
                assert m.training is not frozen


def test_norm_eval_keeps_running_stats():
    model = tiny(18, frozen_stages=-1, norm_eval=True)
    model.train()
    assert model.training
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(2, 3, H, W))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m.training for m in bn_modules(model))
    # eval() then train() again: still norm_eval
    assert model.eval().train() is model
    assert all(not m.training for m in bn_modules(model))


def test_norm_eval_false_updates_running_stats():
    model = tiny(18, frozen_stages=-1, norm_eval=False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model(torch.randn(2, 3, H, W))
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_gn_backbone_runs():
    model = tiny(18, norm="GN", base_width=32)
    assert isinstance(model.bn1, nn.GroupNorm) and model.bn1.num_groups == 32
    outs = model(torch.randn(1, 3, H, W))
    assert [o.shape[1] for o in outs] == [32, 64, 128, 256]


def test_syncbn_backbone_builds_and_runs_in_eval():
    model = tiny(18, norm="SyncBN")
    assert isinstance(model.bn1, SyncBatchNorm2d)
    assert len(bn_modules(model)) == 20
    model.eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, H, W))
    assert [o.shape[1] for o in outs] == [8, 16, 32, 64]


def test_forward_rejects_non_images():
    with pytest.raises(ValueError, match="B, 3, H, W"):
        tiny(18)(torch.randn(1, 4, H, W))


# --------------------------------------------------------------------------------------------
# ResNet: loading weights
# --------------------------------------------------------------------------------------------


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model"])
def test_load_weights_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    src = tiny(18)
    randomise_(src, seed=1)
    state = {"module." + k: v for k, v in src.state_dict().items()}
    state["module.fc.weight"] = torch.randn(10, 64)
    state["module.fc.bias"] = torch.randn(10)
    path = tmp_path / "r18.pth"
    torch.save(state if wrap == "raw" else {wrap: state, "meta": {"epoch": 3}}, path)

    dst = tiny(18)
    report = dst.load_weights(path)
    assert isinstance(report, WeightsReport)
    assert report.loaded == list(dst.state_dict())
    assert report.missing == []
    assert report.unexpected == []
    assert report.ignored == ["fc.weight", "fc.bias"]
    _assert_same_state(src, dst)
    # frozen parameters stay frozen after loading
    assert not dst.conv1.weight.requires_grad


def test_load_detector_checkpoint_keeps_backbone_only(tmp_path):
    src = tiny(50)
    randomise_(src, seed=2)
    state = {"backbone." + k: v for k, v in src.state_dict().items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(4, 32, 1, 1)
    path = tmp_path / "detector.pth"
    torch.save({"state_dict": state}, path)
    dst = tiny(50)
    report = dst.load_weights(path)
    assert report.ignored == ["neck.lateral_convs.0.conv.weight"]
    assert report.missing == [] and report.unexpected == []
    _assert_same_state(src, dst)


def test_load_batchnorm_checkpoint_into_frozen_bn(tmp_path):
    src = tiny(18, norm="BN")
    randomise_(src, seed=3)
    src.eval()
    path = tmp_path / "bn.pth"
    torch.save(src.state_dict(), path)
    dst = tiny(18, norm="FrozenBN")
    report = dst.load_weights(path)
    assert report.missing == [] and report.unexpected == []
    assert len(report.ignored) == 20
    assert all(k.endswith("num_batches_tracked") for k in report.ignored)
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        for a, b in zip(src(x), dst(x), strict=True):
            torch.testing.assert_close(a, b)
    # and back: a FrozenBN checkpoint (no step counters) fills a BN model, none reported missing
    torch.save(dst.state_dict(), tmp_path / "frozen.pth")
    report = tiny(18, norm="BN").load_weights(tmp_path / "frozen.pth")
    assert report.missing == [] and len(report.loaded) == 100


def test_load_weights_reports_missing_and_unexpected(tmp_path):
    state = tiny(18).state_dict()
    del state["layer4.1.conv2.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "partial.pth")
    report = tiny(18).load_weights(tmp_path / "partial.pth")
    assert report.missing == ["layer4.1.conv2.weight"]
    assert report.unexpected == ["layer5.0.conv1.weight"]
    assert "layer4.1.conv2.weight" in report.summary()


def test_weights_from_config_are_loaded_and_logged(tmp_path, caplog):
    src = tiny(18)
    randomise_(src, seed=4)
    path = tmp_path / "cfg.pth"
    torch.save(src.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="instseg.backbone"):
        dst = ResNet(ResNetConfig(depth=18, base_width=8, weights=str(path)))
    _assert_same_state(src, dst)
    records = [r for r in caplog.records if r.name == "instseg.backbone"]
    assert records and str(path) in records[0].getMessage()
    assert "loaded 120" in records[0].getMessage()


def test_load_weights_shape_mismatch(tmp_path):
    state = tiny(18).state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(8, 8, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    model = tiny(18)
    before = model.conv1.weight.clone()
    with pytest.raises(ValueError) as err:
        model.load_weights(path)
    message = str(err.value)
    assert "layer1.0.conv1.weight" in message
    assert "(8, 8, 1, 1)" in message and "(8, 8, 3, 3)" in message
    assert torch.equal(model.conv1.weight, before)  # nothing copied


def test_load_weights_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        tiny(18).load_weights(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        ResNet(ResNetConfig(depth=18, base_width=8, weights=str(path)))


def test_load_weights_rejects_files_without_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="state dict"):
        tiny(18).load_weights(tmp_path / "list.pth")
    torch.save({"head.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no entry matches"):
        tiny(18).load_weights(tmp_path / "other.pth")


def test_safetensors_without_package_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x00" * 16)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        tiny(18).load_weights(path)


def test_safetensors_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    src = tiny(18)
    randomise_(src, seed=5)
    path = tmp_path / "w.safetensors"
    st.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = tiny(18)
    report = dst.load_weights(path)
    assert report.missing == [] and report.unexpected == []
    _assert_same_state(src, dst)


# --------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"depth": 42}, "depth"),
        ({"norm": "LN"}, "norm"),
        ({"frozen_stages": 5}, "frozen_stages"),
        ({"frozen_stages": -2}, "frozen_stages"),
        ({"out_indices": (4,)}, "out_indices"),
        ({"out_indices": ()}, "out_indices"),
        ({"out_indices": (2, 1)}, "out_indices"),
        ({"base_width": 0}, "base_width"),
        ({"norm": "GN", "base_width": 16}, "base_width"),
    ],
)
def test_resnet_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ResNetConfig.{field}"):
        ResNetConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"out_channels": 0}, "out_channels"), ({"num_outs": 0}, "num_outs")]
)
def test_fpn_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"FPNConfig.{field}"):
        FPNConfig(**kwargs)


def test_fpn_rejects_mismatched_levels():
    with pytest.raises(ValueError, match="num_outs"):
        FPN([8, 16, 32], FPNConfig(num_outs=2))
    with pytest.raises(ValueError, match="in_strides"):
        FPN([8, 16], in_strides=[4])
    neck = FPN([8, 16], FPNConfig(out_channels=4, num_outs=2))
    with pytest.raises(ValueError, match="2 input levels"):
        neck([torch.zeros(1, 8, 4, 4)])


# --------------------------------------------------------------------------------------------
# FPN
# --------------------------------------------------------------------------------------------


def test_fpn_names_init_and_strides():
    neck = FPN([32, 64, 128, 256], FPNConfig(out_channels=16, num_outs=5))
    expected = [
        f"{group}.{i}.conv.{p}"
        for group in ("lateral_convs", "fpn_convs")
        for i in range(4)
        for p in ("weight", "bias")
    ]
    assert list(neck.state_dict()) == expected
    assert neck.strides == [4, 8, 16, 32, 64]
    assert neck.out_channels == [16] * 5
    for i, c in enumerate([32, 64, 128, 256]):
        lateral = neck.lateral_convs[i].conv
        assert lateral.weight.shape == (16, c, 1, 1)
        assert lateral.weight.abs().max() <= math.sqrt(6.0 / (c + 16))
        assert torch.equal(lateral.bias, torch.zeros(16))
        smooth = neck.fpn_convs[i].conv
        assert smooth.weight.shape == (16, 16, 3, 3) and smooth.padding == (1, 1)
        assert smooth.weight.abs().max() <= math.sqrt(6.0 / (16 * 9 * 2))
        assert torch.equal(smooth.bias, torch.zeros(16))
    assert FPN([8, 16, 32], FPNConfig(num_outs=5), in_strides=[8, 16, 32]).strides == [
        8,
        16,
        32,
        64,
        128,
    ]


def test_fpn_top_down_sum_constant_weights():
    """Lateral weights 1 (channel sum), smoothing conv the identity: outputs are the sums."""
    neck = FPN([2, 2], FPNConfig(out_channels=1, num_outs=3))
    with torch.no_grad():
        for lateral in neck.lateral_convs:
            lateral.conv.weight.fill_(1.0)
        for smooth in neck.fpn_convs:
            smooth.conv.weight.zero_()
            smooth.conv.weight[0, 0, 1, 1] = 1.0
    c2 = torch.ones(1, 2, 4, 4)  # channel sum 2 everywhere
    c3 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(1, 2, 2, 2) * 5  # channel sum 10 * c
    with torch.no_grad():
        p2, p3, p4 = neck([c2, c3])
    expected_p3 = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    expected_p2 = torch.tensor(
        [
            [12.0, 12.0, 22.0, 22.0],
            [12.0, 12.0, 22.0, 22.0],
            [32.0, 32.0, 42.0, 42.0],
            [32.0, 32.0, 42.0, 42.0],
        ]
    )
    torch.testing.assert_close(p3[0, 0], expected_p3)
    torch.testing.assert_close(p2[0, 0], expected_p2)
    torch.testing.assert_close(p4[0, 0], torch.tensor([[10.0]]))


def _reference_fpn(neck: FPN, feats: list[torch.Tensor], num_outs: int) -> list[torch.Tensor]:
    """Loop-by-loop float64 FPN for batch 1: 1x1 laterals, nearest top-down, 3x3 zero-pad."""
    laterals = []
    for i, x in enumerate(feats):
        w = neck.lateral_convs[i].conv.weight.double()
        b = neck.lateral_convs[i].conv.bias.double()
        c_out, c_in = w.shape[:2]
        _, _, h, wd = x.shape
        lat = torch.zeros(c_out, h, wd, dtype=torch.float64)
        for o in range(c_out):
            for y in range(h):
                for xx in range(wd):
                    lat[o, y, xx] = b[o] + sum(w[o, c, 0, 0] * x[0, c, y, xx] for c in range(c_in))
        laterals.append(lat)
    for i in range(len(laterals) - 1, 0, -1):
        fine, coarse = laterals[i - 1], laterals[i]
        hf, wf = fine.shape[1:]
        hc, wc = coarse.shape[1:]
        summed = fine.clone()
        for y in range(hf):
            for xx in range(wf):
                summed[:, y, xx] += coarse[:, (y * hc) // hf, (xx * wc) // wf]
        laterals[i - 1] = summed
    outs = []
    for i, lat in enumerate(laterals):
        w = neck.fpn_convs[i].conv.weight.double()
        b = neck.fpn_convs[i].conv.bias.double()
        c, h, wd = lat.shape
        out = torch.zeros(c, h, wd, dtype=torch.float64)
        for o in range(c):
            for y in range(h):
                for xx in range(wd):
                    acc = b[o]
                    for ci in range(c):
                        for dy in range(3):
                            for dx in range(3):
                                yy, xs = y + dy - 1, xx + dx - 1
                                if 0 <= yy < h and 0 <= xs < wd:
                                    acc = acc + w[o, ci, dy, dx] * lat[ci, yy, xs]
                    out[o, y, xx] = acc
        outs.append(out)
    while len(outs) < num_outs:
        outs.append(outs[-1][:, ::2, ::2])
    return outs


def test_fpn_matches_loop_reference_on_odd_sizes():
    torch.manual_seed(0)
    neck = FPN([2, 3], FPNConfig(out_channels=2, num_outs=3)).double()
    with torch.no_grad():
        for conv in neck.modules():
            if isinstance(conv, nn.Conv2d):
                conv.bias.normal_()
    feats = [
        torch.randn(1, 2, 5, 7, dtype=torch.float64),
        torch.randn(1, 3, 3, 4, dtype=torch.float64),
    ]
    with torch.no_grad():
        outs = neck(feats)
    expected = _reference_fpn(neck, feats, 3)
    assert [tuple(o.shape[1:]) for o in outs] == [(2, 5, 7), (2, 3, 4), (2, 2, 2)]
    for got, want in zip(outs, expected, strict=True):
        torch.testing.assert_close(got[0], want)


_CHANNELS_LAST_BACKWARD = """
import torch
from instseg.modeling.backbone.resnet import ResNet, ResNetConfig
torch.manual_seed(0)
net = ResNet(ResNetConfig(depth=18, base_width=8, frozen_stages=-1, norm_eval=False))
feats = net(torch.randn(3, 3, 128, 192))
sum(f.sum() for f in feats).backward()
print("backward done")
"""


def test_channels_last_backward_of_strided_1x1_convolutions():
    # torch 2.13's oneDNN aborts the process in the weight gradient of a strided 1x1 conv on a
    # channels-last map with 8 input channels and an odd batch (layer2's shortcut here); the
    # shortcut reads the subsampled map instead. A subprocess turns an abort into a failure.
    run = subprocess.run(
        [sys.executable, "-c", _CHANNELS_LAST_BACKWARD], capture_output=True, text=True
    )
    assert run.returncode == 0 and "backward done" in run.stdout, run.stderr[-2000:]


def test_channels_last_features_match_nchw():
    torch.manual_seed(0)
    nchw = ResNet(ResNetConfig(depth=50, base_width=8, channels_last=False))
    nhwc = ResNet(ResNetConfig(depth=50, base_width=8, channels_last=True))
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.randn(3, 3, 96, 128)
    for a, b in zip(nchw(x), nhwc(x), strict=True):
        assert b.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def _msra_r50_blobs() -> dict[str, np.ndarray]:
    """Detectron's MSRA ImageNet ResNet-50 in its Caffe2 names (``R-50.pkl``): ``conv1_w``,
    ``res_conv1_bn_{s,b}``; per block ``res{2..5}_{b}_branch2{a,b,c}_{w,bn_s,bn_b}`` and, in
    block 0, ``branch1`` (the projection); ``fc1000``; solver ``_momentum`` blobs."""
    rng = np.random.default_rng(0)
    blobs: dict[str, np.ndarray] = {}

    def put(name: str, *shape: int) -> None:
        blobs[name] = rng.standard_normal(shape).astype(np.float32)

    put("conv1_w", 64, 3, 7, 7)
    put("res_conv1_bn_s", 64)
    put("res_conv1_bn_b", 64)
    put("conv1_w_momentum", 64, 3, 7, 7)
    in_ch = 64
    for stage, (blocks, mid) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        out = mid * 4
        for b in range(blocks):
            name = f"res{stage + 2}_{b}"
            if b == 0:
                put(f"{name}_branch1_w", out, in_ch, 1, 1)
                put(f"{name}_branch1_bn_s", out)
                put(f"{name}_branch1_bn_b", out)
            block_in = in_ch if b == 0 else out
            shapes = {"2a": (mid, block_in, 1, 1), "2b": (mid, mid, 3, 3), "2c": (out, mid, 1, 1)}
            for branch, shape in shapes.items():
                put(f"{name}_branch{branch}_w", *shape)
                put(f"{name}_branch{branch}_bn_s", shape[0])
                put(f"{name}_branch{branch}_bn_b", shape[0])
        in_ch = out
    put("fc1000_w", 1000, 2048)
    put("fc1000_b", 1000)
    return blobs


def test_msra_caffe2_weights_load_from_a_detectron_pickle(tmp_path):
    import pickle

    blobs = _msra_r50_blobs()
    path = tmp_path / "R-50.pkl"
    with path.open("wb") as f:
        pickle.dump({"blobs": blobs}, f)
    cfg = ResNetConfig(depth=50, style="caffe", norm="FrozenBN", weights=str(path))
    model = ResNet(cfg)
    state = model.state_dict()
    # A few names by hand; every entry of the model comes from the file.
    pairs = {
        "conv1.weight": "conv1_w",
        "bn1.weight": "res_conv1_bn_s",
        "layer1.0.downsample.0.weight": "res2_0_branch1_w",
        "layer1.0.downsample.1.bias": "res2_0_branch1_bn_b",
        "layer3.5.conv2.weight": "res4_5_branch2b_w",
        "layer4.2.bn3.weight": "res5_2_branch2c_bn_s",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(state[ours], torch.from_numpy(blobs[theirs])), ours
    report = model.load_weights(path)
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]
    weights = [k for k in state if k.endswith(".weight") and not k.startswith("fc")]
    convs = sum(1 for k in blobs if k.endswith("_w") and not k.startswith("fc"))
    norms = sum(1 for k in blobs if k.endswith("_bn_s"))
    assert len(weights) == convs + norms
    # Caffe2 folded each BatchNorm into s and b: mean 0 and variance 1 here.
    assert all(state[k].eq(0).all() for k in state if k.endswith("running_mean"))
    assert all(state[k].eq(1).all() for k in state if k.endswith("running_var"))


def test_a_detectron_pickle_asking_for_code_is_refused(tmp_path):
    import os
    import pickle

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    path = tmp_path / "R-50.pkl"
    with path.open("wb") as f:
        pickle.dump({"blobs": {"conv1_w": RunsCode()}}, f)
    with pytest.raises(ValueError, match=r"unsupported GLOBAL (posix|os)\.system"):
        ResNet(ResNetConfig(depth=50, weights=str(path)))
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------------------ norms folded into convs


def _eval_bn_like(kind: str, channels: int, gen: torch.Generator) -> nn.Module:
    norm = build_norm(kind, channels).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5)
        norm.bias.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
        norm.running_mean.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
        norm.running_var.copy_(torch.rand(channels, generator=gen, dtype=torch.float64) + 0.1)
    return norm.eval()


@pytest.mark.parametrize("kind", ["FrozenBN", "BN", "SyncBN"])
@pytest.mark.parametrize(
    ("kernel", "stride", "bias", "channels_last"),
    [(3, 1, False, False), (3, 2, True, False), (1, 2, False, True), (7, 2, False, False)],
)
def test_conv_norm_equals_the_norm_after_the_conv_with_its_gradients(
    kind, kernel, stride, bias, channels_last
):
    """Folded and unfolded in float64: the same outputs, and the same gradients for the
    input, the conv's weight and bias and the (trainable) norm weight and bias."""
    from instseg.layers import conv_norm
    from instseg.modeling.backbone.resnet import _Conv1x1

    gen = torch.Generator().manual_seed(kernel * 10 + stride)
    conv_type = _Conv1x1 if kernel == 1 else nn.Conv2d
    conv = conv_type(6, 5, kernel, stride=stride, padding=kernel // 2, bias=bias).double()
    norm = _eval_bn_like(kind, 5, gen)
    x = torch.randn(3, 6, 17, 22, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grads = []
    for fold in (False, True):
        xi = x.clone().requires_grad_(True)
        out = conv_norm(conv, norm, xi) if fold else norm(conv(xi))
        weights = torch.randn(
            out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype
        )
        (out * weights).sum().backward()
        params = [p for p in (conv.weight, conv.bias, norm.weight, norm.bias) if p is not None]
        params = [p for p in params if isinstance(p, nn.Parameter)]
        grads.append([out.detach(), xi.grad, *(p.grad.clone() for p in params)])
        for p in params:
            p.grad = None
    assert len(grads[1]) == len(grads[0]) >= 3
    for folded, plain in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(folded, plain, rtol=1e-12, atol=1e-12)


def test_norms_without_fixed_statistics_are_not_folded():
    from instseg.layers import conv_norm, fixed_affine

    gen = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(4, 32, 3, padding=1, bias=False).double()
    x = torch.randn(2, 4, 9, 9, generator=gen, dtype=torch.float64)
    training_bn = _eval_bn_like("BN", 32, gen).train()
    assert fixed_affine(training_bn) is None and fixed_affine(build_norm("GN", 32)) is None
    reference = _eval_bn_like("BN", 32, torch.Generator().manual_seed(3)).train()
    reference.load_state_dict(training_bn.state_dict())
    # Training-mode BN normalises by the batch and updates its running statistics as before.
    torch.testing.assert_close(conv_norm(conv, training_bn, x), reference(conv(x)), rtol=0, atol=0)
    torch.testing.assert_close(training_bn.running_mean, reference.running_mean, rtol=0, atol=0)
    no_stats = nn.BatchNorm2d(32, track_running_stats=False).double().eval()
    assert fixed_affine(no_stats) is None


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_with_folded_norms_equals_the_unfolded_one(depth):
    """Whole backbones in float64, trained stages and frozen ones (norm_eval BN): features and
    every parameter's gradient agree with the conv-then-norm order of the official code."""
    nets = [tiny(depth, fold_norm=fold, frozen_stages=1) for fold in (False, True)]
    randomise_(nets[0], seed=5)
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = []
    for net in nets:
        net.double().train()  # norm_eval: every BN stays in eval mode, and is folded
        feats = net(x)
        sum((f * f.detach().sign()).sum() for f in feats).backward()
        grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        results.append((feats, grads))
    (feats_plain, grads_plain), (feats_folded, grads_folded) = results
    for a, b in zip(feats_folded, feats_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert grads_folded.keys() == grads_plain.keys()
    assert any(n.endswith("bn1.weight") for n in grads_plain)  # trainable BN weights
    for name, grad in grads_folded.items():
        torch.testing.assert_close(grad, grads_plain[name], rtol=1e-9, atol=1e-9, msg=name)
