"""Prototype banks and embedding queues of the SwAV family (SwAV, SS-PRL, GAELLE).

A prototype bank is a Linear(dim -> K, no bias) whose rows are re-normalised to unit norm
before each forward (the optimiser step de-normalises them), so its outputs are cosines; the
banks get no gradient during the first `freeze_prototypes_iters` iterations. A queue keeps
past embeddings (not scores), re-scored each step against the current prototypes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from densessl.common.distributed import concat_all_gather, rank, world_size
from densessl.methods.base import Method


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
        r = rank()
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
    """A 0-d statistic on `like`'s device, made without a host-to-device copy."""
    return torch.full((), float(value), device=like.device)


class PrototypeMethod(Method):
    """Shared by SwAV, SS-PRL and GAELLE: prototype banks (normalised before each forward,
    frozen for `freeze_prototypes_iters`), queue timing, and the projection head + prototypes.
    The config has freeze_prototypes_iters, epoch_queue_starts and crops_for_assign."""

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
