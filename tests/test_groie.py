"""GRoIE (spec §2): GeneralizedAttention against a float64 loop reference, the generic RoI
extractor against a composition of its parts, parameter counts and names of spec §2.3."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from instseg.configs import apply_overrides, get_config
from instseg.layers import ConvModule, ConvModuleConfig, GeneralizedAttention
from instseg.layers.norm import SyncBatchNorm2d
from instseg.modeling.features import pyramid_specs
from instseg.modeling.roi import (
    GenericRoIExtractor,
    GRoIEConfig,
    StandardRoIHead,
    build_roi_extractor,
)
from instseg.modeling.roi.standard import RoIHeadConfig
from instseg.ops import roi_align
from instseg.runner import build_model
from test_models import toy_batch
from test_training import NARROW

ALL_TYPES = ["".join(bits) for bits in itertools.product("01", repeat=4)]


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero values everywhere (gamma included), so that every term can show an error."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


# --------------------------------------------------------------------------------------------
# GeneralizedAttention: an independent float64 loop reference
# --------------------------------------------------------------------------------------------


def _ref_forward(mod: GeneralizedAttention, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Spec §2.4 written position by position, in float64, from the module's weights."""
    x = x.double()
    p = {k: v.detach().double() for k, v in mod.state_dict().items()}
    bits = [b == "1" for b in mod.attention_type]
    heads, d = mod.num_heads, mod.qk_embed_dim
    qs, ks, mag = mod.q_stride, mod.kv_stride, mod.position_magnitude
    dim = mod.position_embedding_dim
    xq, xk = x[:, :, ::qs, ::qs], x[:, :, ::ks, ::ks]
    n, _, h, w = xq.shape
    hk, wk = xk.shape[-2:]

    def conv1x1(name, feat):
        return torch.einsum("oc,nchw->nohw", p[name][:, :, 0, 0], feat)

    def embed(delta):
        out = [math.sin(delta / 1000 ** (4 * k / dim)) for k in range(dim // 4)]
        cos = [math.cos(delta / 1000 ** (4 * k / dim)) for k in range(dim // 4)]
        return torch.tensor(out + cos, dtype=torch.float64)

    q = conv1x1("query_conv.weight", xq) if bits[0] or bits[1] else None
    key = conv1x1("key_conv.weight", xk) if bits[0] or bits[2] else None
    value = conv1x1("value_conv.weight", xk)
    out = torch.zeros(n, heads * mod.v_dim, h, w, dtype=torch.float64)
    for b, m, y, xx in itertools.product(range(n), range(heads), range(h), range(w)):
        sl = slice(m * d, (m + 1) * d)
        energy = torch.zeros(hk, wk, dtype=torch.float64)
        for ky, kx in itertools.product(range(hk), range(wk)):
            e = 0.0
            if bits[1] or bits[3]:
                rx = p["appr_geom_fc_x.weight"] @ embed((xx * qs - kx * ks) * mag) / math.sqrt(2)
                ry = p["appr_geom_fc_y.weight"] @ embed((y * qs - ky * ks) * mag) / math.sqrt(2)
            if bits[0]:
                e += q[b, sl, y, xx] @ key[b, sl, ky, kx]
            if bits[1]:
                row_q = q[b, sl, xx, y] if transposed and not bits[3] else q[b, sl, y, xx]
                e += q[b, sl, y, xx] @ rx[sl] + row_q @ ry[sl]
            if bits[2]:
                e += p["appr_bias"][sl] @ key[b, sl, ky, kx]
            if bits[3]:
                e += p["geom_bias"][sl] @ (rx[sl] + ry[sl])
            if mod.spatial_range >= 0:
                r = mod.spatial_range
                inside_y = max((y - r) // ks, 0) <= ky < (y + r + 1) // ks + 1
                inside_x = max((xx - r) // ks, 0) <= kx < (xx + r + 1) // ks + 1
                if not (inside_y and inside_x):
                    e = -math.inf
            energy[ky, kx] = e
        attn = torch.softmax(energy.flatten(), 0)
        vsl = slice(m * mod.v_dim, (m + 1) * mod.v_dim)
        out[b, vsl, y, xx] = value[b, vsl].flatten(1) @ attn
    out = conv1x1("proj_conv.weight", out) + p["proj_conv.bias"][None, :, None, None]
    if qs > 1:
        out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return p["gamma"] * out + x


@pytest.mark.parametrize("attention_type", ALL_TYPES)
def test_attention_matches_loop_reference_for_every_bit_pattern(attention_type):
    mod = GeneralizedAttention(12, num_heads=3, kv_stride=2, attention_type=attention_type)
    _randomise(mod, seed=int(attention_type, 2))
    x = torch.randn(2, 12, 5, 5, dtype=torch.float64)
    mod = mod.double()
    assert torch.allclose(mod(x), _ref_forward(mod, x, transposed=False), atol=1e-9)


@pytest.mark.parametrize("attention_type", ["0100", "0101", "1100", "1111"])
def test_transposed_query_flag_changes_only_the_0100_branch(attention_type):
    """mmcv's single-bit '0100' branch uses q(x, y) in the row term (spec §2.4, §8.1); the
    flag reproduces it there and nowhere else (bit 3 set takes mmcv's other, correct path)."""
    plain = GeneralizedAttention(12, num_heads=3, attention_type=attention_type).double()
    _randomise(plain, seed=3)
    quirk = GeneralizedAttention(
        12, num_heads=3, attention_type=attention_type, mmcv_transposed_query=True
    ).double()
    quirk.load_state_dict(plain.state_dict())
    x = torch.randn(2, 12, 6, 6, dtype=torch.float64)
    affected = attention_type[1] == "1" and attention_type[3] == "0"
    assert torch.allclose(quirk(x), _ref_forward(quirk, x, transposed=True), atol=1e-9)
    assert torch.allclose(plain(x), _ref_forward(plain, x, transposed=False), atol=1e-9)
    assert torch.allclose(quirk(x), plain(x), atol=1e-9) != affected


def test_transposed_query_energy_is_the_transposed_formula():
    """The '0100' energy itself, term by term: row term with q at (x, y) under the flag."""
    mod = GeneralizedAttention(8, num_heads=2, attention_type="0100", mmcv_transposed_query=True)
    mod = mod.double()
    _randomise(mod, seed=5)
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    xk = x[:, :, ::2, ::2]
    energy = mod.energy(x, xk)
    q = torch.einsum("oc,nchw->nohw", mod.query_conv.weight[:, :, 0, 0], x)
    d = mod.qk_embed_dim
    for m, y, xx, ky, kx in itertools.product(range(2), range(4), range(4), range(2), range(2)):
        sl = slice(m * d, (m + 1) * d)
        ex, ey = mod.position_embedding(4, 4, 2, 2, x)
        rx = mod.appr_geom_fc_x(ex[xx, kx]) / math.sqrt(2)
        ry = mod.appr_geom_fc_y(ey[y, ky]) / math.sqrt(2)
        expected = q[0, sl, y, xx] @ rx[sl] + q[0, sl, xx, y] @ ry[sl]
        assert energy[0, m, y, xx, ky, kx].item() == pytest.approx(expected.item(), abs=1e-10)


def test_transposed_query_needs_square_maps():
    mod = GeneralizedAttention(8, num_heads=2, attention_type="0100", mmcv_transposed_query=True)
    with pytest.raises(ValueError, match="square"):
        mod(torch.randn(1, 8, 4, 6))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"q_stride": 2, "kv_stride": 1},
        {"spatial_range": 1},
        {"position_magnitude": 2.0, "position_embedding_dim": 8, "kv_stride": 3},
    ],
    ids=["q_stride", "spatial_range", "magnitude"],
)
def test_attention_options_match_loop_reference(kwargs):
    mod = GeneralizedAttention(12, num_heads=3, attention_type="1111", **kwargs).double()
    _randomise(mod, seed=7)
    x = torch.randn(1, 12, 6, 5, dtype=torch.float64)
    assert torch.allclose(mod(x), _ref_forward(mod, x, transposed=False), atol=1e-9)


@pytest.mark.parametrize("attention_type", ALL_TYPES)
def test_attention_is_identity_at_init_and_trains(attention_type):
    torch.manual_seed(0)
    mod = GeneralizedAttention(16, num_heads=4, attention_type=attention_type)
    x = torch.randn(3, 16, 7, 7, requires_grad=True)
    y = mod(x)
    assert torch.equal(y, x)  # gamma starts at 0
    (y * torch.randn_like(y)).sum().backward()
    assert mod.gamma.grad is not None and mod.gamma.grad.abs().item() > 0
    with torch.no_grad():
        mod.gamma.fill_(1.0)
    mod.zero_grad()
    x.grad = None
    y = mod(x)
    (y * torch.randn_like(y)).sum().backward()
    for name, param in mod.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def test_attention_rejects_bad_settings():
    with pytest.raises(ValueError, match="attention_type"):
        GeneralizedAttention(16, attention_type="012")
    with pytest.raises(ValueError, match="multiple of 4"):
        GeneralizedAttention(18, num_heads=3)
    GeneralizedAttention(18, num_heads=3, attention_type="1010")  # no position terms
    with pytest.raises(ValueError, match="num_heads"):
        GeneralizedAttention(4, num_heads=6)


# --------------------------------------------------------------------------------------------
# The extractor
# --------------------------------------------------------------------------------------------


def _groie(size: int = 7, groie: GRoIEConfig | None = None, **kwargs) -> tuple[GRoIEConfig, int]:
    """A GRoIE config (official defaults unless given) and the size its head would ask for."""
    cfg = groie or GRoIEConfig()
    for key, value in kwargs.items():
        setattr(cfg, key, value)
    return cfg, size


def _build(cfg_and_size: tuple[GRoIEConfig, int], channels: int):
    """The extractor over a P2-P6 pyramid of ``channels`` channels."""
    cfg, size = cfg_and_size
    return build_roi_extractor(cfg, pyramid_specs(channels), size)


def test_parameter_counts_and_names_match_spec():
    """Spec §2.3: pre 1,638,656 and post 258,305 parameters, with mmdet/mmcv names."""
    extractor = _build(_groie(7), 256)
    assert isinstance(extractor, GenericRoIExtractor)
    pre = sum(p.numel() for p in extractor.pre_module.parameters())
    post = sum(p.numel() for p in extractor.post_module.parameters())
    assert (pre, post) == (1_638_656, 258_305)
    names = {k for k, _ in extractor.named_parameters()}
    assert names == {
        "pre_module.conv.weight",
        "pre_module.conv.bias",
        "post_module.query_conv.weight",
        "post_module.value_conv.weight",
        "post_module.appr_geom_fc_x.weight",
        "post_module.appr_geom_fc_y.weight",
        "post_module.proj_conv.weight",
        "post_module.proj_conv.bias",
        "post_module.gamma",
    }
    assert extractor.pre_module.conv.kernel_size == (5, 5)
    assert extractor.post_module.mmcv_transposed_query
    assert extractor.out_channels == 256


def test_all_attention_names_are_mmcvs():
    names = {k for k, _ in GeneralizedAttention(16, num_heads=4).named_parameters()}
    assert names == {
        "query_conv.weight",
        "key_conv.weight",
        "value_conv.weight",
        "appr_geom_fc_x.weight",
        "appr_geom_fc_y.weight",
        "appr_bias",
        "geom_bias",
        "proj_conv.weight",
        "proj_conv.bias",
        "gamma",
    }


def _feats(channels: int = 8, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """P2-P6 of a 64x64 image."""
    gen = torch.Generator().manual_seed(seed)
    return {
        f"p{i + 2}": torch.randn(
            batch, channels, 64 // s, 64 // s, generator=gen, dtype=torch.float64
        )
        for i, s in enumerate((4, 8, 16, 32, 64))
    }


def _rois(k: int = 5, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=gen, dtype=torch.float64) * 40
    wh = torch.rand(k, 2, generator=gen, dtype=torch.float64) * 30 + 2
    batch = torch.arange(k, dtype=torch.float64)[:, None] % 2
    return torch.cat([batch, xy, xy + wh], 1)


def _composed(extractor, feats, rois, aggregation):
    """Pool every level (RoIAlign, sampling 2), conv5x5 + ReLU each, aggregate, attend."""
    conv = extractor.pre_module.conv
    levels = []
    for feat, stride in zip(list(feats.values())[:4], (4, 8, 16, 32), strict=True):
        pooled = roi_align(feat, rois, 7, 1.0 / stride, 2, True)
        levels.append(F.relu(F.conv2d(pooled, conv.weight, conv.bias, padding=2)))
    out = sum(levels) if aggregation == "sum" else torch.cat(levels, 1)
    return extractor.post_module(out)


@pytest.mark.parametrize("aggregation", ["sum", "concat"])
def test_extractor_equals_composition_of_its_parts(aggregation):
    cfg = _groie(groie=GRoIEConfig(aggregation=aggregation))
    cfg[0].attention.num_heads = 2
    extractor = _build(cfg, 8).double()
    _randomise(extractor, seed=2)
    feats, rois = _feats(), _rois()
    out = extractor(feats, rois)
    width = 8 if aggregation == "sum" else 32
    assert extractor.out_channels == width
    assert out.shape == (5, width, 7, 7)
    assert torch.allclose(out, _composed(extractor, feats, rois, aggregation), atol=1e-10)


def test_concat_puts_each_level_in_its_own_slot():
    cfg = _groie(groie=GRoIEConfig(aggregation="concat", post="none"))
    extractor = _build(cfg, 8).double()
    feats, rois = _feats(), _rois()
    out = extractor(feats, rois)
    for level, stride in enumerate((4, 8, 16, 32)):
        pooled = roi_align(feats[f"p{level + 2}"], rois, 7, 1.0 / stride, 2, True)
        expected = extractor.pre_module(pooled)
        assert torch.allclose(out[:, 8 * level : 8 * (level + 1)], expected, atol=1e-12)


def test_concat_needs_a_width_keeping_pre_module():
    cfg = _groie(groie=GRoIEConfig(aggregation="concat", pre_conv=ConvModuleConfig(16, 5)))
    with pytest.raises(ValueError, match=r"pre_conv\.out_channels"):
        _build(cfg, 8)


def test_sum_with_a_widening_pre_module_reports_its_width():
    cfg = _groie(groie=GRoIEConfig(pre_conv=ConvModuleConfig(16, 5), post="none"))
    extractor = _build(cfg, 8).double()
    assert extractor.out_channels == 16
    assert extractor(_feats(seed=3), _rois()).shape == (5, 16, 7, 7)


def test_single_level_is_only_pooled_and_empty_rois_give_zeros():
    cfg = _groie(14, levels=("p3",))
    extractor = _build(cfg, 8).double()
    _randomise(extractor)
    feats, rois = _feats(), _rois()
    expected = roi_align(feats["p3"], rois, 14, 1 / 8, 2, True)
    assert torch.equal(extractor(feats, rois), expected)
    full = _build(_groie(14), 8).double()
    empty = full(feats, rois[:0])
    assert empty.shape == (0, 8, 14, 14)


def test_roi_scale_factor_pools_the_enlarged_rois():
    extractor = _build(_groie(7), 8).double()
    _randomise(extractor, seed=4)
    feats, rois = _feats(), _rois()
    cx, cy = (rois[:, 1] + rois[:, 3]) / 2, (rois[:, 2] + rois[:, 4]) / 2
    w, h = rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2]
    big = torch.stack([rois[:, 0], cx - 0.75 * w, cy - 0.75 * h, cx + 0.75 * w, cy + 0.75 * h], 1)
    assert torch.allclose(extractor(feats, rois, 1.5), extractor(feats, big), atol=1e-12)


def test_prroi_pool_op_and_non_local_post_module_run():
    cfg = _groie(groie=GRoIEConfig(post="non_local"), op="prroi_pool")
    extractor = _build(cfg, 8)
    feats = {k: f.float().requires_grad_() for k, f in _feats().items()}
    out = extractor(feats, _rois().float())
    out.sum().backward()
    assert out.shape == (5, 8, 7, 7) and feats["p2"].grad is not None


def test_pre_module_is_a_bias_relu_conv_without_inplace():
    pre = _build(_groie(), 8).pre_module
    assert isinstance(pre, ConvModule) and pre.norm is None and pre.conv.bias is not None
    assert isinstance(pre.activate, torch.nn.ReLU) and not pre.activate.inplace


def test_roi_head_extractors_own_their_modules_and_set_head_widths():
    cfg = RoIHeadConfig(box_extractor=GRoIEConfig(), mask_extractor=GRoIEConfig())
    cfg.box_head.fc_channels = 16
    cfg.box_extractor.attention.num_heads = 2
    cfg.mask_extractor.attention.num_heads = 2
    head = StandardRoIHead(cfg, pyramid_specs(8), num_classes=3)
    box_ids = {id(p) for p in head.bbox_roi_extractor.parameters()}
    mask_ids = {id(p) for p in head.mask_roi_extractor.parameters()}
    assert box_ids and mask_ids and not box_ids & mask_ids
    # Each extractor pools at its head's size; the heads take the extractors' widths.
    assert (head.bbox_roi_extractor.output_size, head.mask_roi_extractor.output_size) == (7, 14)
    assert head.mask_head.convs[0].conv.in_channels == 8
    cfg.box_extractor.aggregation = "concat"  # 4 levels x 8 channels
    head = StandardRoIHead(cfg, pyramid_specs(8), num_classes=3)
    assert head.bbox_head.shared_fcs[0].in_features == 4 * 8 * 7 * 7


@pytest.mark.parametrize("attention_type", ["0100", "0001", "0101", "0000"])
@pytest.mark.parametrize("spatial_range", [-1, 1])
def test_separable_attention_equals_softmax_of_full_energy(attention_type, spatial_range):
    mod = GeneralizedAttention(
        12, num_heads=3, attention_type=attention_type, spatial_range=spatial_range
    ).double()
    _randomise(mod, seed=11)
    x = torch.randn(2, 12, 7, 7, dtype=torch.float64)
    xk = x[:, :, ::2, ::2]
    full = torch.softmax(mod.energy(x, xk).flatten(-2), -1).unflatten(-1, (4, 4))
    separable = mod._separable_attention(x, 4, 4)
    assert torch.allclose(separable.expand_as(full), full, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The configs of the GRoIE table
# --------------------------------------------------------------------------------------------

GROIE_TABLE = [
    "faster_rcnn_r50_fpn_groie_1x_coco",
    "mask_rcnn_r50_fpn_groie_1x_coco",
    "mask_rcnn_r50_fpn_syncbn-backbone_r4_gcb_c3-c5_1x_coco",
    "mask_rcnn_r50_fpn_syncbn-backbone_r4_gcb_c3-c5_groie_1x_coco",
    "mask_rcnn_r101_fpn_syncbn-backbone_r4_gcb_c3-c5_1x_coco",
    "mask_rcnn_r101_fpn_syncbn-backbone_r4_gcb_c3-c5_groie_1x_coco",
    "mask_rcnn_r18_fpn_groie_small",
]


@pytest.mark.parametrize("name", GROIE_TABLE)
def test_groie_table_config_builds_trains_and_predicts(name):
    cfg = apply_overrides(get_config(name), [*NARROW, "model.roi_head.score_thr=0.0"])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=3)
    keys = set(model.state_dict())
    groie, gcnet = "groie" in name, "gcb" in name
    assert ("roi_head.bbox_roi_extractor.pre_module.conv.weight" in keys) == groie
    assert ("roi_head.bbox_roi_extractor.post_module.query_conv.weight" in keys) == groie
    assert ("roi_head.mask_roi_extractor.post_module.gamma" in keys) == (
        groie and name.startswith("mask")
    )
    assert ("backbone.layer2.0.context_block.conv_mask.weight" in keys) == gcnet
    assert "backbone.layer1.0.context_block.conv_mask.weight" not in keys
    if gcnet:
        assert isinstance(model.backbone.bn1, SyncBatchNorm2d)

    images, targets = toy_batch()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    for _ in range(2):
        losses = model(images, targets)
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    if groie:  # the attention left its identity start
        assert model.roi_head.bbox_roi_extractor.post_module.gamma.item() != 0.0
    model.eval()
    results = model.predict(images)
    for result, (h, w) in zip(results, images.image_sizes, strict=True):
        assert len(result) > 0
        assert (result.boxes[:, 2:] <= torch.tensor([w, h]) + 1e-4).all()
        assert set(result.labels.tolist()) <= {0, 1, 2}
        if name.startswith("mask"):
            assert result.masks.shape == (len(result), h, w)
        else:
            assert result.masks is None
