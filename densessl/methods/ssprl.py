"""SS-PRL (Hsieh et al., WACV 2023): self-supervised pyramid representation learning.

Faithful to WesleyHsieh0806/SS-PRL @ b0baf49 (specs/methods-swav-ssprl-gaelle.md, section 2):
- level 0: SwAV over the image-level multi-crop (global head, prototypes K_0), codes q_0^a for
  the assignment crops, with the global queue;
- levels s = 1..S: patch views from the recipe's grid groups (ViewConfig.grid = g_s, count 2:
  2 * g_s**2 view slots, view-major, so row r of patch view 0 and row r of patch view 1 show
  the same cell of the same image). Each level has its own head, prototypes (K_s) and queue;
  L_loc^s is SwAV's swapped prediction between the two views of every patch, with Sinkhorn
  over all g_s**2 * B patches of a view (equipartition over patches);
- correlation learner g_phi^s: Linear(K_s -> K_0, no bias), rows normalised like prototypes,
  applied to the L2-normalised per-image mean of the level's local *scores* (cosines to the
  local prototypes, not detached); its output / T predicts the global codes (L_l2g^s, averaged
  over the 2 patch views and the assignment crops);
- L = L_glb + sum_s local_weights[s] L_loc^s + sum_s l2g_weights[s] L_l2g^s;
- all three kinds of prototype matrices are re-normalised before each forward and frozen for
  `freeze_prototypes_iters` iterations (the code's "ptypes" name filter).

View slots: the first len(views) - sum_s 2 g_s**2 slots are the image-level crops, then each
level's patch slots in `grids` order. All slots go through `forward_by_resolution`, so crops and
patches that share a resolution share one backbone call and its BN statistics (the code makes
one call per run of equal widths: at paper scale its 96-px small crops and 96-px 3x3 patches
are separate calls); the structured slots replace the code's fragile width-run slicing.
`separate_level_calls: true` reproduces the code's calls: the crops and each patch level go
through the backbone separately (per resolution within each), 4 calls at paper scale, not 3.

Queues (embeddings z, re-scored each step against the current prototypes of their level):
each queue is used once it is full (`faithful: false`); `faithful: true` reproduces the code's
single shared `use_the_queue` flag: once any queue is full every queue is used, including
queues that still hold zero rows. (In the code the flag is set while looping over the queues,
so the global queue, checked first, can lag one step; here all queues switch in the same step.)

Distributed: as SwAV (densessl/methods/swav.py): Sinkhorn marginals all-reduced; each queue
holds the gathered global rows (the assignment crops' z for the global queue, every patch's z of
each view for the level queues, re-ordered into the 1-process order), and each rank scores its
1/W share of the queued rows in Sinkhorn.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from densessl.common.distributed import world_size
from densessl.methods import register
from densessl.methods.base import forward_by_resolution
from densessl.methods.losses import (cross_entropy_to_codes, embedding_std, sinkhorn_codes, swapped_prediction_loss,
                                    usage_entropy)
from densessl.methods.prototypes import EmbeddingQueue, PrototypeMethod, device_scalar, prototypes, queue_scores
from densessl.models.heads import mlp


@dataclass
class SSPRLConfig:
    name: str = "ssprl"
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    num_prototypes: int = 300  # K_0 (argparse default 3000; the released script 300)
    grids: tuple[int, ...] = (2, 3)  # g_s per patch level, in the recipe's view-group order
    local_prototypes: tuple[int, ...] = (150, 150)  # K_s
    local_weights: tuple[float, ...] = (0.25, 0.25)  # lambda1_s on L_loc^s
    l2g_weights: tuple[float, ...] = (0.25, 0.25)  # lambda2_s on L_l2g^s
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    crops_for_assign: tuple[int, ...] = (0, 1)
    freeze_prototypes_iters: int = 648
    queue_length: int = 1920  # global queue (per assignment crop); 0: none
    local_queue_lengths: tuple[int, ...] = (5000, 5000)  # per level (per patch view); 0: none
    epoch_queue_starts: int = 80
    faithful: bool = False  # true: the code's shared queue flag
    # true: the crops and each patch level get their own backbone calls and BN statistics, as the
    # code (4 calls at paper scale); false: slots of one resolution share a call (3 calls)
    separate_level_calls: bool = False


def pool_patch_scores(scores: torch.Tensor, cells: int) -> torch.Tensor:
    """Per-image mean over an image's patches: scores (cells * B, K), cell-major rows (the rows
    of cell k are images 0..B-1) -> (B, K). Only image i's own patches enter row i."""
    return scores.reshape(cells, -1, scores.shape[-1]).mean(dim=0)


def l2g_loss(level_scores: list[torch.Tensor], cells: int, learner: nn.Linear, global_codes: list[torch.Tensor],
             temperature: float) -> torch.Tensor:
    """L_l2g^s: for each patch view v, logits = learner(normalize(per-image mean of its local
    scores)); CE against every global code, averaged over views and codes."""
    total = level_scores[0].new_zeros((), dtype=torch.float32)
    for s in level_scores:
        logits = learner(F.normalize(pool_patch_scores(s, cells), dim=-1))
        for q in global_codes:
            total = total + cross_entropy_to_codes(q, logits, temperature)
    return total / (len(level_scores) * len(global_codes))


@register("ssprl", SSPRLConfig)
class SSPRL(PrototypeMethod):
    def __init__(self, cfg: SSPRLConfig, backbone):
        super().__init__(cfg, backbone)
        S = len(cfg.grids)
        for key in ("local_prototypes", "local_weights", "l2g_weights", "local_queue_lengths"):
            if len(getattr(cfg, key)) != S:
                raise ValueError(f"method.{key} has {len(getattr(cfg, key))} entries; method.grids={list(cfg.grids)} "
                                 f"defines {S} levels")
        if any(g < 1 for g in cfg.grids):
            raise ValueError(f"method.grids={list(cfg.grids)} must be positive")
        d = cfg.proj_dim
        self.projector = mlp(backbone.out_dim, cfg.proj_hidden_dim, d)
        self.prototypes = prototypes(d, cfg.num_prototypes)
        self.local_heads = nn.ModuleList(mlp(backbone.out_dim, cfg.proj_hidden_dim, d) for _ in cfg.grids)
        self.local_prototypes = nn.ModuleList(prototypes(d, k) for k in cfg.local_prototypes)
        self.l2g_prototypes = nn.ModuleList(prototypes(k, cfg.num_prototypes) for k in cfg.local_prototypes)
        self.queue = EmbeddingQueue(len(cfg.crops_for_assign), cfg.queue_length, d) if cfg.queue_length > 0 else None
        self.local_queues = nn.ModuleDict({str(s): EmbeddingQueue(2, n, d)
                                           for s, n in enumerate(cfg.local_queue_lengths) if n > 0})

    def prototype_layers(self):
        return [self.prototypes, *self.local_prototypes, *self.l2g_prototypes]

    def split_views(self, views: list[torch.Tensor]) -> tuple[int, list[tuple[int, int]]]:
        """Number of image-level crops, and (first slot, slot count) of every patch level."""
        cfg = self.cfg
        n_patch = sum(2 * g * g for g in cfg.grids)
        n_glob = len(views) - n_patch
        if n_glob < 2:
            raise ValueError(
                f"SS-PRL with method.grids={list(cfg.grids)} takes the image-level crops followed by "
                f"2 * g**2 patch slots per level ({n_patch} in all); got {len(views)} view slots. Check that the recipe "
                f"lists one grid group per level (grid: g, count: 2) after the crops, and that the device "
                f"augmentation expands grid groups (densessl.data.views.expand_slots).")
        self.check_views(views, n_glob, "SS-PRL")
        levels, start = [], n_glob
        for g in cfg.grids:
            n = 2 * g * g
            if any(v.shape[-2:] != views[start].shape[-2:] for v in views[start:start + n]):
                raise ValueError(f"SS-PRL: the {n} patch slots of the {g}x{g} level (slots {start}..{start + n - 1}) "
                                 f"must share one size")
            levels.append((start, n))
            start += n
        return n_glob, levels

    def queue_plan(self, B: int) -> tuple[list[int], dict[str, list[int]], bool, dict[str, bool]]:
        """Usable lengths and which queues Sinkhorn uses this step (intended or the shared flag)."""
        started = self.queue_started()
        unit = B * world_size()
        L_glob = self.queue.usable_length(unit) if started and self.queue is not None else 0
        L_loc = {k: q.usable_length(unit) if started else 0 for k, q in self.local_queues.items()}
        full_glob = self.queue is not None and all(self.queue.is_full(i, L_glob) for i in range(len(self.cfg.crops_for_assign)))
        full_loc = {k: all(q.is_full(j, L_loc[k]) for j in range(2)) for k, q in self.local_queues.items()}
        if self.cfg.faithful:
            any_full = full_glob or any(full_loc.values())
            full_glob = any_full and L_glob > 0
            full_loc = {k: any_full and L_loc[k] > 0 for k in full_loc}
        return L_glob, L_loc, full_glob, full_loc

    def terms(self, views: list[torch.Tensor]) -> dict:
        """Loss terms (with their graphs) and statistics; `forward` weighs and detaches them."""
        cfg = self.cfg
        n_glob, levels = self.split_views(views)
        self.normalize_prototypes_()
        if cfg.separate_level_calls:
            h = []
            for first, n in [(0, n_glob), *levels]:
                h += forward_by_resolution(self.backbone.pool, views[first:first + n])
        else:
            h = forward_by_resolution(self.backbone.pool, views)
        B = views[0].shape[0]
        L_glob, L_loc, use_glob, use_loc = self.queue_plan(B)
        pushing = self.queue_started()

        # level 0: SwAV over the image-level crops
        z = self.embed(self.projector, torch.cat(h[:n_glob]))
        scores = self.prototypes(z).float().split(B)
        zs = z.split(B)
        codes = []
        for i, a in enumerate(cfg.crops_for_assign):
            extra = queue_scores(self.queue, i, L_glob, self.prototypes) if use_glob else None
            codes.append(sinkhorn_codes(scores[a], extra, cfg.epsilon, cfg.sinkhorn_iters))
        if pushing and self.queue is not None:
            self._check_length(L_glob, "queue_length", cfg.queue_length, B)
            for i, a in enumerate(cfg.crops_for_assign):
                self.queue.push(i, zs[a], L_glob)
        out = {"glb": swapped_prediction_loss(codes, list(scores), cfg.crops_for_assign, cfg.temperature),
               "usage_entropy": usage_entropy(scores[cfg.crops_for_assign[0]]), "z_std": embedding_std(zs[0]),
               "queue_used": device_scalar(use_glob, z), "features": h[0]}

        # patch levels
        for s, ((start, n), g) in enumerate(zip(levels, cfg.grids)):
            cells = g * g
            zl = self.embed(self.local_heads[s], torch.cat(h[start:start + n]))
            sl = self.local_prototypes[s](zl).float()
            views_s, views_z = list(sl.split(cells * B)), zl.split(cells * B)  # 2 patch views
            key, queue = str(s), self.local_queues[str(s)] if str(s) in self.local_queues else None
            lcodes = []
            for j in range(2):
                extra = queue_scores(queue, j, L_loc[key], self.local_prototypes[s]) if use_loc.get(key) else None
                lcodes.append(sinkhorn_codes(views_s[j], extra, cfg.epsilon, cfg.sinkhorn_iters))
            if pushing and queue is not None:
                self._check_length(L_loc[key], f"local_queue_lengths[{s}]", cfg.local_queue_lengths[s], B)
                for j in range(2):
                    queue.push(j, views_z[j], L_loc[key], blocks=cells)
            out[f"loc_l{s + 1}"] = swapped_prediction_loss(lcodes, views_s, (0, 1), cfg.temperature)
            out[f"l2g_l{s + 1}"] = l2g_loss(views_s, cells, self.l2g_prototypes[s], codes, cfg.temperature)
            out[f"usage_entropy_l{s + 1}"] = usage_entropy(views_s[0])
            out[f"queue_used_l{s + 1}"] = device_scalar(bool(use_loc.get(key)), z)
        return out

    def _check_length(self, L: int, key: str, value: int, B: int) -> None:
        if L == 0:
            raise ValueError(f"method.{key}={value} is shorter than the global batch {B * world_size()}: "
                             f"the queue would never be used; raise it or set it to 0")

    def forward(self, views, batch):
        cfg = self.cfg
        t = self.terms(views)
        loss = t["glb"]
        for s in range(len(cfg.grids)):
            loss = loss + cfg.local_weights[s] * t[f"loc_l{s + 1}"] + cfg.l2g_weights[s] * t[f"l2g_l{s + 1}"]
        out = {k: v.detach() for k, v in t.items()}
        out["loss"] = loss
        return out
