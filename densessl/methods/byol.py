"""BYOL (Grill et al., 2020): regress an EMA target's projection of another view.

Faithful to the official code (specs, BYOL): projector and predictor Linear-BN-ReLU-Linear,
EMA of parameters only with a cosine momentum schedule from `momentum_base` to 1 over
training, symmetric loss 2 - 2 cos(p, sg(z)). The target runs in train mode (batch
statistics). Both views share a resolution, so each network sees them in one call (BN
statistics are taken over both views together).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from densessl.engine.ema import ema_update_, make_target
from densessl.engine.schedules import cosine_momentum
from densessl.methods import register
from densessl.methods.base import Method, forward_by_resolution
from densessl.models.heads import mlp


@dataclass
class BYOLConfig:
    name: str = "byol"
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    momentum_base: float = 0.99
    momentum_end: float = 1.0  # cosine from momentum_base to this (1.0: the paper); short runs: < 1


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample 2 - 2 cos(p, z), with z treated as a constant (stop-gradient)."""
    return 2.0 - 2.0 * (F.normalize(p, dim=-1) * F.normalize(z.detach(), dim=-1)).sum(dim=-1)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric BYOL loss: mean over the batch of l(p1, z2) + l(p2, z1); in [0, 8]."""
    return (regression_loss(p1, z2) + regression_loss(p2, z1)).mean()


@register("byol", BYOLConfig)
class BYOL(Method):
    def __init__(self, cfg: BYOLConfig, backbone):
        super().__init__(cfg, backbone)
        self.projector = mlp(backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        self.target_backbone = make_target(backbone)
        self.target_projector = make_target(self.projector)
        self.momentum = cfg.momentum_base

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
            "z_std": F.normalize(z1.float(), dim=-1).std(dim=0).mean(),
            "features": h1.detach(),
        }

    @torch.no_grad()
    def after_step(self, step, total_steps):
        # m(k) with k = index of the step just taken (SCRL's placement: after optimizer.step)
        self.momentum = cosine_momentum(step, total_steps, self.cfg.momentum_base, self.cfg.momentum_end)
        ema_update_(self.target_backbone, self.backbone, self.momentum)
        ema_update_(self.target_projector, self.projector, self.momentum)
