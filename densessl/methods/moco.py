"""MoCo v2 (Chen et al., 2020; He et al., 2020): InfoNCE against a momentum encoder's keys.

Faithful to `facebookresearch/moco` run with `--mlp --moco-t 0.2 --aug-plus --cos` (specs, 1.2):
- query encoder: backbone -> Linear(D, D) -> ReLU -> Linear(D, 128), no BN, L2-normalised;
  key encoder: an EMA copy of both (parameters only), m = 0.999 constant by default
  (`momentum_schedule: cosine` raises it to 1 over training), updated before each step's key
  pass with that step's momentum, as the official code does (densessl.methods.momentum runs
  that update right after the previous optimiser step: the same result);
- loss: cross-entropy over [q.k, q.queue] / T with target 0, T = 0.2; one direction
  (view 0 -> query, view 1 -> key). `symmetric: true` adds the other direction and averages
  the two; then both views' keys are enqueued (2 x batch columns per step);
- queue of K keys (65536 at paper scale): the keys of the global batch, gathered from every
  rank in rank order (densessl.methods.momentum.KeyQueue), enqueued after the loss.

Shuffle-BN, which stops the key encoder's batch statistics from leaking which key is the
positive:
- under DDP (train.sync_bn=false, as the recipes set): the key views of all ranks are
  gathered, permuted with a permutation that every rank derives from the same seed (the
  global step), each rank encodes its slice of the shuffled global batch with its own BN, and
  the keys are gathered and unshuffled. This is the official `_batch_shuffle_ddp`, with the
  permutation derived instead of broadcast from rank 0. Synchronised BN would defeat it, so
  shuffle-BN with sync BN across ranks is refused with an error.
- on one process: both encoders' backbones normalise the batch in `bn_splits` groups
  (SplitBatchNorm, CGH/ReSSL's single-GPU path; 8 groups by default), and the key views are
  shuffled before the key pass and unshuffled after it, so a query and its key are normalised
  with different groups of images, as on 8 GPUs. Inference (eval mode) is plain BN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from densessl.methods import register
from densessl.methods.losses import info_nce_logits, info_nce_loss
from densessl.methods.momentum import KeyQueue, MomentumContrast, make_target, no_autocast
from densessl.models.heads import mlp


@dataclass
class MoCoConfig:
    name: str = "mocov2"
    proj_hidden_dim: Optional[int] = None  # None: the backbone's feature dimension (2048 for ResNet-50)
    proj_dim: int = 128
    queue_size: int = 65536
    temperature: float = 0.2
    momentum: float = 0.999
    momentum_schedule: str = "const"  # const | cosine (from `momentum` to `momentum_end` over training)
    momentum_end: float = 1.0  # cosine's final value (1.0: BYOL's schedule; solo-learn's CIFAR presets: 0.999)
    symmetric: bool = False
    shuffle_bn: bool = True
    bn_splits: int = 8  # one process: BN groups per batch (emulates per-GPU BN + shuffle); 1 = off


@register("mocov2", MoCoConfig)
class MoCo(MomentumContrast):
    def __init__(self, cfg: MoCoConfig, backbone):
        super().__init__(cfg, backbone)
        hidden = cfg.proj_hidden_dim or backbone.out_dim
        self.head = mlp(backbone.out_dim, hidden, cfg.proj_dim, batch_norm=False)
        self.key_backbone = make_target(backbone)
        self.key_head = make_target(self.head)
        self.queue = KeyQueue(cfg.queue_size, {"key": cfg.proj_dim})

    def momentum_pairs(self):
        return [(self.key_backbone, self.backbone), (self.key_head, self.head)]

    def _query(self, x):
        h = self.backbone.pool(x)
        return h, F.normalize(self.head(h), dim=1)

    def _key(self, x):
        return F.normalize(self.key_head(self.key_backbone.pool(x)), dim=1)

    def forward(self, views, batch):
        if len(views) != 2:
            raise ValueError(f"MoCo v2 takes exactly 2 views, the recipe gives {len(views)}")
        h1, q1 = self._query(views[0])
        k2 = self.key_forward(self._key, views[1])
        if self.cfg.symmetric:
            _, q2 = self._query(views[1])
            k1 = self.key_forward(self._key, views[0])
        queue = self.queue["key"].clone()  # a copy: the enqueue below writes in place, backward reads it
        with no_autocast(q1.device):
            logits = info_nce_logits(q1.float(), k2.float(), queue, self.cfg.temperature)
            loss = F.cross_entropy(logits, torch.zeros(len(q1), dtype=torch.long, device=q1.device))
            if self.cfg.symmetric:
                loss = 0.5 * (loss + info_nce_loss(q2.float(), k1.float(), queue, self.cfg.temperature))
        self.queue.enqueue(key=torch.cat([k2, k1]) if self.cfg.symmetric else k2)
        return {
            "loss": loss,
            "infonce": loss.detach(),
            "pos_sim": (logits[:, 0] * self.cfg.temperature).mean().detach(),
            "neg_sim": (logits[:, 1:] * self.cfg.temperature).mean().detach(),
            "top1": (logits.argmax(dim=1) == 0).float().mean().detach(),
            "features": h1.detach(),
        }
