"""BYOL (Grill et al., 2020): regress an EMA target's projection of another view.

Faithful to the official code (specs, BYOL): projector and predictor Linear-BN-ReLU-Linear,
EMA of parameters only with a cosine momentum schedule from `momentum_base` to `momentum_end`
(1 by default) over training, symmetric loss 2 - 2 cos(p, sg(z)). The target runs in train mode (batch
statistics). Both views share a resolution, so each network sees them in one call (BN
statistics are taken over both views together).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from densessl.methods import register
from densessl.methods.base import forward_by_resolution
from densessl.methods.losses import byol_loss, embedding_std
from densessl.methods.momentum import MomentumMethod, MomentumSchedule, make_target
from densessl.models.heads import mlp


@dataclass
class BYOLConfig:
    name: str = "byol"
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    momentum_base: float = 0.99
    momentum_end: float = 1.0  # cosine from momentum_base to this (1.0: the paper); short runs: < 1


@register("byol", BYOLConfig)
class BYOL(MomentumMethod):
    def __init__(self, cfg: BYOLConfig, backbone):
        # the official placement: after step t, with m(t)
        super().__init__(cfg, backbone, MomentumSchedule(cfg.momentum_base, cfg.momentum_end),
                         update_for_next_step=False)
        self.projector = mlp(backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        self.target_backbone = make_target(backbone)
        self.target_projector = make_target(self.projector)

    def momentum_pairs(self):
        return [(self.target_backbone, self.backbone), (self.target_projector, self.projector)]

    def forward(self, views, batch):
        if len(views) != 2:
            raise ValueError(f"BYOL takes exactly 2 views, the recipe gives {len(views)}")
        h1, h2 = forward_by_resolution(self.backbone.pool, views)
        p1, p2 = self.predictor(self.projector(torch.cat([h1, h2]))).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target_projector(
                torch.cat(forward_by_resolution(self.target_backbone.pool, views))).chunk(2)
        loss = byol_loss(p1, p2, z1, z2)
        return {
            "loss": loss,
            "byol": loss.detach(),
            # collapse statistic: per-dimension std of normalised projections (~1/sqrt(d) healthy)
            "z_std": embedding_std(z1),
            "features": h1.detach(),
        }
