"""MoCo v2 (Chen et al., 2020; He et al., 2020): InfoNCE against a momentum encoder's keys.

Faithful to `facebookresearch/moco` run with `--mlp --moco-t 0.2 --aug-plus --cos` (specs, 1.2):
- query encoder: backbone -> Linear(D, D) -> ReLU -> Linear(D, 128), no BN, L2-normalised;
  key encoder: an EMA copy of both (parameters only), m = 0.999 constant by default
  (`momentum_schedule: cosine` raises it to 1 over training), updated *inside forward, before
  the key pass*, as the official code does;
- loss: cross-entropy over [q.k, q.queue] / T with target 0, T = 0.2; one direction
  (view 0 -> query, view 1 -> key). `symmetric: true` adds the other direction and averages
  the two; then both views' keys are enqueued (2 x batch columns per step);
- queue of K keys (65536 at paper scale): the keys of the global batch, gathered from every
  rank in rank order (see densessl.methods.queue), enqueued after the loss.

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
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from densessl.engine.distributed import AllReduceBatchNorm, concat_all_gather, world_size
from densessl.engine.ema import ema_update_, make_target
from densessl.engine.schedules import cosine_momentum
from densessl.methods import register
from densessl.methods.base import Method
from densessl.methods.queue import KeyQueue
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


# ---------------------------------------------------------------- loss math


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """[q.k, q.queue] / T, shape (N, 1 + K); q, k (N, d) normalised, queue (d, K)."""
    l_pos = (q * k.detach()).sum(dim=1, keepdim=True)
    l_neg = q @ queue.detach()
    return torch.cat([l_pos, l_neg], dim=1) / temperature


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of -log softmax(logits)[0]: the positive key is class 0."""
    logits = info_nce_logits(q, k, queue, temperature)
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def momentum_at(step: int, total_steps: int, base: float, schedule: str, final: float = 1.0) -> float:
    if schedule == "const":
        return base
    if schedule == "cosine":
        return cosine_momentum(step, total_steps, base, final)
    raise ValueError(f"method.momentum_schedule={schedule!r}; expected 'const' or 'cosine'")


# ---------------------------------------------------------------- shuffle-BN


def _rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def shuffle_permutation(n_global: int, step: int, device) -> torch.Tensor:
    """A permutation of the global batch that every rank derives alike from the step index."""
    g = torch.Generator(device=device)
    g.manual_seed((step * 2654435761 + 97) % (2 ** 62))
    return torch.randperm(n_global, generator=g, device=device)


def batch_shuffle(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the gathered global batch, permuted by `perm` (no gradient)."""
    x_all = concat_all_gather(x)
    return x_all[perm.view(world_size(), -1)[_rank()]]


def batch_unshuffle(y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of batch_shuffle: gather the outputs and take back this rank's original samples."""
    y_all = concat_all_gather(y)
    return y_all[torch.argsort(perm).view(world_size(), -1)[_rank()]]


@torch.no_grad()
def shuffled_forward(fn, x: torch.Tensor, step: int):
    """fn on the batch shuffled across ranks (within the batch on one process); outputs unshuffled.

    `fn` returns a tensor or a tuple of tensors, each with the batch on dim 0.
    """
    perm = shuffle_permutation(x.shape[0] * world_size(), step, x.device)
    out = fn(batch_shuffle(x, perm))
    if isinstance(out, tuple):
        return tuple(batch_unshuffle(o, perm) for o in out)
    return batch_unshuffle(out, perm)


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, training on one process, normalises the batch in `num_splits` groups.

    Group g holds samples g, g + G, g + 2G, ... (one call: the batch is folded into channels).
    Running statistics are the mean over groups. Under DDP, or in eval mode, it is plain BN
    (state_dict keys are BatchNorm2d's, so exports and evaluation are unaffected).
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G = self.num_splits
        if not self.training or G == 1 or world_size() > 1:
            return super().forward(x)
        N, C, H, W = x.shape
        if N % G:
            raise ValueError(f"method.bn_splits={G} must divide the per-process batch ({N} samples); "
                             f"change train.batch_size or method.bn_splits")
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1)
        else:
            factor = self.momentum
        rm, rv = self.running_mean.repeat(G), self.running_var.repeat(G)
        w = self.weight.repeat(G) if self.affine else None
        b = self.bias.repeat(G) if self.affine else None
        y = F.batch_norm(x.reshape(N // G, C * G, H, W), rm, rv, w, b, True, factor, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(rm.view(G, C).mean(0))
            self.running_var.copy_(rv.view(G, C).mean(0))
            self.num_batches_tracked.add_(1)
        return y.reshape(N, C, H, W)


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place, recursively) by a SplitBatchNorm2d."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                   affine=child.affine, track_running_stats=child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_split_bn(child, num_splits)
    return module


def check_per_rank_bn(module: nn.Module, method: str) -> None:
    """Shuffle-BN needs per-rank batch norm: refuse BN synchronised across ranks."""
    if world_size() > 1 and any(isinstance(m, (AllReduceBatchNorm, nn.SyncBatchNorm)) for m in module.modules()):
        raise ValueError(f"{method} uses shuffle-BN, which needs per-rank batch norm, but batch norm is "
                         f"synchronised across ranks: set train.sync_bn=false (the recipes do), or "
                         f"method.shuffle_bn=false")


class MomentumMixin:
    """Shared by MoCo, DenseCL and CGH: EMA before the key pass, shuffle-BN checks."""

    def _setup_bn(self, backbone: nn.Module) -> None:
        if self.cfg.shuffle_bn and self.cfg.bn_splits > 1:
            convert_split_bn(backbone, self.cfg.bn_splits)
        self._bn_checked = False

    @torch.no_grad()
    def _momentum_update(self, pairs) -> None:
        if not self._bn_checked:
            if self.cfg.shuffle_bn:
                check_per_rank_bn(self, self.cfg.name)
            self._bn_checked = True
        self.momentum = momentum_at(self.current_step, self.total_steps, self.cfg.momentum,
                                    self.cfg.momentum_schedule, self.cfg.momentum_end)
        for target, online in pairs:
            ema_update_(target, online, self.momentum)

    def _key_forward(self, fn, x: torch.Tensor):
        if self.cfg.shuffle_bn:
            return shuffled_forward(fn, x, self.current_step)
        with torch.no_grad():
            return fn(x)


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


@register("mocov2", MoCoConfig)
class MoCo(MomentumMixin, Method):
    def __init__(self, cfg: MoCoConfig, backbone):
        super().__init__(cfg, backbone)
        momentum_at(0, 1, cfg.momentum, cfg.momentum_schedule)  # validate the schedule name early
        self._setup_bn(backbone)
        hidden = cfg.proj_hidden_dim or backbone.out_dim
        self.head = mlp(backbone.out_dim, hidden, cfg.proj_dim, batch_norm=False)
        self.key_backbone = make_target(backbone)
        self.key_head = make_target(self.head)
        self.queue = KeyQueue(cfg.queue_size, {"key": cfg.proj_dim})
        self.momentum = cfg.momentum

    def _query(self, x):
        h = self.backbone.pool(x)
        return h, F.normalize(self.head(h), dim=1)

    def _key(self, x):
        return F.normalize(self.key_head(self.key_backbone.pool(x)), dim=1)

    def forward(self, views, batch):
        if len(views) != 2:
            raise ValueError(f"MoCo v2 takes exactly 2 views, the recipe gives {len(views)}")
        h1, q1 = self._query(views[0])
        self._momentum_update([(self.key_backbone, self.backbone), (self.key_head, self.head)])
        k2 = self._key_forward(self._key, views[1])
        if self.cfg.symmetric:
            _, q2 = self._query(views[1])
            k1 = self._key_forward(self._key, views[0])
        queue = self.queue["key"].clone()  # a copy: the enqueue below writes in place, backward reads it
        with _no_autocast(q1.device):  # the loss in fp32: bf16 logits / 0.2 would round to ~0.03
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
