"""PixPro's networks, EMA target and loss (Xie et al., "Propagate Yourself", CVPR 2021),
shared by the image variant (densessl.methods.pixpro) and the video one
(densessl.methods.pixpro_video), which differ only in their positive pixel pairs.

mode "pixpro": online backbone C5 -> per-pixel projector (1x1-conv MLP with BN) -> pixel
propagation module (PPM) -> normalise; the EMA target (backbone + projector) gives normalised
pixel features of the other view; loss `losses.pixpro_loss`. mode "pixcontrast": no PPM;
`losses.pixcontrast_loss` between online and target projections, averaged over directions.
Optional instance branch (`ins_loss_weight > 0`): a second per-pixel projector and a
predictor, global average pooling, BYOL's -2cos (`losses.instance_regression`), symmetric.

EMA: as in the official code, the target is updated before each step's target pass with the
cosine momentum m(k), k = that step; densessl.methods.momentum runs it right after the
previous optimiser step (the same result). Parameters only; the target runs in train mode.
Both views go through each network in one call when they share a resolution, so BN
statistics are over both views; `bn_per_view: true` runs one view at a time, as the official
code (BN statistics per view).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from densessl.methods.base import forward_by_resolution
from densessl.methods.losses import instance_regression, pixcontrast_loss, pixpro_loss
from densessl.methods.momentum import MomentumMethod, MomentumSchedule, make_target

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
    bn_per_view: bool = False  # true: each network runs one view per call, BN statistics per view (the code)
    # crop box behind the positives: edges (x0 = j / W, x1 = (j + w) / W, the geometry record) |
    # code (j / (W - 1), (j + w - 1) / (W - 1), the official code's). Image variant only.
    crop_coords: str = "edges"

    def __post_init__(self):
        from densessl.config import ConfigError
        from densessl.data.geometry import CROP_COORDS

        if self.mode not in MODES:
            raise ConfigError(f"key 'method.mode' expects one of {', '.join(MODES)}, got {self.mode!r}")
        if self.pixcontrast_negatives not in NEGATIVES:
            raise ConfigError(f"key 'method.pixcontrast_negatives' expects one of {', '.join(NEGATIVES)}, "
                              f"got {self.pixcontrast_negatives!r}")
        if self.ppm_transform_layers not in (0, 1, 2):
            raise ConfigError(f"key 'method.ppm_transform_layers' expects 0, 1 or 2, got {self.ppm_transform_layers!r}")
        if self.crop_coords not in CROP_COORDS:
            raise ConfigError(f"key 'method.crop_coords' expects one of {', '.join(CROP_COORDS)}, got {self.crop_coords!r}")
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


class PixProCore(MomentumMethod):
    """PixPro's networks, EMA target and loss; subclasses give the positive pairs (`positive_masks`)."""

    def __init__(self, cfg: PixProConfig, backbone):
        # the official placement: at the start of step t, before the target pass, with m(t)
        super().__init__(cfg, backbone, MomentumSchedule(cfg.momentum_base, cfg.momentum_end),
                         update_for_next_step=True)
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

    def momentum_pairs(self):
        pairs = [(self.target_backbone, self.backbone), (self.target_projector, self.projector)]
        if self.use_instance:
            pairs.append((self.target_projector_instance, self.projector_instance))
        return pairs

    def _per_call(self, fn, views):
        """fn over the views: one call per resolution (BN over both views), or per view (`bn_per_view`)."""
        if self.cfg.bn_per_view:
            return [fn(v) for v in views]
        return forward_by_resolution(fn, views)

    def _c5(self, backbone, views):
        return self._per_call(lambda x: backbone(x, stages=("c5",))["c5"], views)

    def positive_masks(self, batch: dict, grid1, grid2) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(view-1 x view-2 positives (B, N1, N2), view-2 x view-1 positives (B, N2, N1), statistics)."""
        raise NotImplementedError

    def forward(self, views, batch):
        if len(views) != 2:
            raise ValueError(f"PixPro takes exactly 2 views, the recipe gives {len(views)}")
        if "box" not in batch:
            raise ValueError("PixPro needs the views' geometry: batch['box'] (and batch['flip']), one per view")
        cfg = self.cfg
        f1, f2 = self._c5(self.backbone, views)
        x1, x2 = self._per_call(self.projector, [f1, f2])
        mask12, mask21, stats = self.positive_masks(batch, tuple(f1.shape[-2:]), tuple(f2.shape[-2:]))
        with torch.no_grad():
            g1, g2 = self._c5(self.target_backbone, views)
            k1, k2 = (F.normalize(k.float(), dim=1).flatten(2)
                      for k in self._per_call(self.target_projector, [g1, g2]))
        if cfg.mode == "pixpro":
            q1, q2 = (y.flatten(2) for y in self._per_call(self.ppm, [x1, x2]))
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
            y1, y2 = self._per_call(self.projector_instance, [f1, f2])
            p1, p2 = (p.mean(dim=(2, 3)) for p in self._per_call(self.predictor, [y1, y2]))
            with torch.no_grad():
                z1, z2 = (z.mean(dim=(2, 3)) for z in self._per_call(self.target_projector_instance, [g1, g2]))
            ins = instance_regression(p1, z2) + instance_regression(p2, z1)
            loss = loss + cfg.ins_loss_weight * ins
            out["instance"] = ins.detach()
        out["loss"] = loss
        return out
