"""IFR, implicit feature refinement (Ma et al., ACM MM 2021; official ``lufanma/IFR``).

Spec §5. The 4 stacked convs of the Mask R-CNN mask head become one residual block
``f(z; x)`` (§5.2) solved to its fixed point ``z* = f(z*; x)`` per RoI, a deep equilibrium
model:

- forward: Broyden's method from ``z0 = 0`` (§5.3), at most 15 steps, the iterate with the
  lowest global residual returned; the first step is ``-g(z0)`` as in the official code
  (``official_first_step=False``: ``+g``, the plain fixed-point step later DEQ code takes);
- backward: exact implicit differentiation (§5.4): one differentiable application
  ``z1 = f(z*; x)``, whose incoming gradient ``v`` is replaced by the solution ``w`` of
  ``w (I - J) = v`` with ``J = df/dz`` at ``z1``, solved by the same Broyden routine with
  vector-Jacobian products;
- phases (§5.5): for the first ``pretrain_steps`` training iterations the block is unrolled
  ``unroll_steps`` times (weight-tied, ordinary backprop); from then on, and always at test,
  the equilibrium solve. In training the head consumes ``f(z*)``, at test ``z*`` itself.

``mode="weight_sharing"`` is the explicit variant of §5.6: the same block without weight
normalisation, unrolled ``unroll_steps`` times in training and test.

The head's tail is Mask R-CNN's (2x deconv + ReLU, 1x1 per-class logits, per-pixel BCE on
the GT class) with detectron2's initialisation. Parameter names follow the official
module (``repeat_block.conv1.weight_g`` ...; the official frozen copy is not needed: the
vector-Jacobian products here differentiate with respect to the state only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...structures import InstanceTargets, TrainingContext
from ..features import Features, FeatureSpec
from .heads import mask_bce_loss, select_class
from .sampling import SampledRoIs, boxes_to_rois

IFR_MODES = ("implicit", "weight_sharing")


@dataclass
class IFRMaskHeadConfig:
    """The IFR mask head (``kind="ifr"``), defaults from the official configs (§5.2-§5.5,
    §5.8). ``mode``: "implicit" (the DEQ head) or "weight_sharing" (§5.6).

    ``pretrain_steps``: training iterations of the explicit phase (official 50,000);
    ``unroll_steps``: its depth and the weight-sharing variant's (``NUM_CONV = 4``);
    ``forward_max_steps`` / ``backward_max_steps``: Broyden step caps (``F_THRES``; the
    official backward also uses ``F_THRES``); ``forward_tol`` / ``backward_tol``: the stop
    test ``||g|| < tol * sqrt(numel)`` on the whole batch's residual; ``num_groups``: the
    block's GroupNorm groups; ``conv_channels``: the deconv's width (None: the RoI feature
    width); ``official_first_step``: start Broyden with ``-g(z0)`` as the official solver.
    """

    kind: Literal["ifr"] = "ifr"
    mode: str = "implicit"
    roi_size: int = 14
    conv_channels: int | None = None
    num_groups: int = 4
    unroll_steps: int = 4
    pretrain_steps: int = 50_000
    forward_max_steps: int = 15
    backward_max_steps: int = 15
    forward_tol: float = 1e-5
    backward_tol: float = 2e-10
    official_first_step: bool = True
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        key = "roi_head.mask_head"
        if self.mode not in IFR_MODES:
            raise ValueError(f"{key}.mode must be one of {IFR_MODES}, got {self.mode!r}")
        for name in ("roi_size", "num_groups", "unroll_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{key}.{name} must be positive, got {getattr(self, name)}")
        for name in ("pretrain_steps", "forward_max_steps", "backward_max_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{key}.{name} must be >= 0, got {getattr(self, name)}")
        if self.forward_tol < 0 or self.backward_tol < 0:
            raise ValueError(f"{key}: the tolerances must be >= 0")
        if self.conv_channels is not None and self.conv_channels <= 0:
            raise ValueError(f"{key}.conv_channels must be positive, got {self.conv_channels}")

    def build(self, in_channels: int, in_specs: list[FeatureSpec], num_classes: int) -> IFRMaskHead:
        return IFRMaskHead(self, in_channels, num_classes)


# ------------------------------------------------------------------ the block (§5.2)


class WeightNormConv3x3(nn.Module):
    """A bias-free 3x3 conv parametrised as ``W = v * (g / ||v||)``, the norm per output
    channel (``weight_norm(dim=0)``); ``g`` starts at the norm of the initial weight, ``v``
    at the weight (PyTorch's default conv init), so the initial W is that weight."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        weight = nn.Conv2d(channels, channels, 3, padding=1, bias=False).weight.detach()
        self.weight_g = nn.Parameter(_channel_norm(weight))
        self.weight_v = nn.Parameter(weight.clone())

    def effective_weight(self) -> Tensor:
        return self.weight_v * (self.weight_g / _channel_norm(self.weight_v))


def _channel_norm(weight: Tensor) -> Tensor:
    return weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


class ResidualBlock(nn.Module):
    """``f(z; x)``: ``u = z + x``; ``h = ReLU(GN1(conv1(u)))``; ``h = GN2(conv2(h))``;
    ``out = GN3(ReLU(h + u))``. Convs 3x3 without bias, weight-normalised unless
    ``weight_norm=False`` (the weight-sharing variant)."""

    def __init__(self, channels: int, num_groups: int, weight_norm: bool) -> None:
        super().__init__()
        if channels % num_groups:
            raise ValueError(
                f"roi_head.mask_head.num_groups ({num_groups}) must divide the RoI feature "
                f"width ({channels})"
            )
        conv: Callable[[], nn.Module] = (
            (lambda: WeightNormConv3x3(channels))
            if weight_norm
            else (lambda: nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        )
        self.conv1 = conv()
        self.gn1 = nn.GroupNorm(num_groups, channels)
        self.conv2 = conv()
        self.gn2 = nn.GroupNorm(num_groups, channels)
        self.gn3 = nn.GroupNorm(num_groups, channels)

    def weights(self) -> BlockWeights:
        """The effective conv weights (computed once per head forward, as the official
        ``_reset``) and the GroupNorm affine terms."""
        convs = tuple(
            c.effective_weight() if isinstance(c, WeightNormConv3x3) else c.weight
            for c in (self.conv1, self.conv2)
        )
        norms = tuple(t for gn in (self.gn1, self.gn2, self.gn3) for t in (gn.weight, gn.bias))
        return convs + norms  # type: ignore[return-value]

    def forward(self, z: Tensor, x: Tensor, weights: BlockWeights) -> Tensor:
        conv1, conv2, gn1_w, gn1_b, gn2_w, gn2_b, gn3_w, gn3_b = weights
        groups, eps = self.gn1.num_groups, self.gn1.eps
        u = z + x
        h = F.relu(F.group_norm(F.conv2d(u, conv1, padding=1), groups, gn1_w, gn1_b, eps))
        h = F.group_norm(F.conv2d(h, conv2, padding=1), groups, gn2_w, gn2_b, eps)
        return F.group_norm(F.relu(h + u), groups, gn3_w, gn3_b, eps)


BlockWeights = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
"""conv1, conv2 weights, then (weight, bias) of gn1, gn2, gn3."""


# --------------------------------------------------------- Broyden's method (§5.3)


@dataclass
class SolverStats:
    """What one solve did: Broyden steps taken and the returned iterate's residual norm."""

    steps: int
    residual: float


@dataclass
class Solver:
    """Settings of one kind of solve (forward or backward) and the stats of its latest:
    at most ``max_steps`` Broyden steps, stop below ``tol * sqrt(numel)`` (the whole batch's
    residual), the official ``-g`` first step unless ``official_first_step`` is false."""

    max_steps: int
    tol: float
    official_first_step: bool
    last: SolverStats | None = None

    def solve(self, g: Callable[[Tensor], Tensor], z0: Tensor) -> Tensor:
        tol = self.tol * math.sqrt(z0.numel())
        z, self.last = broyden(g, z0, self.max_steps, tol, self.official_first_step)
        return z


def broyden(
    g: Callable[[Tensor], Tensor],
    z0: Tensor,
    max_steps: int,
    tol: float,
    official_first_step: bool = True,
) -> tuple[Tensor, SolverStats]:
    """A root of ``g`` near ``z0`` by limited-memory Broyden without line search (§5.3).

    Each of the N rows (RoIs) of ``z0`` keeps its own inverse-Jacobian estimate ``B = -I +
    U V^T`` (``min(max_steps, 27)`` rank-one slots); the stop test and the returned
    iterate (the lowest residual seen, ``z0`` included) use the norm of the whole batch's
    residual. ``tol`` is absolute. Runs without autograd.
    """
    with torch.no_grad():
        shape = z0.shape
        n = shape[0]
        x = z0.reshape(n, -1)
        gx = g(x.view(shape)).reshape(n, -1)
        slots = min(max_steps, 27)
        us = x.new_zeros((n, slots, x.shape[1]))
        vts = x.new_zeros((n, slots, x.shape[1]))
        init = lowest = float(gx.norm())
        lowest_x = x
        update = -gx if official_first_step else gx
        residual, steps = init, 0
        while residual >= tol and steps < max_steps:
            x = x + update
            g_new = g(x.view(shape)).reshape(n, -1)
            delta_x, delta_g, gx = update, g_new - gx, g_new
            steps += 1
            residual = float(gx.norm())
            if residual < lowest:
                lowest, lowest_x = residual, x
            if residual < tol or residual > init * 1e6 or not math.isfinite(residual):
                break
            used = steps - 1
            vt = _rmatvec(us[:, :used], vts[:, :used], delta_x)
            u = (delta_x - _matvec(us[:, :used], vts[:, :used], delta_g)) / (vt * delta_g).sum(
                1, keepdim=True
            )
            slot = used % slots
            vts[:, slot] = torch.nan_to_num(vt, nan=0.0, posinf=torch.inf, neginf=-torch.inf)
            us[:, slot] = torch.nan_to_num(u, nan=0.0, posinf=torch.inf, neginf=-torch.inf)
            filled = min(steps, slots)
            update = -_matvec(us[:, :filled], vts[:, :filled], gx)
        return lowest_x.view(shape), SolverStats(steps, lowest)


def _matvec(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    """``(-I + U V^T) x`` per row; ``us``/``vts`` are ``(N, k, D)``, ``x`` is ``(N, D)``."""
    if us.shape[1] == 0:
        return -x
    return -x + torch.bmm((torch.bmm(vts, x[:, :, None])).transpose(1, 2), us)[:, 0]


def _rmatvec(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    """``x^T (-I + U V^T)`` per row."""
    if us.shape[1] == 0:
        return -x
    return -x + torch.bmm(torch.bmm(us, x[:, :, None]).transpose(1, 2), vts)[:, 0]


# ------------------------------------------------------- implicit backward (§5.4)


class _ImplicitGradient(torch.autograd.Function):
    """Identity on ``z1 = f(z*)`` whose backward turns the incoming gradient ``v`` into the
    ``w`` with ``w (I - J) = v``, ``J = df/dz`` at ``z1``: solved by Broyden on ``G(w) =
    w (J - I) + v`` from ``w = 0`` with vector-Jacobian products of ``f`` at ``z1``."""

    @staticmethod
    def forward(ctx: Any, z1: Tensor, step: Callable[[Tensor], Tensor], solver: Solver) -> Tensor:
        ctx.save_for_backward(z1)
        ctx.step, ctx.solver = step, solver
        return z1.view_as(z1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (z1,) = ctx.saved_tensors
        with torch.enable_grad():
            z = z1.detach().requires_grad_()
            residual = ctx.step(z) - z

        def vjp_residual(w: Tensor) -> Tensor:
            (vjp,) = torch.autograd.grad(residual, z, w, retain_graph=True)
            return vjp + grad

        return ctx.solver.solve(vjp_residual, torch.zeros_like(grad)), None, None


def equilibrium(
    step: Callable[[Tensor], Tensor],
    step_detached: Callable[[Tensor], Tensor],
    z0: Tensor,
    forward_solver: Solver,
    backward_solver: Solver,
    training: bool,
) -> Tensor:
    """The fixed point of ``step`` from ``z0``; in training ``step(z*)`` with the implicit
    gradient, else ``z*``. ``step_detached`` is ``step`` with its parameters and input
    detached (what the solvers differentiate through)."""
    z_star = forward_solver.solve(lambda z: step_detached(z) - z, z0)
    if not training or not torch.is_grad_enabled():
        return z_star
    return _ImplicitGradient.apply(step(z_star), step_detached, backward_solver)


# ------------------------------------------------------------------- the head


class IFRMaskHead(nn.Module):
    """Refined RoI features -> 2x deconv + ReLU -> per-class 1x1 logits (28x28 from 14x14).

    ``last_solve`` holds the stats of the latest forward solve (None after an explicit
    forward); ``last_backward`` those of the latest implicit backward.
    """

    def __init__(self, cfg: IFRMaskHeadConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.conv_channels or in_channels
        self.repeat_block = ResidualBlock(in_channels, cfg.num_groups, cfg.mode == "implicit")
        self.deconv = nn.ConvTranspose2d(in_channels, width, 2, stride=2)
        self.predictor = nn.Conv2d(width, num_classes, 1)
        nn.init.kaiming_normal_(self.deconv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.deconv.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)
        first_step = cfg.official_first_step
        self.forward_solver = Solver(cfg.forward_max_steps, cfg.forward_tol, first_step)
        self.backward_solver = Solver(cfg.backward_max_steps, cfg.backward_tol, first_step)

    @property
    def last_solve(self) -> SolverStats | None:
        return self.forward_solver.last

    @property
    def last_backward(self) -> SolverStats | None:
        return self.backward_solver.last

    def uses_equilibrium(self, train_step: int | None) -> bool:
        """Whether a forward at ``train_step`` (None: not training) solves for the fixed
        point: the implicit mode at test and from iteration ``pretrain_steps`` on."""
        if self.cfg.mode != "implicit":
            return False
        return train_step is None or train_step >= self.cfg.pretrain_steps

    def refine(self, x: Tensor, train_step: int | None) -> Tensor:
        """The refined features ``z`` of RoI features ``x`` (§5.5's phases)."""
        cfg = self.cfg
        block = self.repeat_block
        weights = block.weights()
        z = torch.zeros_like(x)
        self.forward_solver.last = self.backward_solver.last = None
        if not self.uses_equilibrium(train_step):
            for _ in range(cfg.unroll_steps):
                z = block(z, x, weights)
            return z
        x_detached = x.detach()
        weights_detached = tuple(w.detach() for w in weights)

        def step_detached(state: Tensor) -> Tensor:
            return block(state, x_detached, weights_detached)

        return equilibrium(
            lambda state: block(state, x, weights),
            step_detached,
            z,
            self.forward_solver,
            self.backward_solver,
            training=train_step is not None,
        )

    def forward(self, x: Tensor, train_step: int | None = None) -> Tensor:
        z = self.refine(x, train_step)
        return self.predictor(F.relu(self.deconv(z)))

    def loss(
        self,
        feats: Features,
        extractor: nn.Module,
        sampled: SampledRoIs,
        targets: list[InstanceTargets],
        context: TrainingContext | None = None,
    ) -> dict[str, Tensor]:
        """Mask R-CNN's BCE on the positives; the phase comes from ``context.iteration``
        (no context: the equilibrium phase). Logs the forward solve's steps and residual."""
        train_step = context.iteration if context is not None else self.cfg.pretrain_steps
        rois = boxes_to_rois(sampled.pos_boxes)
        logits = self(extractor(feats, rois), train_step)
        losses = {"loss_mask": self.cfg.loss_weight * mask_bce_loss(logits, sampled, targets)}
        if self.last_solve is not None:
            losses["ifr_forward_steps"] = torch.tensor(float(self.last_solve.steps))
            losses["ifr_forward_residual"] = torch.tensor(self.last_solve.residual)
        return losses

    def predict_probs(
        self, feats: Features, extractor: nn.Module, rois: Tensor, labels: Tensor
    ) -> Tensor:
        logits = self(extractor(feats, rois), None)
        return select_class(logits, labels).sigmoid()
