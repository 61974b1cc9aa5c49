"""IFR (spec §5) against independent references: plain fixed-point iteration, finite
differences, the explicit iteration unrolled to convergence, and the weight-norm formula."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from instseg.modeling.roi.ifr import (
    IFRMaskHead,
    IFRMaskHeadConfig,
    ResidualBlock,
    WeightNormConv3x3,
    broyden,
)
from instseg.structures import TrainingContext

CHANNELS, SIZE = 8, 5


def _contractive_block(seed: int = 0) -> ResidualBlock:
    """A float64 block whose map z -> f(z; x) is a contraction: small conv weights and GN
    affine terms keep the Lipschitz constant well below 1."""
    torch.manual_seed(seed)
    block = ResidualBlock(CHANNELS, num_groups=2, weight_norm=True).double()
    with torch.no_grad():
        for conv in (block.conv1, block.conv2):
            conv.weight_v.normal_()
            conv.weight_g.uniform_(0.05, 0.15)
        for gn in (block.gn1, block.gn2, block.gn3):
            gn.weight.uniform_(0.05, 0.15)
            gn.bias.normal_(0, 0.1)
    return block


def _fixed_point_by_iteration(block: ResidualBlock, x: torch.Tensor, steps: int = 400):
    weights = block.weights()
    z = torch.zeros_like(x)
    for _ in range(steps):
        z = block(z, x, weights)
    return z


def test_weight_norm_effective_weight_is_g_v_over_norm_per_output_channel():
    torch.manual_seed(0)
    conv = WeightNormConv3x3(6).double()
    with torch.no_grad():
        conv.weight_g.uniform_(0.5, 2.0)
        conv.weight_v.normal_()
    w = conv.effective_weight()
    v, g = conv.weight_v.detach(), conv.weight_g.detach()
    for o in range(6):
        norm = math.sqrt(sum(float(t) ** 2 for t in v[o].flatten()))
        torch.testing.assert_close(w[o], v[o] * float(g[o, 0, 0, 0]) / norm, rtol=1e-12, atol=0)
    # Initialised so that the effective weight is the default conv init itself.
    fresh = WeightNormConv3x3(6)
    torch.testing.assert_close(fresh.effective_weight(), fresh.weight_v, rtol=1e-6, atol=1e-7)


def test_block_formula():
    """u = z + x; h = ReLU(GN1(conv1 u)); h = GN2(conv2 h); out = GN3(ReLU(h + u))."""
    block = _contractive_block()
    torch.manual_seed(1)
    z, x = torch.randn(2, 2, CHANNELS, SIZE, SIZE, dtype=torch.float64)
    w1, w2 = (c.effective_weight() for c in (block.conv1, block.conv2))
    u = z + x
    h = F.relu(block.gn1(F.conv2d(u, w1, padding=1)))
    h = block.gn2(F.conv2d(h, w2, padding=1))
    expected = block.gn3(F.relu(h + u))
    torch.testing.assert_close(block(z, x, block.weights()), expected, rtol=0, atol=0)


def test_broyden_reaches_the_fixed_point_of_a_contractive_block():
    block = _contractive_block()
    torch.manual_seed(2)
    x = torch.randn(3, CHANNELS, SIZE, SIZE, dtype=torch.float64)
    weights = tuple(w.detach() for w in block.weights())
    tol = 1e-10 * math.sqrt(x.numel())
    z, stats = broyden(lambda z: block(z, x, weights) - z, torch.zeros_like(x), 50, tol)
    residual = (block(z, x, weights) - z).norm()
    assert residual < tol
    assert stats.residual == pytest.approx(float(residual), rel=1e-6)
    assert stats.steps < 50
    torch.testing.assert_close(z, _fixed_point_by_iteration(block, x), rtol=0, atol=1e-9)


def test_broyden_first_step_and_lowest_iterate():
    """With the official first step the first iterate is z0 - g(z0); with +g it is
    z0 + g(z0) = f(z0). The returned iterate is the lowest-residual one, z0 included."""
    torch.manual_seed(3)
    a = torch.randn(2, 4, dtype=torch.float64)
    calls: list[torch.Tensor] = []

    def g(z):
        calls.append(z.clone())
        return a - z  # fixed point of f(z) = a

    broyden(g, torch.zeros(2, 4, dtype=torch.float64), 1, 0.0, official_first_step=True)
    torch.testing.assert_close(calls[1], -a)
    calls.clear()
    z, _ = broyden(g, torch.zeros(2, 4, dtype=torch.float64), 1, 0.0, official_first_step=False)
    torch.testing.assert_close(calls[1], a)
    torch.testing.assert_close(z, a)  # the +g step lands on the root: residual 0 < |a|
    # -g lands at -a (residual 2|a| > |a|): z0 = 0 is returned.
    z, stats = broyden(g, torch.zeros(2, 4, dtype=torch.float64), 1, 0.0)
    torch.testing.assert_close(z, torch.zeros(2, 4, dtype=torch.float64))
    assert stats.steps == 1 and stats.residual == pytest.approx(float(a.norm()))


def test_broyden_step_cap_and_tolerance():
    block = _contractive_block()
    x = torch.randn(2, CHANNELS, SIZE, SIZE, dtype=torch.float64)
    weights = tuple(w.detach() for w in block.weights())
    evaluations = []

    def g(z):
        evaluations.append(1)
        return block(z, x, weights) - z

    _, stats = broyden(g, torch.zeros_like(x), 15, 0.0)
    assert stats.steps == 15 and len(evaluations) == 16
    evaluations.clear()
    _, stats = broyden(g, torch.zeros_like(x), 15, 1e9)
    assert stats.steps == 0 and len(evaluations) == 1


def _head(mode: str = "implicit", pretrain_steps: int = 2) -> IFRMaskHead:
    cfg = IFRMaskHeadConfig(
        mode=mode,
        num_groups=2,
        pretrain_steps=pretrain_steps,
        forward_max_steps=60,
        backward_max_steps=60,
        forward_tol=1e-12,
        backward_tol=1e-12,
    )
    head = IFRMaskHead(cfg, CHANNELS, num_classes=3).double()
    contractive = _contractive_block()
    if mode == "implicit":
        head.repeat_block.load_state_dict(contractive.state_dict())
    return head


def test_implicit_gradient_equals_finite_differences_and_the_unrolled_gradient():
    """d loss / d (params, x) through the equilibrium: the implicit backward against central
    finite differences of the converged solve, and against backprop through the explicit
    iteration unrolled to convergence."""
    head = _head()
    block = head.repeat_block
    torch.manual_seed(4)
    x = torch.randn(2, CHANNELS, SIZE, SIZE, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, CHANNELS, SIZE, SIZE, dtype=torch.float64)

    def loss_of(z):
        return (z * probe).sum() + (z**2).sum() * 0.1

    z = head.refine(x, train_step=10)  # implicit phase
    assert head.last_solve is not None and head.last_solve.residual < 1e-10
    params = [block.conv1.weight_g, block.conv2.weight_v, block.gn3.weight, block.gn1.bias]
    grads = torch.autograd.grad(loss_of(z), [x, *params])
    assert head.last_backward is not None and head.last_backward.residual < 1e-10

    # Unrolled to convergence with ordinary backprop.
    weights = block.weights()
    zu = torch.zeros_like(x)
    for _ in range(300):
        zu = block(zu, x, weights)
    unrolled = torch.autograd.grad(loss_of(zu), [x, *params])
    for got, want in zip(grads, unrolled, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)

    # Central finite differences of the converged (test-time) solve, a few coordinates each.
    def solved_loss() -> float:
        with torch.no_grad():
            return float(loss_of(head.refine(x, train_step=None)))

    eps = 1e-6
    for tensor, grad in zip([x, *params], grads, strict=True):
        flat = tensor.data.view(-1)
        for index in torch.randperm(flat.numel())[:3].tolist():
            keep = float(flat[index])
            flat[index] = keep + eps
            up = solved_loss()
            flat[index] = keep - eps
            down = solved_loss()
            flat[index] = keep
            numeric = (up - down) / (2 * eps)
            assert numeric == pytest.approx(float(grad.view(-1)[index]), rel=1e-5, abs=1e-8)


def test_training_output_is_f_of_the_solution_and_test_output_the_solution():
    head = _head()
    x = torch.randn(2, CHANNELS, SIZE, SIZE, dtype=torch.float64)
    z_test = head.refine(x, train_step=None)
    z_train = head.refine(x, train_step=5)
    weights = head.repeat_block.weights()
    torch.testing.assert_close(z_train, head.repeat_block(z_test, x, weights), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["implicit", "weight_sharing"])
def test_phases(mode):
    """Implicit: explicit unrolling (4 weight-tied steps) before pretrain_steps, the solve
    from it on and at test. Weight sharing: always the explicit unrolling."""
    head = _head(mode, pretrain_steps=3)
    x = torch.randn(2, CHANNELS, SIZE, SIZE, dtype=torch.float64)
    weights = head.repeat_block.weights()
    unrolled = torch.zeros_like(x)
    for _ in range(4):
        unrolled = head.repeat_block(unrolled, x, weights)
    for step in (0, 2, 3, 100, None):
        z = head.refine(x, step)
        explicit = mode == "weight_sharing" or (step is not None and step < 3)
        assert (head.last_solve is None) == explicit, step
        if explicit:
            torch.testing.assert_close(z, unrolled, rtol=0, atol=0)
    if mode == "weight_sharing":
        names = {n for n, _ in head.named_parameters()}
        assert "repeat_block.conv1.weight" in names and "repeat_block.conv1.weight_g" not in names


def test_parameter_names_and_count_at_full_width():
    """§5.2: trainable block 2 x 589,824 (v) + 2 x 256 (g) + 3 x 512 (GN) = 1,181,696."""
    head = IFRMaskHead(IFRMaskHeadConfig(), 256, 80)
    block = sum(p.numel() for p in head.repeat_block.parameters())
    assert block == 1_181_696
    names = {n for n, _ in head.state_dict().items()}
    assert {
        "repeat_block.conv1.weight_g",
        "repeat_block.conv1.weight_v",
        "repeat_block.gn3.bias",
        "deconv.weight",
        "predictor.weight",
    } <= names


def test_loss_logs_solver_stats_only_in_the_implicit_phase():
    from instseg.modeling.roi.sampling import SampledRoIs
    from instseg.structures import InstanceTargets

    head = _head(pretrain_steps=1).float()
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, 8:20, 6:24] = True
    target = InstanceTargets(
        boxes=torch.tensor([[6.0, 8.0, 24.0, 20.0]]), labels=torch.tensor([1]), masks=masks
    )
    boxes = torch.tensor([[5.0, 7.0, 25.0, 21.0], [6.0, 6.0, 22.0, 22.0]])
    sampled = SampledRoIs(
        boxes=[boxes],
        labels=torch.tensor([1, 1]),
        num_classes=3,
        pos_boxes=[boxes],
        pos_gt_index=[torch.tensor([0, 0])],
        pos_gt_boxes=[target.boxes[[0, 0]]],
    )
    feats = torch.randn(2, CHANNELS, 14, 14)

    def extractor(_feats, rois):
        return feats

    early = head.loss({}, extractor, sampled, [target], TrainingContext(0, 10))
    assert set(early) == {"loss_mask"}
    late = head.loss({}, extractor, sampled, [target], TrainingContext(1, 10))
    assert {"loss_mask", "ifr_forward_steps", "ifr_forward_residual"} == set(late)
    late["loss_mask"].backward()
    assert head.repeat_block.conv1.weight_v.grad is not None


def test_broyden_iterates_equal_a_dense_inverse_jacobian_reference():
    """The official update as dense matrices per row: B0 = -I, first step -g (official)
    or +g, B += (dx - B dg) dx^T B / (dx^T B dg), next step -B g; iterate for iterate."""
    torch.manual_seed(5)
    n, d = 3, 12
    a = torch.randn(n, d, d, dtype=torch.float64) * 0.3
    c = torch.randn(n, d, dtype=torch.float64)

    def g(z):
        return torch.tanh(torch.einsum("nij,nj->ni", a, z)) + c - z

    for official in (True, False):
        seen: list[torch.Tensor] = []

        def recording_g(z, seen=seen):
            seen.append(z.clone())
            return g(z)

        broyden(recording_g, torch.zeros(n, d, dtype=torch.float64), 8, 0.0, official)
        z = torch.zeros(n, d, dtype=torch.float64)
        inv = -torch.eye(d, dtype=torch.float64).repeat(n, 1, 1)
        gz = g(z)
        update = -gz if official else gz
        expected = [z.clone()]
        for _ in range(8):
            z_new = z + update
            g_new = g(z_new)
            dx, dg = z_new - z, g_new - gz
            z, gz = z_new, g_new
            expected.append(z.clone())
            b_dg = torch.einsum("nij,nj->ni", inv, dg)
            dx_b = torch.einsum("ni,nij->nj", dx, inv)
            denom = (dx_b * dg).sum(1)
            inv = inv + torch.einsum("ni,nj->nij", dx - b_dg, dx_b) / denom[:, None, None]
            update = -torch.einsum("nij,nj->ni", inv, gz)
        assert len(seen) == len(expected)
        for got, want in zip(seen, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_phase_switch_at_pretrain_steps_through_the_trainer_and_across_resume(
    tmp_path, monkeypatch
):
    """A real run (pretrain_steps=2): iterations 0 and 1 unroll, 2 and 3 solve; a crash at
    iteration 2 and ``--resume`` from the checkpoint of iteration 2 switch at the same place."""
    from instseg.configs import apply_overrides, get_config
    from instseg.runner import run_train
    from test_training import COMMON, NARROW, _shapes

    ann, images = _shapes(tmp_path / "data")
    cfg = apply_overrides(
        get_config("mask_rcnn_r18_fpn_ifr_small"),
        [
            *NARROW,
            *COMMON,
            "train.max_iters=4",
            "train.checkpoint_every=1",
            "model.roi_head.mask_head.pretrain_steps=2",
        ],
    )
    cfg.num_classes = None
    cfg.data.train_ann, cfg.data.train_images = str(ann), str(images)
    calls: list[tuple[int | None, bool]] = []
    refine = IFRMaskHead.refine

    def recording(self, x, train_step):
        if train_step == 2 and crash[0]:
            raise RuntimeError("simulated crash")
        z = refine(self, x, train_step)
        calls.append((train_step, self.last_solve is not None))
        return z

    crash = [True]
    monkeypatch.setattr(IFRMaskHead, "refine", recording)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(cfg, tmp_path / "work")
    assert calls == [(0, False), (1, False)]
    calls.clear()
    crash[0] = False
    run_train(cfg, tmp_path / "work", resume=True)
    assert [c for c in calls if c[0] is not None] == [(2, True), (3, True)]
    log = [json.loads(x) for x in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert [("ifr_forward_steps" in r) for r in log] == [False, False, True, True]
    assert all(r["ifr_forward_steps"] <= 15 for r in log[2:])
