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

EMA: as in the official code, the target is updated before each step's target pass, with the
cosine momentum m(k) for k = that step (densessl.methods.momentum). Parameters only; the
target runs in train mode. The networks and the forward are in densessl.methods.pixpro_core.

Both views go through each network in one call when they share a resolution, so BN
statistics are over both views (the official code runs them one view at a time:
`bn_per_view: true`). `crop_coords: code` normalises the crops as the code, j / (W - 1).
Distributed: nothing is gathered across ranks (PixContrast's negatives are the local batch).
"""
from __future__ import annotations

from densessl.data.geometry import pixpro_positive_mask
from densessl.methods import register
from densessl.methods.pixpro_core import PixProConfig, PixProCore


@register("pixpro", PixProConfig)
class PixPro(PixProCore):
    """Positives from the views' crop geometry."""

    def positive_masks(self, batch, grid1, grid2):
        flips = batch.get("flip") or [None, None]
        size = batch.get("source_size")
        if self.cfg.crop_coords == "code" and size is None:
            raise ValueError("method.crop_coords=code needs batch['source_size'] (the source images' width and "
                             "height; collate_views adds it)")
        mask = pixpro_positive_mask(batch["box"][0], flips[0], batch["box"][1], flips[1], grid1, grid2,
                                    self.cfg.pos_threshold, self.cfg.crop_coords, size)
        return mask, mask.transpose(1, 2), {}
