"""Projection and prediction heads."""
from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = True, last_bias: bool = True) -> nn.Sequential:
    """Linear -> (BN) -> ReLU -> Linear: BYOL's projector/predictor, MoCo v2's head without BN."""
    layers = [nn.Linear(in_dim, hidden_dim, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim, bias=last_bias)]
    return nn.Sequential(*layers)
