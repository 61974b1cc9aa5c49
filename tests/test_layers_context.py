"""Tests for ``NonLocal2d``, GCNet's ``ContextBlock`` and the ResNet context-block plugin.

The blocks are compared in float64 with references written here position by position
(explicit loops over queries and keys, softmax by hand), with random non-zero weights
everywhere, the zero-initialised output convs included, so that a wrong term shows up.
Names and init follow mmcv's ``NonLocal2d`` / ``ContextBlock`` and mmdet's plugin naming.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor, nn

from instseg.layers.context_block import ContextBlock
from instseg.layers.non_local import NonLocal2d, NonLocalConfig
from instseg.layers.norm import SyncBatchNorm2d
from instseg.modeling.backbone import ResNet, ResNetConfig

MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
GCB_STAGES = (False, True, True, True)


def randomise_(module: nn.Module, seed: int, scale: float = 0.5) -> None:
    """Every parameter and float buffer random (running variances positive)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * scale)


def _apply_1x1(conv: nn.Conv2d, v: Tensor) -> Tensor:
    out = conv.weight[:, :, 0, 0] @ v
    return out if conv.bias is None else out + conv.bias


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    total = sum(exps)
    return [e / total for e in exps]


def _pool_2x2(vectors: dict[tuple[int, int], Tensor], h: int, w: int) -> list[Tensor]:
    """Channel-wise max over 2x2 windows (stride 2, remainder rows/columns dropped)."""
    keys = []
    for a in range(h // 2):
        for b in range(w // 2):
            window = [vectors[(2 * a + di, 2 * b + dj)] for di in (0, 1) for dj in (0, 1)]
            keys.append(torch.stack(window).amax(dim=0))
    return keys


# --------------------------------------------------------------------------------------------
# NonLocal2d
# --------------------------------------------------------------------------------------------


def _inner(module: nn.Module) -> nn.Module:
    """The ConvModule of ``g`` / ``phi``, unwrapped from its (module, max-pool) pair."""
    return module[0] if isinstance(module, nn.Sequential) else module


@torch.no_grad()
def nonlocal_reference(m: NonLocal2d, x: Tensor) -> Tensor:
    """mmcv's NonLocal2d written out, one query position and one key at a time."""
    n, _, h, w = x.shape
    inter = m.inter_channels
    positions = [(i, j) for i in range(h) for j in range(w)]
    out = torch.empty_like(x)
    for b in range(n):
        pix = {p: x[b, :, p[0], p[1]] for p in positions}
        g = {p: _apply_1x1(_inner(m.g).conv, pix[p]) for p in positions}
        if m.mode == "gaussian":
            theta, phi = pix, pix  # the raw input on both sides
        else:
            theta = {p: _apply_1x1(m.theta.conv, pix[p]) for p in positions}
            phi = {p: _apply_1x1(_inner(m.phi).conv, pix[p]) for p in positions}
        if m.sub_sample:
            g_keys, phi_keys = _pool_2x2(g, h, w), _pool_2x2(phi, h, w)
        else:
            g_keys, phi_keys = [g[p] for p in positions], [phi[p] for p in positions]
        num_keys = len(g_keys)
        for q in positions:
            if m.mode == "concatenation":
                wcat = m.concat_project.conv.weight[0, :, 0, 0]
                weights = [
                    max(float(wcat @ torch.cat([theta[q], k])), 0.0) / num_keys for k in phi_keys
                ]
            else:
                dots = [float(theta[q] @ k) for k in phi_keys]
                if m.mode == "dot_product":
                    weights = [d / num_keys for d in dots]
                elif m.mode == "gaussian":
                    weights = _softmax(dots)
                else:
                    scale = math.sqrt(inter) if m.use_scale else 1.0
                    weights = _softmax([d / scale for d in dots])
            y = sum(wk * gk for wk, gk in zip(weights, g_keys, strict=True))
            z = _apply_1x1(m.conv_out.conv, y)
            norm = m.conv_out.norm
            if norm is not None:  # BatchNorm in eval mode
                z = (z - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
                z = z * norm.weight + norm.bias
            out[b, :, q[0], q[1]] = pix[q] + z
    return out


@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_nonlocal_matches_loop_reference(mode, sub_sample):
    m = NonLocal2d(4, mode=mode, sub_sample=sub_sample).double()
    randomise_(m, seed=1)
    assert m.conv_out.conv.weight.abs().min() > 0  # the output conv takes part
    x = torch.randn(2, 4, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = nonlocal_reference(m, x)
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(expected, x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"use_scale": False},
        {"reduction": 8},  # inter = max(4 // 8, 1) = 1
        {"reduction": 1, "sub_sample": True},
        {"norm": "BN", "mode": "dot_product"},
    ],
)
def test_nonlocal_variants_match_loop_reference(kwargs):
    m = NonLocal2d(4, **kwargs).double().eval()
    randomise_(m, seed=3)
    x = torch.randn(1, 4, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(m(x), nonlocal_reference(m, x), rtol=1e-10, atol=1e-10)


def test_nonlocal_inter_channels():
    assert NonLocal2d(7).inter_channels == 3
    assert NonLocal2d(4, reduction=8).inter_channels == 1
    assert NonLocal2d(6, reduction=1).theta.conv.out_channels == 6


def conv_keys(*names: str) -> list[str]:
    return [f"{name}.conv.{p}" for name in names for p in ("weight", "bias")]


BN_KEYS = [f"conv_out.bn.{k}" for k in ("weight", "bias", "running_mean", "running_var")]


@pytest.mark.parametrize(
    ("kwargs", "keys"),
    [
        ({}, conv_keys("g", "conv_out", "theta", "phi")),
        ({"sub_sample": True}, conv_keys("g.0", "conv_out", "theta", "phi.0")),
        ({"mode": "gaussian"}, conv_keys("g", "conv_out")),
        ({"mode": "gaussian", "sub_sample": True}, conv_keys("g.0", "conv_out")),
        (
            {"mode": "concatenation"},
            [*conv_keys("g", "conv_out", "theta", "phi"), "concat_project.conv.weight"],
        ),
        (
            {"mode": "dot_product", "norm": "BN"},
            [
                *conv_keys("g"),
                "conv_out.conv.weight",
                *BN_KEYS,
                "conv_out.bn.num_batches_tracked",
                *conv_keys("theta", "phi"),
            ],
        ),
    ],
)
def test_nonlocal_state_dict_keys_in_mmcv_order(kwargs, keys):
    m = NonLocal2d(8, **kwargs)
    assert list(m.state_dict()) == keys
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes[next(k for k in keys if k.startswith("g."))] == (4, 8, 1, 1)
    assert shapes["conv_out.conv.weight"] == (8, 4, 1, 1)
    if "concat_project.conv.weight" in shapes:
        assert shapes["concat_project.conv.weight"] == (1, 8, 1, 1)
    if kwargs.get("mode") == "gaussian" and kwargs.get("sub_sample"):
        assert isinstance(m.phi, nn.MaxPool2d)  # phi is only the pool, on the raw input


@pytest.mark.parametrize("mode", MODES)
def test_nonlocal_init_and_identity_at_init(mode):
    torch.manual_seed(0)
    m = NonLocal2d(64, reduction=1, mode=mode)
    projections = [m.g] if mode == "gaussian" else [m.g, m.theta, m.phi]
    for proj in projections:
        assert proj.conv.weight.std().item() == pytest.approx(0.01, rel=0.1)
        assert torch.equal(proj.conv.bias, torch.zeros_like(proj.conv.bias))
    assert torch.equal(m.conv_out.conv.weight, torch.zeros_like(m.conv_out.conv.weight))
    assert torch.equal(m.conv_out.conv.bias, torch.zeros_like(m.conv_out.conv.bias))
    if mode == "concatenation":  # ConvModule's Kaiming fan_out init: fan_out = 1
        assert m.concat_project.conv.weight.std().item() == pytest.approx(math.sqrt(2), rel=0.3)
    x = torch.randn(2, 64, 5, 6)
    assert torch.equal(m(x), x)


@pytest.mark.parametrize("norm", ["BN", "GN", "SyncBN"])
def test_nonlocal_norm_on_conv_out_is_zeroed(norm):
    m = NonLocal2d(64, norm=norm, sub_sample=True)
    out_norm = m.conv_out.norm
    assert m.conv_out.conv.bias is None
    assert m.conv_out.conv.weight.abs().sum() > 0  # the conv keeps its Kaiming init
    assert torch.equal(out_norm.weight, torch.zeros_like(out_norm.weight))
    assert torch.equal(out_norm.bias, torch.zeros_like(out_norm.bias))
    m.train()
    x = torch.randn(2, 64, 6, 4)
    assert torch.equal(m(x), x)


@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_nonlocal_backward(mode, sub_sample):
    m = NonLocal2d(4, mode=mode, sub_sample=sub_sample).double()
    randomise_(m, seed=5)
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True)
    m(x).pow(2).sum().backward()
    for name, param in m.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_nonlocal_config_builds_and_validates():
    cfg = NonLocalConfig(reduction=4, use_scale=False, mode="dot_product", sub_sample=True)
    m = cfg.build(16)
    assert isinstance(m, NonLocal2d)
    assert (m.in_channels, m.inter_channels, m.mode, m.use_scale, m.sub_sample) == (
        16,
        4,
        "dot_product",
        False,
        True,
    )
    assert NonLocalConfig(norm="GN").build(32).conv_out.norm_name == "gn"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"reduction": 0}, "reduction"),
        ({"reduction": 1.5}, "reduction"),
        ({"use_scale": "yes"}, "use_scale"),
        ({"mode": "softmax"}, "mode"),
        ({"sub_sample": 1}, "sub_sample"),
        ({"norm": "LN"}, "norm"),
        ({"norm": "FrozenBN"}, "norm"),
    ],
)
def test_nonlocal_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"NonLocalConfig.{field}"):
        NonLocalConfig(**kwargs)
    with pytest.raises(ValueError, match=field):
        NonLocal2d(8, **kwargs)


def test_nonlocal_rejects_wrong_input():
    with pytest.raises(ValueError, match="in_channels"):
        NonLocal2d(0)
    with pytest.raises(ValueError, match="N, 8, H, W"):
        NonLocal2d(8)(torch.randn(1, 4, 5, 5))


# --------------------------------------------------------------------------------------------
# ContextBlock
# --------------------------------------------------------------------------------------------


def _transform_reference(branch: nn.Sequential, v: Tensor) -> Tensor:
    conv1, ln, _, conv2 = branch
    hidden = _apply_1x1(conv1, v)
    mean = hidden.mean()
    var = ((hidden - mean) ** 2).mean()
    hidden = (hidden - mean) / torch.sqrt(var + ln.eps) * ln.weight.view(-1) + ln.bias.view(-1)
    return _apply_1x1(conv2, hidden.clamp(min=0))


@torch.no_grad()
def context_reference(m: ContextBlock, x: Tensor) -> Tensor:
    """GCNet's block written out: context by an explicit sum over positions."""
    n, c, h, w = x.shape
    positions = [(i, j) for i in range(h) for j in range(w)]
    out = torch.empty_like(x)
    for b in range(n):
        pix = [x[b, :, i, j] for i, j in positions]
        if m.pooling_type == "att":
            logits = [float(_apply_1x1(m.conv_mask, v)[0]) for v in pix]
            context = sum(a * v for a, v in zip(_softmax(logits), pix, strict=True))
        else:
            context = sum(pix) / len(pix)
        gate = torch.ones(c, dtype=x.dtype)
        if m.channel_mul_conv is not None:
            gate = 1.0 / (1.0 + torch.exp(-_transform_reference(m.channel_mul_conv, context)))
        add = torch.zeros(c, dtype=x.dtype)
        if m.channel_add_conv is not None:
            add = _transform_reference(m.channel_add_conv, context)
        for (i, j), v in zip(positions, pix, strict=True):
            out[b, :, i, j] = v * gate + add
    return out


FUSIONS = [
    ("channel_add",),
    ("channel_mul",),
    ("channel_add", "channel_mul"),
    ("channel_mul", "channel_add"),
]


@pytest.mark.parametrize("fusion_types", FUSIONS)
@pytest.mark.parametrize("pooling_type", ["att", "avg"])
def test_context_block_matches_loop_reference(pooling_type, fusion_types):
    m = ContextBlock(8, 0.5, pooling_type=pooling_type, fusion_types=fusion_types).double()
    randomise_(m, seed=7)
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    expected = context_reference(m, x)
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(expected, x)
    m(x.requires_grad_()).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("pooling_type", ["att", "avg"])
def test_context_block_init(pooling_type):
    torch.manual_seed(0)
    m = ContextBlock(2048, 1 / 16, pooling_type=pooling_type, fusion_types=FUSIONS[2])
    if pooling_type == "att":  # Kaiming normal, fan_in = 2048, ReLU gain
        assert m.conv_mask.weight.std().item() == pytest.approx(math.sqrt(2 / 2048), rel=0.1)
        assert torch.equal(m.conv_mask.bias, torch.zeros(1))
    for branch in (m.channel_add_conv, m.channel_mul_conv):
        first, ln, last = branch[0], branch[1], branch[3]
        assert first.weight.abs().max() <= 1 / math.sqrt(2048)  # PyTorch's default init
        assert torch.equal(ln.weight, torch.ones(128, 1, 1))
        assert torch.equal(ln.bias, torch.zeros(128, 1, 1))
        assert torch.equal(last.weight, torch.zeros_like(last.weight))
        assert torch.equal(last.bias, torch.zeros_like(last.bias))
    # channel-add starts as the identity, a channel-mul gate at sigmoid(0) = 1/2 (as mmcv)
    x = torch.randn(2, 2048, 3, 4)
    add_only = ContextBlock(2048, 1 / 16, pooling_type=pooling_type)
    assert torch.equal(add_only(x), x)
    mul_only = ContextBlock(2048, 1 / 16, pooling_type=pooling_type, fusion_types=FUSIONS[1])
    torch.testing.assert_close(mul_only(x), x / 2)


def test_context_block_parameter_names_and_planes():
    m = ContextBlock(16, 0.25)
    assert m.planes == 4
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "conv_mask.weight": (1, 16, 1, 1),
        "conv_mask.bias": (1,),
        "channel_add_conv.0.weight": (4, 16, 1, 1),
        "channel_add_conv.0.bias": (4,),
        "channel_add_conv.1.weight": (4, 1, 1),
        "channel_add_conv.1.bias": (4, 1, 1),
        "channel_add_conv.3.weight": (16, 4, 1, 1),
        "channel_add_conv.3.bias": (16,),
    }
    avg = ContextBlock(16, 0.25, pooling_type="avg", fusion_types=("channel_mul",))
    assert sorted(avg.state_dict()) == sorted(
        f"channel_mul_conv.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")
    )
    assert isinstance(avg.avg_pool, nn.AdaptiveAvgPool2d) and not hasattr(avg, "conv_mask")
    assert avg.channel_add_conv is None
    # planes is int(C * ratio), truncation and float rounding included
    assert ContextBlock(10, 1 / 3).planes == 3
    assert ContextBlock(100, 0.29).planes == int(100 * 0.29) == 28


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_channels": 0}, "in_channels"),
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 0.01}, "ratio"),  # int(16 * 0.01) = 0 bottleneck channels
        ({"pooling_type": "max"}, "pooling_type"),
        ({"fusion_types": ()}, "fusion_types"),
        ({"fusion_types": ("channel_sum",)}, "fusion_types"),
        ({"fusion_types": "channel_add"}, "fusion_types"),
        ({"fusion_types": ("channel_add", "channel_add")}, "fusion_types"),
    ],
)
def test_context_block_errors(kwargs, match):
    args = {"in_channels": 16, "ratio": 0.25, **kwargs}
    with pytest.raises(ValueError, match=match):
        ContextBlock(**args)


# --------------------------------------------------------------------------------------------
# ResNet plugin
# --------------------------------------------------------------------------------------------


def narrow(depth: int = 50, **kwargs) -> ResNet:
    kwargs.setdefault("base_width", 8)
    return ResNet(ResNetConfig(depth=depth, **kwargs))


def context_blocks(model: nn.Module) -> dict[str, ContextBlock]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ContextBlock)}


def test_resnet_context_blocks_in_chosen_stages_only():
    model = narrow(50, context_block_stages=GCB_STAGES)
    blocks = context_blocks(model)
    assert len(blocks) == 4 + 6 + 3
    assert sorted(blocks) == sorted(
        f"layer{s}.{i}.context_block" for s, n in ((2, 4), (3, 6), (4, 3)) for i in range(n)
    )
    for stage, channels in ((model.layer2, 64), (model.layer3, 128), (model.layer4, 256)):
        for block in stage:
            assert block.context_block.in_channels == channels == block.bn3.num_features
            assert block.context_block.planes == channels // 4
            assert block.context_block.pooling_type == "att"
            assert block.context_block.fusion_types == ("channel_add",)
    assert not any(hasattr(block, "context_block") for block in model.layer1)
    thin = narrow(50, context_block_ratio=1 / 16, context_block_stages=GCB_STAGES)
    assert thin.layer4[0].context_block.planes == 256 // 16


def test_resnet_context_block_state_dict_keys():
    plain = narrow(50).state_dict()
    gcb = narrow(50, context_block_stages=GCB_STAGES).state_dict()
    assert "layer2.0.context_block.conv_mask.weight" in gcb
    assert "layer4.2.context_block.channel_add_conv.3.bias" in gcb
    extra = [k for k in gcb if k not in plain]
    assert all(re.fullmatch(r"layer[234]\.\d+\.context_block\..+", k) for k in extra)
    assert len(extra) == 13 * 8  # conv_mask (2) + channel_add_conv (6) per block
    assert [k for k in gcb if "context_block" not in k] == list(plain)
    assert not any("context_block" in k for k in plain)


@pytest.mark.parametrize(("depth", "stages"), [(50, GCB_STAGES), (18, (True, False, False, True))])
def test_resnet_context_blocks_keep_their_init_and_start_as_identity(depth, stages):
    model = narrow(depth, context_block_stages=stages)
    blocks = context_blocks(model)
    assert len(blocks) == (13 if depth == 50 else 4)
    for cb in blocks.values():
        c = cb.in_channels
        last, first = cb.channel_add_conv[3], cb.channel_add_conv[0]
        assert torch.equal(last.weight, torch.zeros_like(last.weight))
        assert torch.equal(last.bias, torch.zeros_like(last.bias))
        # conv_mask: Kaiming fan_in (std sqrt(2 / C)), not ResNet's fan_out (std sqrt(2))
        assert cb.conv_mask.weight.std().item() < 3 * math.sqrt(2 / c)
        assert first.weight.abs().max() <= 1 / math.sqrt(c)  # untouched PyTorch default

    # Copy a randomised plain net into the GCNet net: same outputs, the blocks are identities.
    kwargs = {"frozen_stages": -1, "zero_init_residual": False}
    plain = narrow(depth, **kwargs).double()
    gcb = narrow(depth, context_block_stages=stages, **kwargs).double()
    randomise_(plain, seed=11, scale=0.1)
    missing, unexpected = gcb.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".context_block." in k for k in missing)
    plain.eval()
    gcb.eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    for a, b in zip(plain(x), gcb(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A non-zero context block changes its stage's output (the test can fail).
    cb = gcb.layer4[0].context_block
    with torch.no_grad():
        cb.channel_add_conv[3].bias.fill_(0.5)
    assert torch.allclose(plain(x)[2], gcb(x)[2])
    assert not torch.allclose(plain(x)[3], gcb(x)[3])


def test_resnet_context_block_position_after_last_norm():
    model = narrow(50, context_block_stages=GCB_STAGES, zero_init_residual=False).double().eval()
    block = model.layer3[1]
    randomise_(block.context_block, seed=12)
    x = torch.randn(2, 128, 5, 6, dtype=torch.float64)
    branch = block.bn1(block.conv1(x)).relu()
    branch = block.bn2(block.conv2(branch)).relu()
    branch = block.bn3(block.conv3(branch))
    expected = (context_reference(block.context_block, branch) + x).relu()
    torch.testing.assert_close(block(x), expected)

    basic = narrow(18, context_block_stages=(False, True, False, False)).double().eval()
    block = basic.layer2[1]
    randomise_(block, seed=13, scale=0.2)
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    branch = block.bn2(block.conv2(block.bn1(block.conv1(x)).relu()))
    expected = (context_reference(block.context_block, branch) + x).relu()
    torch.testing.assert_close(block(x), expected)


def test_resnet_frozen_stages_freeze_their_context_blocks():
    model = narrow(50, context_block_stages=GCB_STAGES, frozen_stages=2, norm_eval=False)
    model.train()
    with torch.no_grad():  # make the blocks' inner weights receive gradients
        for cb in context_blocks(model).values():
            cb.channel_add_conv[3].weight.normal_(std=0.1)
    outs = model(torch.randn(2, 3, 64, 64))
    sum(o.sum() for o in outs).backward()
    for name, cb in context_blocks(model).items():
        frozen = name.startswith("layer2.")
        for pname, param in cb.named_parameters():
            assert param.requires_grad is not frozen, (name, pname)
            assert (param.grad is None) is frozen, (name, pname)


def test_resnet_basic_block_context_blocks_run():
    model = narrow(18, context_block_stages=(True, False, False, True), frozen_stages=-1)
    blocks = context_blocks(model)
    assert sorted(blocks) == [
        "layer1.0.context_block",
        "layer1.1.context_block",
        "layer4.0.context_block",
        "layer4.1.context_block",
    ]
    assert [cb.in_channels for cb in blocks.values()] == [8, 8, 64, 64]
    assert [cb.planes for cb in blocks.values()] == [2, 2, 16, 16]
    outs = model(torch.randn(2, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [8, 16, 32, 64]
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for cb in blocks.values() for p in cb.parameters())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"context_block_stages": (True, True, True)}, "context_block_stages"),
        ({"context_block_stages": (1, 0, 0, 0)}, "context_block_stages"),
        ({"context_block_stages": "TTTT"}, "context_block_stages"),
        ({"context_block_ratio": 0}, "context_block_ratio"),
        ({"context_block_ratio": 1.5}, "context_block_ratio"),
        ({"context_block_ratio": True}, "context_block_ratio"),
    ],
)
def test_resnet_context_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ResNetConfig.{field}"):
        ResNetConfig(**kwargs)


def test_resnet_context_config_accepts_a_list():
    cfg = ResNetConfig(context_block_stages=[False, True, True, True], context_block_ratio=1)
    assert cfg.context_block_stages == GCB_STAGES


# --------------------------------------------------------------------------------------------
# SyncBN backbone, single process
# --------------------------------------------------------------------------------------------


def test_syncbn_backbone_with_context_blocks_trains_like_bn_on_cpu():
    kwargs = {
        "frozen_stages": -1,
        "norm_eval": False,
        "zero_init_residual": False,
        "context_block_stages": GCB_STAGES,
    }
    bn = narrow(50, norm="BN", **kwargs).double()
    sync = narrow(50, norm="SyncBN", **kwargs).double()
    assert sum(isinstance(m, SyncBatchNorm2d) for m in sync.modules()) == 53
    randomise_(bn, seed=21, scale=0.1)
    sync.load_state_dict(bn.state_dict())  # strict: SyncBN keeps BatchNorm's keys
    bn.train()
    sync.train()
    assert all(m.training for m in sync.modules() if isinstance(m, SyncBatchNorm2d))

    gen = torch.Generator().manual_seed(22)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=gen)
    outs_bn, outs_sync = bn(x), sync(x)
    probes = [torch.randn(o.shape, dtype=torch.float64, generator=gen) for o in outs_bn]
    for outs in (outs_bn, outs_sync):
        sum((o * p).sum() for o, p in zip(outs, probes, strict=True)).backward()

    for a, b in zip(outs_bn, outs_sync, strict=True):
        torch.testing.assert_close(a, b)
    grads_bn = dict(bn.named_parameters())
    for name, param in sync.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, grads_bn[name].grad, msg=name)
    state_bn = bn.state_dict()
    for name, value in sync.state_dict().items():  # running statistics moved the same way
        torch.testing.assert_close(value, state_bn[name], msg=name)
