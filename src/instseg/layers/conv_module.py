"""Conv -> norm -> activation, the building block of mmcv's ``ConvModule`` (spec §1.3).

Submodule names are mmcv's (``conv``, then ``bn`` or ``gn``, then ``activate``) so that
checkpoints of heads built from ConvModules map key for key. With ``bias=None`` ("auto")
the conv has a bias only when no norm follows it. Initialisation is mmcv's: the conv is
Kaiming-normal (fan_out, ReLU gain; leaky-ReLU gain for a leaky activation) with bias 0,
the norm weight 1 and bias 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .norm import NORM_KINDS, build_norm

ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu")
_LEAKY_SLOPE = 0.01


@dataclass
class ConvModuleConfig:
    """A conv-norm-act block; ``out_channels=None`` keeps the input width, ``padding=None``
    is ``dilation * (kernel_size // 2)`` ("same" for odd kernels at stride 1)."""

    out_channels: int | None = None
    kernel_size: int = 3
    padding: int | None = None
    stride: int = 1
    dilation: int = 1
    norm: str | None = None
    num_groups: int = 32
    activation: str | None = "relu"
    inplace: bool = True
    bias: bool | None = None

    def __post_init__(self) -> None:
        if self.out_channels is not None and self.out_channels <= 0:
            raise ValueError(f"conv out_channels must be positive, got {self.out_channels}")
        if self.kernel_size <= 0 or self.stride <= 0 or self.dilation <= 0:
            raise ValueError(
                "conv kernel_size, stride and dilation must be positive, got "
                f"{self.kernel_size}, {self.stride}, {self.dilation}"
            )
        if self.padding is not None and self.padding < 0:
            raise ValueError(f"conv padding must be >= 0, got {self.padding}")
        if self.norm is not None and self.norm not in NORM_KINDS:
            raise ValueError(f"conv norm must be one of {NORM_KINDS} or None, got {self.norm!r}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(
                f"conv activation must be one of {ACTIVATIONS} or None, got {self.activation!r}"
            )

    def build(self, in_channels: int) -> ConvModule:
        padding = self.dilation * (self.kernel_size // 2) if self.padding is None else self.padding
        return ConvModule(
            in_channels,
            self.out_channels or in_channels,
            self.kernel_size,
            stride=self.stride,
            padding=padding,
            dilation=self.dilation,
            bias=self.bias,
            norm=self.norm,
            num_groups=self.num_groups,
            activation=self.activation,
            inplace=self.inplace,
        )


class ConvModule(nn.Module):
    """``activate(norm(conv(x)))``, each part optional but the conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool | None = None,
        norm: str | None = None,
        num_groups: int = 32,
        activation: str | None = "relu",
        inplace: bool = True,
    ) -> None:
        super().__init__()
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS} or None, got {activation!r}")
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=norm is None if bias is None else bias,
        )
        self.norm_name: str | None = None
        if norm is not None:
            self.norm_name = "gn" if norm == "GN" else "bn"
            self.add_module(self.norm_name, build_norm(norm, out_channels, num_groups))
        self.activate: nn.Module | None = None
        if activation == "relu":
            self.activate = nn.ReLU(inplace=inplace)
        elif activation == "leaky_relu":
            self.activate = nn.LeakyReLU(_LEAKY_SLOPE, inplace=inplace)

        if activation == "leaky_relu":
            nn.init.kaiming_normal_(
                self.conv.weight, a=_LEAKY_SLOPE, mode="fan_out", nonlinearity="leaky_relu"
            )
        else:
            nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        norm_layer = self.norm
        if norm_layer is not None and isinstance(getattr(norm_layer, "weight", None), nn.Parameter):
            nn.init.ones_(norm_layer.weight)
            nn.init.zeros_(norm_layer.bias)

    @property
    def norm(self) -> nn.Module | None:
        return None if self.norm_name is None else getattr(self, self.norm_name)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        if self.activate is not None:
            x = self.activate(x)
        return x
