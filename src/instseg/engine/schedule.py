"""Learning-rate schedule and optimizer: mmdet's step policy with linear or constant warmup,
plain SGD.

The learning rate is a pure function of the iteration (:func:`lr_at`) and is written into the
optimizer before every step, so a resumed run needs no scheduler state to continue exactly.
Weight decay can be scaled for normalisation layers and biases, and the learning rate for
biases (mmdet's ``paramwise_cfg`` ``norm_decay_mult``, ``bias_decay_mult``, ``bias_lr_mult``;
the FCOS recipe uses the last two).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import torch
from torch import nn


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ScheduleConfig:
    """SGD hyper-parameters and the step schedule (iterations, not epochs).

    ``steps`` are the iterations at which the learning rate is multiplied by ``gamma``;
    during the first ``warmup_iters`` iterations it rises linearly from
    ``warmup_ratio * lr`` towards the regular value (``warmup="linear"``, mmdet's
    ``LinearLR``) or stays at ``warmup_ratio * lr`` (``"constant"``, mmdet's ``ConstantLR``).
    ``grad_clip`` is the maximum total gradient norm (None: no clipping). Parameters of
    normalisation layers get ``weight_decay * norm_decay_mult``, other biases
    ``weight_decay * bias_decay_mult`` and ``lr * bias_lr_mult`` (mmdet ``paramwise_cfg``).
    """

    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    warmup: Literal["linear", "constant"] = "linear"
    steps: tuple[int, ...] = ()
    gamma: float = 0.1
    grad_clip: float | None = None
    norm_decay_mult: float = 1.0
    bias_decay_mult: float = 1.0
    bias_lr_mult: float = 1.0

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not _is_number(self.base_lr) or not self.base_lr > 0:
            raise ValueError(f"{name}.base_lr must be a positive number, got {self.base_lr!r}")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"{name}.momentum must be in [0, 1), got {self.momentum!r}")
        if not _is_number(self.weight_decay) or not self.weight_decay >= 0:
            raise ValueError(f"{name}.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not _is_int(self.warmup_iters) or self.warmup_iters < 0:
            raise ValueError(
                f"{name}.warmup_iters must be a non-negative integer, got {self.warmup_iters!r}"
            )
        if not _is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"{name}.warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        if isinstance(self.steps, (str, bytes)) or not hasattr(self.steps, "__iter__"):
            raise ValueError(f"{name}.steps must be a sequence of iterations, got {self.steps!r}")
        steps = tuple(self.steps)
        if not all(_is_int(s) and s >= 0 for s in steps):
            raise ValueError(f"{name}.steps must be non-negative integers, got {steps!r}")
        if any(b <= a for a, b in pairwise(steps)):
            raise ValueError(f"{name}.steps must be strictly increasing, got {steps!r}")
        self.steps = steps
        if not _is_number(self.gamma) or not self.gamma > 0:
            raise ValueError(f"{name}.gamma must be a positive number, got {self.gamma!r}")
        if self.grad_clip is not None and (not _is_number(self.grad_clip) or self.grad_clip <= 0):
            raise ValueError(
                f"{name}.grad_clip must be None or a positive number, got {self.grad_clip!r}"
            )
        if self.warmup not in ("linear", "constant"):
            raise ValueError(
                f"{name}.warmup must be one of ('linear', 'constant'), got {self.warmup!r}"
            )
        for key in ("norm_decay_mult", "bias_decay_mult", "bias_lr_mult"):
            value = getattr(self, key)
            if not _is_number(value) or not value >= 0:
                raise ValueError(f"{name}.{key} must be a number >= 0, got {value!r}")


def lr_at(cfg: ScheduleConfig, iteration: int) -> float:
    """The learning rate of the step taken after ``iteration`` completed iterations.

    ``iteration`` is 0 for the first step (mmdet's ``runner.iter``). The regular rate is
    ``base_lr * gamma ** (number of steps <= iteration)``; while ``iteration < warmup_iters``
    it is scaled by ``1 - (1 - iteration / warmup_iters) * (1 - warmup_ratio)`` (linear) or
    by ``warmup_ratio`` (constant). Parameter groups with an ``lr_mult`` get it times this.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    regular = cfg.base_lr * cfg.gamma ** sum(1 for s in cfg.steps if s <= iteration)
    if iteration < cfg.warmup_iters:
        if cfg.warmup == "constant":
            return regular * cfg.warmup_ratio
        return regular * (1 - (1 - iteration / cfg.warmup_iters) * (1 - cfg.warmup_ratio))
    return regular


_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _decay_groups(
    model: nn.Module, cfg: ScheduleConfig
) -> list[tuple[tuple[float, float], list[nn.Parameter]]]:
    """``((weight_decay, lr_mult), params)`` per distinct pair, for every trainable parameter.

    Groups come in the order their first parameter has in ``model.parameters()``, and the
    parameters of a group in that order too; a shared parameter counts once, where
    ``model.parameters()`` first yields it.
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, _NORM_LAYERS)
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if not param.requires_grad:
                continue
            lr_mult = 1.0
            if is_norm:
                mult = cfg.norm_decay_mult
            elif name == "bias":
                mult, lr_mult = cfg.bias_decay_mult, cfg.bias_lr_mult
            else:
                mult = 1.0
            # A multiplier of 1 keeps weight_decay itself (an int stays an int in the state).
            decay = cfg.weight_decay if mult == 1 else cfg.weight_decay * mult
            groups.setdefault((decay, lr_mult), []).append(param)
    return list(groups.items())


def build_optimizer(model: nn.Module, cfg: ScheduleConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay over every parameter that requires a gradient.

    One parameter group (``model.parameters()`` order) when every parameter has the same
    decay and learning rate, as with the default multipliers; otherwise one group per
    (decay, lr multiplier) pair (:func:`_decay_groups`), with ``lr_mult`` in the group when
    it is not 1.
    """
    groups = _decay_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no parameter with requires_grad=True to optimise")
    if len(groups) == 1 and groups[0][0][1] == 1:
        params: list[nn.Parameter] | list[dict] = groups[0][1]
        weight_decay = groups[0][0][0]
    else:
        params = []
        for (decay, lr_mult), ps in groups:
            group: dict = {"params": ps, "weight_decay": decay}
            if lr_mult != 1:
                group["lr_mult"] = lr_mult
            params.append(group)
        weight_decay = cfg.weight_decay
    return torch.optim.SGD(params, lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` (times the group's ``lr_mult``, if any) into every parameter group."""
    for group in optimizer.param_groups:
        mult = group.get("lr_mult", 1)
        group["lr"] = lr if mult == 1 else lr * mult
