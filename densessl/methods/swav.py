"""SwAV (Caron et al., NeurIPS 2020): swapped prediction of Sinkhorn codes over multi-crop views.

Faithful to facebookresearch/swav @ 06b1b7c (specs/methods-swav-ssprl-gaelle.md, section 1):
- every crop -> backbone (one call per resolution, so BN statistics are per resolution group)
  -> GAP -> projection head (Linear, BN, ReLU, Linear; one call on all crops) -> L2 norm -> z;
- prototypes: Linear(proj_dim -> K, no bias); rows re-normalised to unit norm under no_grad at
  the start of every forward (the optimiser step de-normalises them), so scores are cosines;
- codes q for the assignment crops (`crops_for_assign`, the first two) by Sinkhorn-Knopp on the
  detached scores, in fp32 with autocast off, marginals summed across ranks; the queue's rows
  (re-scored against the current prototypes) are prepended once the queue is full;
- loss: for each assignment crop a, every other crop v predicts q_a with softmax(scores_v / T);
  averaged over the V - 1 predicting crops and over the assignment crops;
- the prototypes get no gradient (hence no momentum, wd or LARS update) during the first
  `freeze_prototypes_iters` iterations (`before_optimizer_step`).

The optimiser is the trainer's (LARS excludes biases and BN parameters, where SwAV's LARC adapts
every parameter), and warm-up starts at 0 (SwAV: `start_warmup`); see docs/methods/swav.md.

Distributed (what crosses ranks, besides DDP's gradients and synchronised BN):
- Sinkhorn: the global max of the scores (all-reduce MAX, a shift that changes nothing), the
  total mass and the per-prototype marginals (all-reduce SUM); the per-sample normalisation is
  local. B = local rows x world size. So W processes give the codes of 1 process on the
  concatenated batch (tested with two gloo processes).
- Queue: each rank enqueues the gathered global batch of the assignment crops' embeddings
  (`concat_all_gather`, rank order), so every rank holds the whole queue, identical to the
  1-process queue, and checkpoints (written by rank 0) hold all of it. In Sinkhorn each rank
  scores only its 1/W share of the queue's rows: every queued row enters the all-reduced
  marginals once, as in SwAV's per-GPU queues, and since Sinkhorn treats its rows as a set the
  codes equal those of 1 process.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from densessl.common.distributed import world_size
from densessl.methods import register
from densessl.methods.base import forward_by_resolution
from densessl.methods.losses import embedding_std, sinkhorn_codes, swapped_prediction_loss, usage_entropy
from densessl.methods.prototypes import EmbeddingQueue, PrototypeMethod, device_scalar, prototypes, queue_scores
from densessl.models.heads import mlp


@dataclass
class SwAVConfig:
    name: str = "swav"
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    num_prototypes: int = 3000
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    crops_for_assign: tuple[int, ...] = (0, 1)
    freeze_prototypes_iters: int = 313  # iterations without prototype updates (~1 epoch)
    queue_length: int = 0  # embeddings per assignment crop (global); 0: no queue
    epoch_queue_starts: int = 15


@register("swav", SwAVConfig)
class SwAV(PrototypeMethod):
    def __init__(self, cfg: SwAVConfig, backbone):
        super().__init__(cfg, backbone)
        self.projector = mlp(backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.prototypes = prototypes(cfg.proj_dim, cfg.num_prototypes)
        self.queue = EmbeddingQueue(len(cfg.crops_for_assign), cfg.queue_length, cfg.proj_dim) \
            if cfg.queue_length > 0 else None

    def prototype_layers(self):
        return [self.prototypes]

    def forward(self, views, batch):
        cfg = self.cfg
        self.check_views(views, len(views), "SwAV")
        self.normalize_prototypes_()
        h = forward_by_resolution(self.backbone.pool, views)
        B = views[0].shape[0]
        z = self.embed(self.projector, torch.cat(h))
        scores = self.prototypes(z).float().split(B)
        zs = z.split(B)
        codes, used = self.assign(scores, zs, B)
        loss = swapped_prediction_loss(codes, list(scores), cfg.crops_for_assign, cfg.temperature)
        return {
            "loss": loss,
            "swav": loss.detach(),
            "usage_entropy": usage_entropy(scores[cfg.crops_for_assign[0]]),
            "z_std": embedding_std(zs[0]),
            "queue_used": device_scalar(used, loss),
            "features": h[0].detach(),
        }

    def assign(self, scores, zs, B: int):
        """Codes of the assignment crops (queue prepended when full), then the queue push."""
        cfg = self.cfg
        queue, started = self.queue, self.queue is not None and self.queue_started()
        L = queue.usable_length(B * world_size()) if started else 0
        if started and L == 0:
            raise ValueError(f"method.queue_length={cfg.queue_length} is shorter than the global batch "
                             f"{B * world_size()}: the queue would never be used; raise it or set it to 0")
        codes, used = [], False
        for i, a in enumerate(cfg.crops_for_assign):
            extra = None
            if started and queue.is_full(i, L):
                extra, used = queue_scores(queue, i, L, self.prototypes), True
            codes.append(sinkhorn_codes(scores[a], extra, cfg.epsilon, cfg.sinkhorn_iters))
        if started:
            for i, a in enumerate(cfg.crops_for_assign):
                queue.push(i, zs[a], L)
        return codes, used
