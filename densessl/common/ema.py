"""Exponential moving average of parameters (the momentum / target encoder)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_target(online: nn.Module) -> nn.Module:
    """A frozen copy of `online`: same weights, no gradients."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- m * target + (1 - m) * online, over parameters only.

    Buffers (BN running statistics) are not averaged, as in the official BYOL, SCRL and PixPro
    code: the target runs in train mode on batch statistics.
    """
    t_params = list(target.parameters())
    o_params = list(online.parameters())
    torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)  # one pass: t + (1 - m) (o - t)
