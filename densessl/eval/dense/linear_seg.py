"""Linear segmentation probe on frozen features (DINOv2's BNHead "linear", Leopart's probe).

Head: BatchNorm + 1x1 conv on one stage map, or on several stages upsampled bilinearly to
the finest of them and concatenated (the multi-stage "+ms" variant; computed stage by stage
at native resolution, see :class:`BNLinearHead`); logits upsampled bilinearly to the label
size; cross-entropy with ignore_index 255. The features are the cached maps of
:class:`~densessl.eval.dense.features.DenseSplit` (the backbone never runs here). AdamW,
``seg.epochs`` passes over the images in ``seg.batch_size`` batches, cosine learning-rate
decay per step to 0, weight decay ``seg.weight_decay``; weights drawn N(0, 0.01) from the
probe's own generator (``seed``), bias 0. For speed the training loss reads the masks
downsampled to ``seg.train_label_size`` (nearest-exact; 16 = the C3 grid at 64 px), as
Leopart trains on masks downsampled to 100x100; scoring always upsamples the logits to the
full label size.

The learning rate is chosen from ``seg.lr_grid`` on a held-out part (``seg.holdout``) of the
TRAINING images: one head per lr trained on the rest and scored by mIoU on the held-out part
(ties: the first lr of the grid); the head is then retrained with that lr on the whole
training split and scored once on the validation split, after its last epoch. The test split
never chooses anything. Reported: mIoU, foreground mIoU (classes 1..C-1, so a
background-only head shows 0) and pixel accuracy, with the grid's held-out scores.

Sources: DINOv2 linear_head.py (AdamW lr 1e-3, wd 1e-4, poly schedule, 40k iterations);
Leopart (1x1 conv, SGD 0.1, 25 epochs, features upsampled to 100x100, dilated R50); here
AdamW with an lr grid because good settings differ a lot between backbones.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from densessl.eval.dense.config import parse_stage_set
from densessl.eval.dense.data import IGNORE_INDEX
from densessl.eval.dense.features import DenseSplit, seg_scores
from densessl.eval.segmentation import confusion_matrix

Tensor = torch.Tensor


class BNLinearHead(nn.Module):
    """BatchNorm + 1x1 conv on the stages upsampled to the finest of them and concatenated,
    computed per stage at its own resolution: a 1x1 conv and bilinear upsampling commute (both
    linear, the bilinear weights sum to 1), so the logits are the sum over stages of
    upsample(conv_s(BN_s(stage s))). The only difference from normalising the upsampled maps
    is that each BatchNorm's statistics are those of its stage's own cells."""

    def __init__(self, channels: list[int], num_classes: int, gen: torch.Generator):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm1d(c) for c in channels)
        self.splits = list(channels)
        self.weight = nn.Parameter(torch.randn(num_classes, sum(channels), generator=gen) * 0.01)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, maps: list[Tensor], size) -> Tensor:
        """Logits (B, K, *size) of the stage maps (B, C_s, h_s, w_s), bilinearly upsampled."""
        fine = max((m.shape[-2:] for m in maps), key=lambda hw: hw[0] * hw[1])
        out = None
        for m, bn, w in zip(maps, self.bns, self.weight.split(self.splits, dim=1)):
            b, c, h, wd = m.shape
            z = (bn(m.permute(0, 2, 3, 1).reshape(-1, c)) @ w.T).reshape(b, h, wd, -1).permute(0, 3, 1, 2)
            if (h, wd) != tuple(fine):
                z = F.interpolate(z, size=fine, mode="bilinear", align_corners=False)
            out = z if out is None else out + z
        out = out + self.bias[None, :, None, None]
        if tuple(out.shape[-2:]) == tuple(size):
            return out
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


def _maps(split: DenseSplit, stages, idx, device) -> list[Tensor]:
    return [split.feats[s][idx].to(device).float() for s in stages]


def _labels(split: DenseSplit, idx, size, device) -> Tensor:
    """Labels of images ``idx``; with a ``size`` below theirs, downsampled by nearest-exact
    (the pixel nearest each block's centre)."""
    labels = split.labels[idx].to(device)
    if size is not None and size < max(labels.shape[-2:]):
        labels = F.interpolate(labels[:, None].float(), size=(size, size), mode="nearest-exact")[:, 0]
    return labels.long()


def train_head(split: DenseSplit, stages: tuple[str, ...], images: Tensor, lr: float, epochs: int,
               weight_decay: float, batch_size: int, seed: int, device,
               label_size: int | None = None) -> tuple[BNLinearHead, float]:
    """(head, mean loss of the last epoch) trained on the training ``images`` (indices), the loss
    on labels downsampled to ``label_size`` (None: the full label size)."""
    gen = torch.Generator().manual_seed(seed)
    head = BNLinearHead([split.feats[s].shape[1] for s in stages], split.num_classes, gen).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(images) / batch_size)
    step, last = 0, []
    head.train()
    for _ in range(epochs):
        last = []
        order = images[torch.randperm(len(images), generator=gen)]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
            step += 1
            labels = _labels(split, idx, label_size, device)
            if not (labels != IGNORE_INDEX).any():
                continue  # nothing to learn from (and CE over no pixel is NaN)
            logits = head(_maps(split, stages, idx, device), labels.shape[-2:])
            loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last.append(loss.detach())
    loss_last = float(torch.stack(last).mean()) if last else float("nan")
    if not math.isfinite(loss_last) and last:
        raise FloatingPointError(f"linear segmentation probe diverged (loss {loss_last}) at lr={lr}")
    return head, loss_last


@torch.no_grad()
def head_confusion(head: BNLinearHead, split: DenseSplit, stages: tuple[str, ...], images: Tensor, device,
                   batch_size: int = 64) -> Tensor:
    head.eval()
    cm = torch.zeros(split.num_classes, split.num_classes, dtype=torch.int64)
    for start in range(0, len(images), batch_size):
        idx = images[start:start + batch_size]
        labels = split.labels[idx].long()
        logits = head(_maps(split, stages, idx, device), labels.shape[-2:])
        cm += confusion_matrix(logits.argmax(1).cpu(), labels, split.num_classes, ignore_index=IGNORE_INDEX)
    return cm


def linear_seg_probe(train: DenseSplit, val: DenseSplit, stages: tuple[str, ...], s, seed: int, device) -> dict:
    """lr chosen on a held-out part of ``train``, retrained on all of it, scored on ``val``."""
    n = len(train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = min(n - 1, max(1, round(s.holdout * n)))
    hold, fit = perm[:n_hold].sort().values, perm[n_hold:].sort().values
    grid = {}
    for lr in s.lr_grid:
        head, _ = train_head(train, stages, fit, lr, s.epochs, s.weight_decay, s.batch_size, seed, device,
                             s.train_label_size)
        grid[lr] = seg_scores(head_confusion(head, train, stages, hold, device), train.class_names)["mIoU"]
    best = max(s.lr_grid, key=lambda lr: (_finite(grid[lr]), -s.lr_grid.index(lr)))
    head, loss_last = train_head(train, stages, torch.arange(n), best, s.epochs, s.weight_decay, s.batch_size,
                                 seed, device, s.train_label_size)
    out = seg_scores(head_confusion(head, val, stages, torch.arange(len(val)), device), val.class_names)
    out.update(lr=best, holdout_mIoU={str(lr): v for lr, v in grid.items()}, train_loss_last=loss_last)
    return out


def _finite(v: float) -> float:
    return v if math.isfinite(v) else -1.0


def run_linear_seg(train: DenseSplit, val: DenseSplit, cfg, device) -> dict:
    s = cfg.seg
    results = {name: linear_seg_probe(train, val, parse_stage_set(name), s, cfg.seed, device) for name in s.stages}
    settings = {"head": "BatchNorm2d + 1x1 conv", "stages": list(s.stages), "lr_grid": list(s.lr_grid),
                "lr_chosen_on": f"{s.holdout:g} of the training images (held out), then retrained on all",
                "optimizer": "adamw", "schedule": "cosine per step", "epochs": s.epochs,
                "weight_decay": s.weight_decay, "batch_size": s.batch_size, "loss": "cross-entropy, ignore 255",
                "upsampling": "stages bilinear to the finest, logits bilinear to label size",
                "train_label_size": s.train_label_size or "label size", "eval_label_size": "label size",
                "metric": "last epoch", "train_images": len(train), "val_images": len(val), "seed": cfg.seed}
    return {"mIoU": {k: v["mIoU"] for k, v in results.items()}, "fg_mIoU": {k: v["fg_mIoU"] for k, v in results.items()},
            "results": results, "settings": settings}
