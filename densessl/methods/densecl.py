"""DenseCL (Wang et al., CVPR 2021): MoCo v2 plus a dense InfoNCE between matched positions.

Re-implemented from the paper and the design described in the specs (the official code is
GPL-3.0 and was not copied):
- query encoder: backbone, then two heads on C5: the global MoCo v2 head (GAP -> Linear ->
  ReLU -> Linear, 128-d) and the dense head (1x1 conv -> ReLU -> 1x1 conv, 128-d at every C5
  position); the key encoder is an EMA copy of all three (m = 0.999, updated before the key
  pass, as MoCo: see densessl.methods.momentum), run with shuffle-BN (see densessl.methods.moco);
- correspondence: every query position is matched to the key position whose *backbone* C5
  feature has the highest cosine similarity (argmax over the key view's positions);
- dense loss: InfoNCE at every query position with the matched key vector as positive and the
  dense queue as negatives; the dense queue holds one vector per image, the L2-normalised mean
  over positions of the key's dense head output (not every position, not the matched ones);
- total = (1 - lambda) * global + lambda * dense, lambda = 0.5, T = 0.2 for both terms;
- two queues of K = 65536 columns, written together from the global batch gathered in rank
  order (one shared pointer: the official two pointers always move together).

Warm-up: `warmup_iters` steps with lambda = 0 (only the global loss) while the backbone
features are still too poor for matching (the paper discusses it; mmselfsup offers it as a
hook with 1000 iterations). The shipped configs of the official code and of mmselfsup use
none, so the default is 0.
View 0 is the query, view 1 the key; the loss is not symmetrised (as the official code).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from densessl.common.errors import ConfigError
from densessl.methods import register
from densessl.methods.losses import dense_info_nce, embedding_std, info_nce_loss
from densessl.methods.momentum import KeyQueue, MomentumContrast, make_target, no_autocast
from densessl.models.heads import mlp


@dataclass
class DenseCLConfig:
    name: str = "densecl"
    proj_hidden_dim: Optional[int] = None  # both heads; None: the backbone's C5 channels (2048 for ResNet-50)
    proj_dim: int = 128
    queue_size: int = 65536
    temperature: float = 0.2
    momentum: float = 0.999
    momentum_schedule: str = "const"  # const | cosine (from `momentum` to `momentum_end`)
    momentum_end: float = 1.0
    loss_lambda: float = 0.5  # weight of the dense loss
    warmup_iters: int = 0  # steps with loss_lambda = 0 (dense loss off)
    shuffle_bn: bool = True
    bn_splits: int = 8  # one process: BN groups per batch (see momentum.SplitBatchNorm2d); 1 = off


# ---------------------------------------------------------------- loss math


def match_by_similarity(fq: torch.Tensor, fk: torch.Tensor) -> torch.Tensor:
    """For every query position, the index of the most cosine-similar key position.

    fq (N, C, Sq), fk (N, C, Sk) backbone features flattened over positions -> (N, Sq) long.
    """
    sim = torch.einsum("ncq,nck->nqk", F.normalize(fq.detach().float(), dim=1), F.normalize(fk.float(), dim=1))
    return sim.argmax(dim=2)


def gather_positions(k_grid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """k_grid (N, D, Sk), index (N, Sq) -> (N, D, Sq): the key vector matched to each query position."""
    return torch.gather(k_grid, 2, index.unsqueeze(1).expand(-1, k_grid.shape[1], -1))


def densecl_loss(global_loss: torch.Tensor, dense_loss: torch.Tensor, lam: float) -> torch.Tensor:
    return (1.0 - lam) * global_loss + lam * dense_loss


class DenseHead(nn.Module):
    """1x1 conv -> ReLU -> 1x1 conv: a projection at every spatial position."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden_dim, out_dim, 1))

    def forward(self, x):
        return self.net(x)


@register("densecl", DenseCLConfig)
class DenseCL(MomentumContrast):
    def __init__(self, cfg: DenseCLConfig, backbone):
        if not 0.0 <= cfg.loss_lambda <= 1.0:
            raise ConfigError(f"method.loss_lambda={cfg.loss_lambda} must lie in [0, 1]")
        super().__init__(cfg, backbone)
        hidden = cfg.proj_hidden_dim or backbone.out_dim
        self.head = mlp(backbone.out_dim, hidden, cfg.proj_dim, batch_norm=False)
        for m in self.head.modules():  # the official neck's init of its Linear layers (convs keep torch's)
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        self.dense_head = DenseHead(backbone.out_dim, hidden, cfg.proj_dim)
        self.key_backbone = make_target(backbone)
        self.key_head = make_target(self.head)
        self.key_dense_head = make_target(self.dense_head)
        self.queue = KeyQueue(cfg.queue_size, {"global": cfg.proj_dim, "dense": cfg.proj_dim})

    def momentum_pairs(self):
        return [(self.key_backbone, self.backbone), (self.key_head, self.head),
                (self.key_dense_head, self.dense_head)]

    def _key(self, x):
        c5 = self.key_backbone(x, stages=("c5",))["c5"]
        k = F.normalize(self.key_head(c5.mean(dim=(2, 3))), dim=1)
        dense = self.key_dense_head(c5).flatten(2)
        return c5.flatten(2), k, F.normalize(dense, dim=1), F.normalize(dense.mean(dim=2), dim=1)

    def lam(self) -> float:
        return 0.0 if self.current_step < self.cfg.warmup_iters else self.cfg.loss_lambda

    def forward(self, views, batch):
        if len(views) != 2:
            raise ConfigError(f"DenseCL takes exactly 2 views, the recipe gives {len(views)}")
        c5 = self.backbone(views[0], stages=("c5",))["c5"]
        h = c5.mean(dim=(2, 3))
        q = F.normalize(self.head(h), dim=1)
        q_grid = F.normalize(self.dense_head(c5).flatten(2), dim=1)
        k_c5, k, k_grid, k_pooled = self.key_forward(self._key, views[1])
        queue_g, queue_d = self.queue["global"].clone(), self.queue["dense"].clone()  # enqueue writes in place
        lam = self.lam()
        with no_autocast(q.device):
            index = match_by_similarity(c5.flatten(2), k_c5)
            loss_g = info_nce_loss(q.float(), k.float(), queue_g, self.cfg.temperature)
            loss_d = dense_info_nce(q_grid.float(), gather_positions(k_grid.float(), index), queue_d,
                                    self.cfg.temperature)
            loss = densecl_loss(loss_g, loss_d, lam)
        self.queue.enqueue(**{"global": k, "dense": k_pooled})
        return {
            "loss": loss,
            "global": loss_g.detach(),
            "dense": loss_d.detach(),
            "lambda": loss.detach().new_full((), lam),  # a fill, not a host-to-device copy
            # collapse statistics (0 when collapsed): the global embeddings over the batch, and
            # the dense ones over every position of the batch
            "z_std": embedding_std(q.detach()),
            "dense_z_std": embedding_std(q_grid.detach().permute(0, 2, 1).reshape(-1, q_grid.shape[1])),
            "features": h.detach(),
        }
