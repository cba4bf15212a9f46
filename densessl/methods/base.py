"""The contract between a method and the trainer (densessl.engine.trainer), as code.

A method is a `Method`: an nn.Module built from its config dataclass and the online backbone,
registered under its config's name (densessl.methods.register). `check_outputs` states what
`forward` returns; the method tests check it after every training step (tests/methods/fixed_batch.py).
"""
from __future__ import annotations

import abc
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

LOSS = "loss"  # the 0-d loss the trainer backpropagates
FEATURES = "features"  # (B, C) detached pooled backbone features of view 0: the online probe's input
Z_STD = "z_std"  # optional 0-d collapse statistic; the trainer warns when it falls (collapse_warning)


class Method(nn.Module, abc.ABC):
    """What every method provides to the trainer, and what the trainer provides to it.

    Set by the trainer:
      current_step     global index of the step about to run, set before each forward
      steps_per_epoch  set once, after construction
      total_steps      set once, after construction (also passed to after_step)
    Read by the trainer:
      backbone         the online backbone: evaluation, export and the kNN monitor use it
      momentum         the EMA momentum of the step just taken, logged; None without a target
    Called by the trainer, per step, in this order: forward under autocast, backward,
    before_optimizer_step, the optimiser step, after_step.
    """

    current_step: int = 0
    steps_per_epoch: int = 1
    total_steps: int = 1
    momentum: Optional[float] = None

    def __init__(self, cfg, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone

    @abc.abstractmethod
    def forward(self, views: list[torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        """views: one float tensor per view slot, on the device. batch: the collated non-view
        entries on the device (geometry: batch["box"], batch["flip"], one per view; labels), and
        batch["cpu"], the geometry on the host for boxes drawn on the CPU.

        Returns LOSS, FEATURES and named 0-d tensors (loss terms and statistics, detached): the
        trainer sums every 0-d entry on the device and logs its mean, with no host sync per step.
        """

    def before_optimizer_step(self, step: int) -> None:
        """Between backward and the optimiser step (SwAV drops the prototypes' gradient here)."""

    def after_step(self, step: int, total_steps: int) -> None:
        """After the optimiser step of `step` (the EMA update: densessl.methods.momentum)."""

    def view_dataset(self, dataset: Dataset, cfg) -> Optional[tuple[Dataset, Callable]]:
        """(view dataset keyed by (epoch, index), collate function) for the trainer's loader, for a
        method that makes its own views from `dataset` (the video variant's frame pairs); None:
        the trainer's image views (ViewDataset / collate_views) from the recipe's `views:`."""
        return None


def check_outputs(out: dict) -> None:
    """Raise if `out` breaks the contract of Method.forward."""
    loss, features = out.get(LOSS), out.get(FEATURES)
    if not (torch.is_tensor(loss) and loss.ndim == 0):
        raise ValueError(f"a method's forward must return a 0-d '{LOSS}', got {loss!r:.80}")
    if not (torch.is_tensor(features) and features.ndim == 2 and not features.requires_grad):
        raise ValueError(f"'{FEATURES}' must be detached (B, C) pooled features of view 0, got "
                         f"{getattr(features, 'shape', features)}")
    for name, v in out.items():
        if name not in (LOSS, FEATURES) and not (torch.is_tensor(v) and v.ndim == 0 and not v.requires_grad):
            raise ValueError(f"'{name}' must be a detached 0-d tensor, got {getattr(v, 'shape', v)}")


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
