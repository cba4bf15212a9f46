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

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from densessl.engine.distributed import all_reduce_sum, concat_all_gather, world_size
from densessl.methods import register
from densessl.methods.base import Method, forward_by_resolution
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


# ---------------------------------------------------------------- loss math (pure functions)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iters: int = 3) -> torch.Tensor:
    """SwAV's distributed Sinkhorn-Knopp: soft codes (B_loc, K) of scores (B_loc, K).

    fp32 with autocast off. Prototype marginals are summed across ranks, so the rows of all
    ranks form one transport problem with B = B_loc * world size samples. Each returned row sums
    to exactly 1 (the last step normalises per sample); the prototype marginals approach 1/K of
    the mass as `iters` grows. A global shift of the scores (and a per-prototype one) leaves the
    result unchanged; the global max is subtracted first so exp cannot overflow.
    """
    with torch.autocast(scores.device.type, enabled=False):
        s = scores.detach().float()
        shift = s.max()
        if world_size() > 1:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX)
        Q = torch.exp((s - shift) / epsilon).t()  # K x B_loc
        K, n = Q.shape
        B = n * world_size()
        tiny = torch.finfo(Q.dtype).tiny
        Q /= all_reduce_sum(Q.sum()).clamp_min(tiny)
        for _ in range(iters):
            Q /= all_reduce_sum(Q.sum(dim=1, keepdim=True)).clamp_min(tiny)  # per-prototype mass
            Q /= K
            Q /= Q.sum(dim=0, keepdim=True).clamp_min(tiny)  # per-sample mass (local)
            Q /= B
        return (Q * B).t()


def sinkhorn_codes(scores: torch.Tensor, queue_scores: torch.Tensor | None = None, epsilon: float = 0.05,
                   iters: int = 3) -> torch.Tensor:
    """Codes of `scores`' rows; `queue_scores` rows join the transport problem and are dropped."""
    s = scores if queue_scores is None else torch.cat([queue_scores.to(scores.dtype), scores])
    return sinkhorn(s, epsilon, iters)[-scores.shape[0]:]


def cross_entropy_to_codes(codes: torch.Tensor, scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """-mean_rows sum_k q[k] log softmax(scores / T)[k], in fp32; codes are constants."""
    return -(codes.detach() * F.log_softmax(scores.float() / temperature, dim=-1)).sum(dim=-1).mean()


def swapped_prediction_loss(codes: list[torch.Tensor], scores: list[torch.Tensor], assign: tuple[int, ...],
                            temperature: float) -> torch.Tensor:
    """SwAV's loss: codes[i] is the code of crop assign[i]; scores[v] the cosines of crop v.

    L = mean_i (1 / (V - 1)) sum_{v != assign[i]} CE(codes[i], softmax(scores[v] / T)).
    """
    V = len(scores)
    total = scores[0].new_zeros((), dtype=torch.float32)
    for q, a in zip(codes, assign):
        sub = sum(cross_entropy_to_codes(q, scores[v], temperature) for v in range(V) if v != a)
        total = total + sub / (V - 1)
    return total / len(assign)


def usage_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the hard prototype usage argmax_k scores over the rows: 0 when every
    sample picks one prototype (collapse); at most ln min(rows, K). No host sync."""
    idx = scores.detach().argmax(dim=-1)
    counts = torch.zeros(scores.shape[-1], device=scores.device).scatter_add_(
        0, idx, torch.ones_like(idx, dtype=torch.float32))
    p = counts / idx.numel()
    return -torch.special.xlogy(p, p).sum()


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of unit-norm embeddings (1/sqrt(d) when spread, 0 at collapse)."""
    return F.normalize(z.detach().float(), dim=-1).std(dim=0).mean()


# ---------------------------------------------------------------- queue and prototype helpers


class EmbeddingQueue(nn.Module):
    """FIFO of past embeddings, newest first, one queue per slot: buffer (slots, length, dim).

    Holds the rows of the global batch on every rank (pushes are gathered); `rows_pushed`
    per slot travels in the state_dict, so a resumed run knows whether the queue is full.
    The usable length is rounded down to a multiple of the global batch (as SwAV does).
    """

    def __init__(self, slots: int, length: int, dim: int):
        super().__init__()
        self.register_buffer("queue", torch.zeros(slots, length, dim))
        self.rows_pushed = [0] * slots

    def get_extra_state(self):
        return {"rows_pushed": list(self.rows_pushed)}

    def set_extra_state(self, state):
        self.rows_pushed = [int(x) for x in state["rows_pushed"]]

    def usable_length(self, global_batch: int) -> int:
        L = self.queue.shape[1]
        return L - L % global_batch

    def is_full(self, slot: int, length: int) -> bool:
        return length > 0 and self.rows_pushed[slot] >= length

    def rank_rows(self, slot: int, length: int) -> torch.Tensor:
        """This rank's 1/W share of the first `length` rows (length is a multiple of W)."""
        n = length // world_size()
        r = _rank()
        return self.queue[slot, r * n:(r + 1) * n]

    @torch.no_grad()
    def push(self, slot: int, z: torch.Tensor, length: int, blocks: int = 1) -> None:
        """Enqueue the gathered rows of z (this rank's rows, `blocks` blocks of per-image rows,
        e.g. one per patch cell), in the order one process would have them."""
        z = z.detach().to(self.queue.dtype)
        W = world_size()
        if W > 1:
            g = concat_all_gather(z.contiguous())
            z = g.view(W, blocks, -1, g.shape[-1]).transpose(0, 1).reshape(-1, g.shape[-1])
        if length <= 0:
            return
        q = self.queue[slot, :length]
        n = min(z.shape[0], length)
        if n < length:
            q[n:] = q[:length - n].clone()
        q[:n] = z[:n]
        self.rows_pushed[slot] += z.shape[0]


def prototypes(dim: int, k: int) -> nn.Linear:
    return nn.Linear(dim, k, bias=False)


@torch.no_grad()
def normalize_rows_(layer: nn.Linear) -> None:
    layer.weight.copy_(F.normalize(layer.weight, dim=1))


def queue_scores(queue: EmbeddingQueue, slot: int, length: int, layer: nn.Linear) -> torch.Tensor:
    """Scores of this rank's share of a queue against the current (normalised) prototypes."""
    with torch.no_grad(), torch.autocast(queue.queue.device.type, enabled=False):
        return queue.rank_rows(slot, length) @ layer.weight.detach().float().t()


def device_scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((), float(value), device=like.device)


class PrototypeMethod(Method):
    """Shared by SwAV, SS-PRL and GAELLE: prototype banks (normalised before each forward,
    frozen for `freeze_prototypes_iters`), queue timing, and the projection head + prototypes."""

    def prototype_layers(self) -> list[nn.Linear]:
        raise NotImplementedError

    def normalize_prototypes_(self) -> None:
        for layer in self.prototype_layers():
            normalize_rows_(layer)

    def before_optimizer_step(self, step: int) -> None:
        if step < self.cfg.freeze_prototypes_iters:
            for layer in self.prototype_layers():
                layer.weight.grad = None

    def queue_started(self) -> bool:
        return self.training and self.current_step >= self.cfg.epoch_queue_starts * self.steps_per_epoch

    def embed(self, head: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(head(h), dim=-1)

    def check_views(self, views: list[torch.Tensor], n_crops: int, what: str) -> None:
        assign = self.cfg.crops_for_assign
        if n_crops < 2 or not assign or max(assign) >= n_crops or min(assign) < 0:
            raise ValueError(f"{what}: method.crops_for_assign={list(assign)} needs at least 2 crops and indices "
                             f"below the number of crops ({n_crops}); the recipe's views give {len(views)} view slots")
        size = views[assign[0]].shape[-2:]
        if any(views[a].shape[-2:] != size for a in assign):
            raise ValueError(f"{what}: the assignment crops {list(assign)} must share a resolution")


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
