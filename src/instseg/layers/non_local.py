"""Non-local block (Wang et al., "Non-local Neural Networks"), as mmcv's ``NonLocal2d`` (spec §2.5).

Every output position adds a weighted sum over all (or, with ``sub_sample``, a 2x2 max-pooled
grid of) input positions: ``out = x + conv_out(f(theta(x), phi(x)) @ g(x))``. GRoIE's
ablations try it as the RoI extractor's post-processing module. Submodule names and the
initialisation are mmcv's so its checkpoints load key for key; ``conv_out`` starts at zero,
which makes a fresh block the identity and lets it be dropped into a pretrained net.

The four pairwise functions ``f`` over ``inter = max(C // reduction, 1)`` channels:

- ``embedded_gaussian``: ``softmax(theta^T phi / sqrt(inter))`` (no scale without ``use_scale``);
- ``gaussian``: ``softmax(x^T x)`` on the raw input (``theta`` and ``phi`` are not built;
  with ``sub_sample``, ``phi`` is only the max-pool);
- ``dot_product``: ``theta^T phi / N_keys``;
- ``concatenation``: ``ReLU(w . [theta_q; phi_k]) / N_keys`` with ``w`` = ``concat_project``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .conv_module import ConvModule
from .norm import NORM_KINDS

NON_LOCAL_MODES: tuple[str, ...] = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
# A FrozenBN output norm would hold the zero init forever: the block could never train.
NON_LOCAL_NORMS: tuple[str, ...] = tuple(k for k in NORM_KINDS if k != "FrozenBN")


def _check_args(
    prefix: str, reduction: int, use_scale: bool, mode: str, sub_sample: bool, norm: str | None
) -> None:
    """Raise a ValueError naming the first bad argument (``prefix`` + field name)."""
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction <= 0:
        raise ValueError(f"{prefix}reduction must be a positive int, got {reduction!r}")
    if not isinstance(use_scale, bool):
        raise ValueError(f"{prefix}use_scale must be a bool, got {use_scale!r}")
    if mode not in NON_LOCAL_MODES:
        raise ValueError(f"{prefix}mode must be one of {list(NON_LOCAL_MODES)}, got {mode!r}")
    if not isinstance(sub_sample, bool):
        raise ValueError(f"{prefix}sub_sample must be a bool, got {sub_sample!r}")
    if norm is not None and norm not in NON_LOCAL_NORMS:
        why = " (a frozen norm would keep conv_out at its zero init)" if norm == "FrozenBN" else ""
        raise ValueError(
            f"{prefix}norm must be one of {list(NON_LOCAL_NORMS)} or None, got {norm!r}{why}"
        )


@dataclass
class NonLocalConfig:
    """A ``NonLocal2d`` block; ``norm`` (None, "BN", "SyncBN" or "GN") is on ``conv_out`` only."""

    reduction: int = 2
    use_scale: bool = True
    mode: str = "embedded_gaussian"
    sub_sample: bool = False
    norm: str | None = None

    def __post_init__(self) -> None:
        _check_args(
            "NonLocalConfig.", self.reduction, self.use_scale, self.mode, self.sub_sample, self.norm
        )

    def build(self, in_channels: int) -> NonLocal2d:
        return NonLocal2d(
            in_channels,
            reduction=self.reduction,
            use_scale=self.use_scale,
            mode=self.mode,
            sub_sample=self.sub_sample,
            norm=self.norm,
        )


class NonLocal2d(nn.Module):
    """``x + conv_out(y)``, ``y_q = sum_k f(q, k) g(x)_k``, over (N, C, H, W) maps."""

    def __init__(
        self,
        in_channels: int,
        reduction: int = 2,
        use_scale: bool = True,
        mode: str = "embedded_gaussian",
        sub_sample: bool = False,
        norm: str | None = None,
    ) -> None:
        super().__init__()
        if in_channels <= 0:
            raise ValueError(f"NonLocal2d in_channels must be positive, got {in_channels}")
        _check_args("NonLocal2d ", reduction, use_scale, mode, sub_sample, norm)
        self.in_channels = in_channels
        self.reduction = reduction
        self.use_scale = use_scale
        self.mode = mode
        self.sub_sample = sub_sample
        self.inter_channels = inter = max(in_channels // reduction, 1)

        def proj() -> ConvModule:  # 1x1 conv with bias, no norm, no activation
            return ConvModule(in_channels, inter, 1, activation=None)

        # Registration order (hence state-dict order) is mmcv's.
        self.g: nn.Module = proj()
        self.conv_out = ConvModule(inter, in_channels, 1, norm=norm, activation=None)
        projections = [self.g]
        if mode != "gaussian":
            self.theta = proj()
            self.phi: nn.Module = proj()
            projections += [self.theta, self.phi]
        if mode == "concatenation":
            # mmcv leaves this one at ConvModule's init (Kaiming fan_out, ReLU gain).
            self.concat_project = ConvModule(2 * inter, 1, 1, bias=False, activation="relu")

        # mmcv's init_weights: normal(0.01) projections, zero output (its conv, or its norm).
        for module in projections:
            nn.init.normal_(module.conv.weight, std=0.01)
            nn.init.zeros_(module.conv.bias)
        out_norm = self.conv_out.norm
        zeroed = self.conv_out.conv if out_norm is None else out_norm
        nn.init.zeros_(zeroed.weight)
        nn.init.zeros_(zeroed.bias)

        # Sub-sampling pools the keys: g and phi become (module, max-pool) pairs, so their keys
        # read ``g.0.conv.weight``; in gaussian mode phi is the pool alone.
        if sub_sample:
            self.g = nn.Sequential(self.g, nn.MaxPool2d(2))
            if mode == "gaussian":
                self.phi = nn.MaxPool2d(2)
            else:
                self.phi = nn.Sequential(self.phi, nn.MaxPool2d(2))

    def _pairwise(self, x: Tensor) -> Tensor:
        """The (N, Nq, Nk) weights ``f(q, k)``."""
        if self.mode == "gaussian":
            theta_x = x.flatten(2).transpose(1, 2)  # (N, Nq, C)
            phi_x = (self.phi(x) if self.sub_sample else x).flatten(2)  # (N, C, Nk)
            return torch.bmm(theta_x, phi_x).softmax(dim=-1)
        theta_x = self.theta(x).flatten(2).transpose(1, 2)  # (N, Nq, inter)
        phi_x = self.phi(x).flatten(2)  # (N, inter, Nk)
        num_keys = phi_x.shape[-1]
        if self.mode == "concatenation":
            # concat_project(cat[theta_q, phi_k]) is linear before its ReLU, so it splits into a
            # query term plus a key term: mmcv's result without its (2*inter, Nq, Nk) tensor.
            conv = self.concat_project.conv
            weight = conv.weight.view(2 * self.inter_channels)
            query = theta_x @ weight[: self.inter_channels]  # (N, Nq)
            key = weight[self.inter_channels :] @ phi_x  # (N, Nk)
            logits = query[:, :, None] + key[:, None, :]
            if conv.bias is not None:
                logits = logits + conv.bias
            return torch.relu(logits) / num_keys
        pairwise = torch.bmm(theta_x, phi_x)
        if self.mode == "dot_product":
            return pairwise / num_keys
        if self.use_scale:
            pairwise = pairwise / self.inter_channels**0.5
        return pairwise.softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"NonLocal2d expects (N, {self.in_channels}, H, W) input, got {tuple(x.shape)}"
            )
        n, _, h, w = x.shape
        g_x = self.g(x).flatten(2).transpose(1, 2)  # (N, Nk, inter)
        y = torch.bmm(self._pairwise(x), g_x)  # (N, Nq, inter)
        y = y.transpose(1, 2).reshape(n, self.inter_channels, h, w)
        return x + self.conv_out(y)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, inter_channels={self.inter_channels}, "
            f"mode={self.mode!r}, use_scale={self.use_scale}, sub_sample={self.sub_sample}"
        )
