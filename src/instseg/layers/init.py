"""Weight initialisations that differ between the recipes, chosen by name in configs."""

from __future__ import annotations

from torch import Tensor, nn

WEIGHT_INITS: tuple[str, ...] = ("xavier_uniform", "c2_xavier")


def init_weight(weight: Tensor, kind: str) -> None:
    """``"xavier_uniform"``: mmdet's FPN and box-head FCs; ``"c2_xavier"``: detectron2's
    ``c2_xavier_fill``, i.e. ``kaiming_uniform_(a=1)`` (uniform with bound sqrt(3 / fan_in))."""
    if kind == "xavier_uniform":
        nn.init.xavier_uniform_(weight)
    elif kind == "c2_xavier":
        nn.init.kaiming_uniform_(weight, a=1)
    else:
        raise ValueError(f"unknown weight init {kind!r}; valid: {', '.join(WEIGHT_INITS)}")
