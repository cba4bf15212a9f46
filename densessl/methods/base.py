"""What every method provides to the trainer.

A method is an nn.Module built from its config dataclass and an online backbone. Its
forward takes the augmented views (one float tensor per view slot, on the device) and the
collated batch (geometry: batch["box"], batch["flip"] on the device, and the same on the host
in batch["cpu"] for geometry computed on the CPU), and returns a dict with "loss" plus
named terms and statistics as 0-d tensors (the trainer logs them without host syncs), and
"features": detached pooled backbone features of the first view for the online probe.
`after_step(step, total_steps)` runs after each optimiser step (EMA updates live there);
`before_optimizer_step(step)` runs between backward and the optimiser step (e.g. SwAV drops
the prototypes' gradient during its first iterations). Before each forward the trainer sets
`current_step` (global step index) and, once, `steps_per_epoch` and `total_steps`, for
methods whose loss weights or queues depend on the position in training.
"""
from __future__ import annotations

import torch
from torch import nn


class Method(nn.Module):
    def __init__(self, cfg, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone  # the online backbone: what evaluation and export use

    def forward(self, views: list[torch.Tensor], batch: dict) -> dict:
        raise NotImplementedError

    current_step: int = 0
    steps_per_epoch: int = 1
    total_steps: int = 1

    def before_optimizer_step(self, step: int) -> None:
        pass

    def after_step(self, step: int, total_steps: int) -> None:
        pass


def group_by_resolution(views: list[torch.Tensor]) -> list[list[int]]:
    """Indices of view slots sharing a resolution, so each group runs through one call."""
    groups: dict[tuple, list[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault(tuple(v.shape[-2:]), []).append(i)
    return list(groups.values())


def forward_by_resolution(fn, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Apply fn to views concatenated per resolution; return outputs per view slot."""
    out: list = [None] * len(views)
    for idx in group_by_resolution(views):
        y = fn(torch.cat([views[i] for i in idx]))
        for i, chunk in zip(idx, y.chunk(len(idx))):
            out[i] = chunk
    return out
