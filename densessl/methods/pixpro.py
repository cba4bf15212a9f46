"""PixPro and PixContrast (Xie et al., "Propagate Yourself", CVPR 2021).

Consistency per C5 feature-map pixel. Positive pixel pairs of the two views are the cells
whose centres lie close in the source image (densessl.data.geometry.pixpro_positive_mask:
distance / max of the two views' cell diagonals < `pos_threshold`, strict).

mode "pixpro" (the official code): online backbone C5 -> per-pixel projector (1x1-conv MLP
with BN) -> pixel propagation module (PPM) -> normalise; the EMA target (backbone + projector)
gives normalised pixel features of the other view. Loss, per direction a->b:
    L_ab = -2 * mean_batch[ sum_ij A_ij <q_i, k_j> / (sum_ij A_ij + 1e-6) ]
and L = L_12 + L_21, in [-4, 4] (-4 when every positive pair agrees). Images without
positives contribute 0 and still count in the batch mean.

mode "pixcontrast" (paper only; the official repo has no code for it): no PPM; pixel-level
InfoNCE between online and target projections with temperature `tau`; see `pixcontrast_loss`
for the negatives (a decision, documented in docs/methods/pixpro.md).

Optional instance branch (`ins_loss_weight > 0`): a second per-pixel projector and a predictor,
global average pooling (adaptive, not the code's AvgPool2d(7)), BYOL's -2cos, symmetric.

EMA: as in the official code, the target is updated inside forward, before the target pass,
with the cosine momentum m(k) for k = current_step (once per step: a second forward at the
same step does not update it again). Parameters only; the target runs in train mode.

Both views go through each network in one call when they share a resolution, so BN
statistics are over both views (the official code runs them one view at a time).
Distributed: nothing is gathered across ranks (PixContrast's negatives are the local batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from densessl.data.geometry import pixpro_positive_mask
from densessl.engine.ema import ema_update_, make_target
from densessl.engine.schedules import cosine_momentum
from densessl.methods import register
from densessl.methods.base import Method, forward_by_resolution

MODES = ("pixpro", "pixcontrast")
NEGATIVES = ("batch", "image")


@dataclass
class PixProConfig:
    name: str = "pixpro"
    mode: str = "pixpro"  # pixpro | pixcontrast
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096  # instance branch's predictor
    momentum_base: float = 0.99
    momentum_end: float = 1.0  # cosine from momentum_base to this (1.0: the paper); short runs: < 1
    pos_threshold: float = 0.7  # positives: centre distance / max cell diagonal < this
    ppm_gamma: float = 2.0  # similarity sharpness (script: --pixpro-p 2; the CLI default 1 is not used)
    ppm_transform_layers: int = 1  # value transform g: 0 identity | 1 conv1x1 | 2 two-layer MLP
    ppm_clamp: float = 0.0  # similarities below this are clamped before the power
    ins_loss_weight: float = 0.0  # instance branch weight (0 in the released scripts; 1 for PixPro*)
    tau: float = 0.3  # PixContrast temperature
    pixcontrast_negatives: str = "batch"  # batch | image

    def __post_init__(self):
        from densessl.config import ConfigError

        if self.mode not in MODES:
            raise ConfigError(f"key 'method.mode' expects one of {', '.join(MODES)}, got {self.mode!r}")
        if self.pixcontrast_negatives not in NEGATIVES:
            raise ConfigError(f"key 'method.pixcontrast_negatives' expects one of {', '.join(NEGATIVES)}, "
                              f"got {self.pixcontrast_negatives!r}")
        if self.ppm_transform_layers not in (0, 1, 2):
            raise ConfigError(f"key 'method.ppm_transform_layers' expects 0, 1 or 2, got {self.ppm_transform_layers!r}")
        if self.tau <= 0:
            raise ConfigError(f"key 'method.tau' expects a positive temperature, got {self.tau!r}")


def mlp2d(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """PixPro's MLP2d: conv1x1 -> BN2d -> ReLU -> conv1x1, applied at every pixel."""
    return nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1), nn.BatchNorm2d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden_dim, out_dim, 1))


def propagate(x: torch.Tensor, v: torch.Tensor, gamma: float, clamp: float = 0.0) -> torch.Tensor:
    """The PPM's propagation: y_i = sum_j max(cos(x_i, x_j), clamp)^gamma * v_j / |v_j|.

    x, v: (B, C, H, W). Similarities come from the untransformed x; they are not row-normalised
    (the caller normalises y). Returns (B, C, H, W), unnormalised.
    """
    B, C, H, W = x.shape
    xf = F.normalize(x.flatten(2), dim=1)
    vf = F.normalize(v.flatten(2), dim=1)
    sim = torch.bmm(xf.transpose(1, 2), xf).clamp(min=clamp)  # (B, N, N)
    if gamma < 1:
        sim = sim + 1e-6  # as the official code, so 0 ** gamma stays finite in the backward
    sim = sim ** gamma
    return torch.bmm(vf, sim.transpose(1, 2)).view(B, v.shape[1], H, W)


class PixelPropagation(nn.Module):
    """PPM: y = normalize(propagate(x, g(x))), g = identity, conv1x1 or a 2-layer MLP2d."""

    def __init__(self, dim: int, transform_layers: int = 1, gamma: float = 2.0, clamp: float = 0.0):
        super().__init__()
        if transform_layers == 0:
            self.transform = nn.Identity()
        elif transform_layers == 1:
            self.transform = nn.Conv2d(dim, dim, 1)
        elif transform_layers == 2:
            self.transform = mlp2d(dim, dim, dim)
        else:
            raise ValueError(f"transform_layers must be 0, 1 or 2, got {transform_layers}")
        self.gamma, self.clamp = gamma, clamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(propagate(x, self.transform(x), self.gamma, self.clamp), dim=1)


def pixel_consistency(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-2 * mean over images of the mean cosine over positive pairs; 0 for an image without any.

    q: (B, C, N1) online pixels (normalised), k: (B, C, N2) target pixels (normalised, treated
    as constants), mask: (B, N1, N2) positives.
    """
    cos = torch.bmm(q.transpose(1, 2).float(), k.detach().float())  # (B, N1, N2)
    m = mask.float()
    per_image = (cos * m).sum((1, 2)) / (m.sum((1, 2)) + 1e-6)
    return -2.0 * per_image.mean()


def pixpro_loss(q1, q2, k1, k2, mask12, mask21=None) -> torch.Tensor:
    """Symmetric PixPro loss L_12 + L_21 in [-4, 4]; mask12 (B, N1, N2) view-1 x view-2 positives,
    mask21 the reverse ones (default: mask12 transposed; the video variant's differ)."""
    mask21 = mask12.transpose(1, 2) if mask21 is None else mask21
    return pixel_consistency(q1, k2, mask12) + pixel_consistency(q2, k1, mask21)


def pixcontrast_loss(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, tau: float,
                     negatives: str = "batch") -> torch.Tensor:
    """Pixel-level InfoNCE of view a's pixels against view b's, one direction.

    q: (B, C, N1) online pixels, k: (B, C, N2) target pixels (both normalised; k constant),
    mask: (B, N1, N2) positives. For pixel i of image b with at least one positive:
        l(i) = -log( sum_{j in Pos(i)} e^{<q_i,k_j>/tau} / sum_{j in Pos(i) or Neg(i)} e^{<q_i,k_j>/tau} )
    negatives="image": Neg(i) = the non-positive pixels of the other view of the same image
    (the paper's definition as the spec reads it); "batch": those plus every pixel of the other
    images' other views in the (local) batch. Pixels without positives are left out; the loss
    is the mean over an image's counted pixels (0 if none), then the mean over images.
    """
    B, _, N1 = q.shape
    N2 = k.shape[2]
    qf, kf = q.float(), k.detach().float()
    if negatives == "image":
        logits = torch.bmm(qf.transpose(1, 2), kf) / tau  # (B, N1, N2)
        pos = mask.bool()
    elif negatives == "batch":
        logits = torch.einsum("bci,dcj->bidj", qf, kf).reshape(B, N1, B * N2) / tau
        same = torch.eye(B, dtype=torch.bool, device=q.device)
        pos = (mask.bool()[:, :, None, :] & same[:, None, :, None]).reshape(B, N1, B * N2)
    else:
        raise ValueError(f"negatives must be 'batch' or 'image', got {negatives!r}")
    has_pos = pos.any(-1)  # (B, N1)
    # a large finite fill keeps the backward finite for rows without positives
    lse_pos = torch.logsumexp(logits.masked_fill(~pos, -1e4), dim=-1)
    lse_all = torch.logsumexp(logits, dim=-1)
    per_pixel = torch.where(has_pos, lse_all - lse_pos, torch.zeros_like(lse_all))
    per_image = per_pixel.sum(1) / (has_pos.sum(1) + 1e-6)
    return per_image.mean()


def instance_regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-2 * mean cos(p, sg(z)) over the batch (PixPro's instance loss, one direction)."""
    return -2.0 * (F.normalize(p.float(), dim=1) * F.normalize(z.detach().float(), dim=1)).sum(1).mean()


@register("pixpro", PixProConfig)
class PixPro(Method):
    def __init__(self, cfg: PixProConfig, backbone):
        super().__init__(cfg, backbone)
        c = backbone.out_dim
        self.projector = mlp2d(c, cfg.proj_hidden_dim, cfg.proj_dim)
        self.ppm = (PixelPropagation(cfg.proj_dim, cfg.ppm_transform_layers, cfg.ppm_gamma, cfg.ppm_clamp)
                    if cfg.mode == "pixpro" else None)
        self.use_instance = cfg.ins_loss_weight > 0
        if self.use_instance:
            self.projector_instance = mlp2d(c, cfg.proj_hidden_dim, cfg.proj_dim)
            self.predictor = mlp2d(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        self.target_backbone = make_target(backbone)
        self.target_projector = make_target(self.projector)
        if self.use_instance:
            self.target_projector_instance = make_target(self.projector_instance)
        self.momentum = cfg.momentum_base
        self._ema_step = None

    def _c5(self, backbone, views):
        return forward_by_resolution(lambda x: backbone(x, stages=("c5",))["c5"], views)

    @torch.no_grad()
    def _momentum_update(self):
        """The official placement: before the target pass, m(k) with k = current step."""
        if not self.training or self._ema_step == self.current_step:
            return
        self._ema_step = self.current_step
        self.momentum = cosine_momentum(self.current_step, self.total_steps, self.cfg.momentum_base, self.cfg.momentum_end)
        pairs = [(self.target_backbone, self.backbone), (self.target_projector, self.projector)]
        if self.use_instance:
            pairs.append((self.target_projector_instance, self.projector_instance))
        for t, o in pairs:
            ema_update_(t, o, self.momentum)

    def positive_masks(self, batch, grid1, grid2):
        """(view-1 x view-2 positives, view-2 x view-1 positives, statistics) from the geometry.

        The video variant overrides this with flow-warped correspondences."""
        flips = batch.get("flip") or [None, None]
        mask = pixpro_positive_mask(batch["box"][0], flips[0], batch["box"][1], flips[1], grid1, grid2,
                                    self.cfg.pos_threshold)
        return mask, mask.transpose(1, 2), {}

    def forward(self, views, batch):
        if len(views) != 2:
            raise ValueError(f"PixPro takes exactly 2 views, the recipe gives {len(views)}")
        if "box" not in batch:
            raise ValueError("PixPro needs the views' geometry: batch['box'] (and batch['flip']), one per view")
        cfg = self.cfg
        f1, f2 = self._c5(self.backbone, views)
        x1, x2 = forward_by_resolution(self.projector, [f1, f2])
        mask12, mask21, stats = self.positive_masks(batch, tuple(f1.shape[-2:]), tuple(f2.shape[-2:]))
        with torch.no_grad():
            self._momentum_update()
            g1, g2 = self._c5(self.target_backbone, views)
            k1, k2 = (F.normalize(k.float(), dim=1).flatten(2)
                      for k in forward_by_resolution(self.target_projector, [g1, g2]))
        if cfg.mode == "pixpro":
            q1, q2 = (y.flatten(2) for y in forward_by_resolution(self.ppm, [x1, x2]))
            dense = pixpro_loss(q1, q2, k1, k2, mask12, mask21)
        else:
            q1, q2 = (F.normalize(x.float(), dim=1).flatten(2) for x in (x1, x2))
            dense = 0.5 * (pixcontrast_loss(q1, k2, mask12, cfg.tau, cfg.pixcontrast_negatives)
                           + pixcontrast_loss(q2, k1, mask21, cfg.tau, cfg.pixcontrast_negatives))
        out = {
            cfg.mode: dense.detach(),
            "positives_per_image": mask12.sum((1, 2)).float().mean(),
            # collapse statistic: per-dimension std of the normalised target pixels (~1/sqrt(d) healthy)
            "z_std": k1.transpose(1, 2).reshape(-1, k1.shape[1]).std(dim=0).mean(),
            "features": f1.mean(dim=(2, 3)).detach(),
            **{k: v.detach() for k, v in stats.items()},
        }
        loss = dense
        if self.use_instance:
            y1, y2 = forward_by_resolution(self.projector_instance, [f1, f2])
            p1, p2 = (p.mean(dim=(2, 3)) for p in forward_by_resolution(self.predictor, [y1, y2]))
            with torch.no_grad():
                z1, z2 = (z.mean(dim=(2, 3)) for z in forward_by_resolution(self.target_projector_instance, [g1, g2]))
            ins = instance_regression(p1, z2) + instance_regression(p2, z1)
            loss = loss + cfg.ins_loss_weight * ins
            out["instance"] = ins.detach()
        out["loss"] = loss
        return out
