"""SCRL (Roh et al., "Spatially Consistent Representation Learning", CVPR 2021).

BYOL in which the pooled image vector is replaced by RoI features of box pairs that cover the
same region of the source image in both views (densessl.data.geometry.scrl_boxes). Every step
the boxes are drawn on the CPU from the batch's geometry, with a generator seeded from
(box_seed, current_step, rank), so runs are reproducible. Each box gives one vector:
torchvision roi_align on C5 with a 1x1 output, spatial_scale = C5 side / view side (1/32 for
ResNet-50), sampling_ratio=-1 (adaptive), aligned=False, as the official code. Projector and
predictor are Linear-BN-ReLU-Linear without the last bias, applied to the batch of boxes of
both views (BN statistics over boxes). Loss: BYOL's symmetric 2 - 2cos per box pair, mean
over all box pairs of the batch, in [0, 8]. There is no image-level loss; the GAP feature
only feeds the online probe. The EMA target (parameters only, cosine momentum) is updated
after the optimiser step, as the official code.

Samples whose crops do not overlap enough get no boxes and contribute nothing. When a whole
(local) batch has no boxes the loss is a zero that touches every trainable parameter, so
backward and DDP's gradient all-reduce still run; with synchronised batch norm the heads
also run on an empty batch of boxes so every rank takes part in the BN all-reduce.

Host sync: the geometry is read on the CPU at the start of forward (one small device-to-host
copy on a GPU); the boxes go back with a non-blocking copy.
Distributed: nothing is gathered across ranks; boxes are drawn per rank (the rank is part of
the seed) and the loss mean is over the local box pairs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import roi_align

from densessl.data.geometry import scrl_boxes
from densessl.common.distributed import AllReduceBatchNorm, rank
from densessl.methods import register
from densessl.methods.base import forward_by_resolution
from densessl.methods.losses import byol_loss, embedding_std
from densessl.methods.momentum import MomentumMethod, MomentumSchedule, make_target
from densessl.models.heads import mlp


@dataclass
class SCRLConfig:
    name: str = "scrl"
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    momentum_base: float = 0.97  # 200-epoch config; 0.996 for 1000 epochs
    momentum_end: float = 1.0  # cosine from momentum_base to this (1.0: the paper); short runs: < 1
    num_boxes: int = 10  # box pairs per sample with a large enough crop intersection
    min_size: int = 32  # minimum box side, in pixels of the less-zoomed view
    iou_threshold: float = 0.5  # a new box must overlap every kept box of its sample less than this
    max_tries: int = 50  # draws per box before the last draw is kept anyway
    grid: bool = True  # grid-based box generation (official default) or uniform random boxes
    box_seed: int = 0
    faithful: bool = False  # True: the target starts from its own random init (official code), not a copy

    def __post_init__(self):
        from densessl.config import ConfigError

        for key in ("num_boxes", "min_size", "max_tries"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key 'method.{key}' expects a positive integer, got {getattr(self, key)!r}")


def roi_features(c5: torch.Tensor, rois: torch.Tensor, view_size: int) -> torch.Tensor:
    """(N, C) RoI-aligned C5 features of boxes given in view pixels (1x1 output, SCRL's settings)."""
    scale = c5.shape[-1] / view_size
    out = roi_align(c5.float(), rois.to(c5.device, torch.float32), output_size=(1, 1), spatial_scale=scale,
                    sampling_ratio=-1, aligned=False)
    return out.flatten(1)


def scrl_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over box pairs of l(p1_i, z2_i) + l(p2_i, z1_i); p, z are [view-1 boxes; view-2 boxes]."""
    p1, p2 = p.chunk(2)
    z1, z2 = z.chunk(2)
    return byol_loss(p1.float(), p2.float(), z1.float(), z2.float())


def _has_collective_bn(module: nn.Module) -> bool:
    return any(isinstance(m, (AllReduceBatchNorm, nn.SyncBatchNorm)) for m in module.modules())


@contextlib.contextmanager
def _kept_bn_stats(*modules: nn.Module, active: bool = True):
    """Restore the BN running statistics of `modules` on exit (when active)."""
    saved = []
    if active:
        for mod in modules:
            for m in mod.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                    saved.append((m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


@torch.no_grad()
def reinit_(module: nn.Module) -> None:
    """Fresh weights with torchvision's ResNet init (convs kaiming-normal fan-out, BN 1/0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            m.reset_parameters()


@register("scrl", SCRLConfig)
class SCRL(MomentumMethod):
    def __init__(self, cfg: SCRLConfig, backbone):
        # the official placement: after step t, with m(t)
        super().__init__(cfg, backbone, MomentumSchedule(cfg.momentum_base, cfg.momentum_end),
                         update_for_next_step=False)
        self.projector = mlp(backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_dim, last_bias=False)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, last_bias=False)
        self.target_backbone = make_target(backbone)
        self.target_projector = make_target(self.projector)
        if cfg.faithful:
            reinit_(self.target_backbone)
            reinit_(self.target_projector)

    def momentum_pairs(self):
        return [(self.target_backbone, self.backbone), (self.target_projector, self.projector)]

    def _seed(self) -> int:
        return ((self.cfg.box_seed * 1_000_003 + int(self.current_step)) * 4096 + rank()) % (2 ** 63)

    def boxes(self, views, batch):
        """The step's box pairs (CPU tensors), drawn from the batch geometry."""
        if "box" not in batch:
            raise ValueError("SCRL needs the views' geometry: batch['box'] (and batch['flip']), one per view")
        sizes = []
        for v in views:
            if v.shape[-1] != v.shape[-2]:
                raise ValueError(f"SCRL expects square views, got {tuple(v.shape[-2:])}")
            sizes.append(v.shape[-1])
        geometry = batch.get("cpu", batch)  # the trainer keeps a host copy: no device sync here
        box1, box2 = geometry["box"][0], geometry["box"][1]
        flips = geometry.get("flip") or [None, None]
        f1, f2 = (torch.zeros(box1.shape[0], device=box1.device) if f is None else f for f in flips)
        # one device-to-host copy of the whole geometry
        geo = torch.cat([box1.float(), box2.float(), f1.float()[:, None], f2.float()[:, None]], dim=1).cpu()
        gen = torch.Generator().manual_seed(self._seed())
        c = self.cfg
        return scrl_boxes(geo[:, 0:4], geo[:, 8] > 0.5, geo[:, 4:8], geo[:, 9] > 0.5, tuple(sizes),
                          num_boxes=c.num_boxes, min_size=c.min_size, iou_threshold=c.iou_threshold,
                          max_tries=c.max_tries, grid=c.grid, generator=gen)

    def _roi_batch(self, backbone, views, rois1, rois2):
        c5 = forward_by_resolution(lambda x: backbone(x, stages=("c5",))["c5"], views)
        r = torch.cat([roi_features(c5[0], rois1, views[0].shape[-1]),
                       roi_features(c5[1], rois2, views[1].shape[-1])])
        return c5, r

    def forward(self, views, batch):
        if len(views) != 2:
            raise ValueError(f"SCRL takes exactly 2 views, the recipe gives {len(views)}")
        pairs = self.boxes(views, batch)
        B, n = views[0].shape[0], pairs.rois1.shape[0]
        device = views[0].device
        # one non-blocking host-to-device copy: both views' boxes and the statistics
        stats = torch.tensor([[n / B, float(pairs.valid.float().mean()), 0, 0, 0]])
        packed = torch.cat([pairs.rois1, pairs.rois2, stats]).to(device, non_blocking=True)
        rois1, rois2, stats = packed[:n], packed[n:2 * n], packed[2 * n]

        c5, r = self._roi_batch(self.backbone, views, rois1, rois2)
        out = {
            "boxes_per_image": stats[0],
            "valid_pairs": stats[1],
            "features": c5[0].mean(dim=(2, 3)).detach(),
        }
        run_heads = n > 0 or _has_collective_bn(self)
        if run_heads:
            # with no boxes here, the heads run on an empty batch only to join the BN all-reduce;
            # their running statistics are restored (0/0 would make them NaN if no rank had boxes)
            with _kept_bn_stats(self.projector, self.predictor, self.target_projector, active=n == 0):
                p = self.predictor(self.projector(r))
                with torch.no_grad():
                    _, rt = self._roi_batch(self.target_backbone, views, rois1, rois2)
                    z = self.target_projector(rt)
        if n > 0:
            loss = scrl_loss(p, z)
            # collapse statistic: per-dimension std of normalised target projections (~1/sqrt(d) healthy)
            out["z_std"] = embedding_std(z)
        else:
            # no box in this batch: a zero that keeps every trainable parameter in the graph
            loss = sum(q.sum() for q in self.parameters() if q.requires_grad) * 0.0
            loss = loss + c5[0].sum() * 0.0 + c5[1].sum() * 0.0
            if run_heads:
                loss = loss + p.sum() * 0.0
            out["z_std"] = torch.zeros((), device=device)  # same keys every step (metrics are all-reduced by key)
        out["loss"] = loss
        out["scrl"] = loss.detach()
        return out
