"""Frozen-feature extraction: global-average-pooled C5 features of a backbone over a dataset.

Every backbone (pretrained or random-init) goes through the same path: uint8 images ->
`normalize` (ImageNet statistics) -> `backbone.pool` in eval mode (BatchNorm uses its running
statistics) under `torch.inference_mode()`.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from densessl.data.augment import normalize

Tensor = torch.Tensor


class _KeepImageAndTarget:
    """Collate that stacks only "image" and the target; other keys (boxes, paths, ...) are dropped."""

    def __init__(self, target_key: str | None):
        self.target_key = target_key

    def __call__(self, items: list[dict]) -> tuple[Tensor, Tensor | None]:
        for item in items:
            missing = [key for key in ("image", self.target_key) if key is not None and key not in item]
            if missing:
                raise KeyError(f"dataset item has no {missing[0]!r} key (keys: {sorted(item)}); "
                               f"pass target_key= naming the item's target, or None for no target")
        images = [torch.as_tensor(item["image"]) for item in items]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:
            raise ValueError(f"images in a batch differ in shape {sorted(shapes)}; give the dataset a fixed "
                             f"output size (e.g. ImageFolder(size=...)) so they can be batched")
        targets = None
        if self.target_key is not None:
            targets = torch.stack([torch.as_tensor(item[self.target_key]) for item in items])
        return torch.stack(images), targets


def extract_features(backbone: nn.Module, dataset: Dataset, batch_size: int = 256, num_workers: int = 0,
                     device: str | torch.device = "cpu", target_key: str | None = "labels",
                     autocast_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
    """Pooled features (N, D) float32 on CPU and stacked targets (N, ...) of every item in `dataset`.

    Items are dicts with "image" (uint8 (3, H, W)) and the target under `target_key` (e.g.
    "labels": float multi-hot (C,), or "label": int64 scalar); `target_key=None` returns None
    for the targets. The backbone must already be on `device`; it runs in eval mode and its
    previous train/eval mode is restored afterwards. `autocast_dtype` (e.g. torch.bfloat16)
    runs the forward under autocast; features are returned as float32 regardless.
    Order follows the dataset (no shuffling).
    """
    device = torch.device(device)
    param = next(backbone.parameters(), None)
    if param is not None and param.device.type != device.type:
        raise ValueError(f"backbone is on {param.device} but device={str(device)!r}; move it first")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_KeepImageAndTarget(target_key), pin_memory=device.type == "cuda")
    features, targets = [], []
    for pooled, target in frozen_forward(backbone, loader, device, autocast_dtype):
        features.append(pooled.float().cpu())
        if target is not None:
            targets.append(target)
    if not features:
        raise ValueError("extract_features: the dataset is empty")
    feats = torch.cat(features)
    return feats, (torch.cat(targets) if target_key is not None else None)


def frozen_forward(backbone: nn.Module, loader, device: torch.device, autocast_dtype: torch.dtype | None = None,
                   forward=None):
    """Yield ``(forward(backbone, x), rest)`` for each ``(images, rest)`` batch of ``loader``.

    The one frozen forward of every evaluation: uint8 images -> `normalize` -> channels_last ->
    the backbone in eval mode (BatchNorm on its running statistics) under
    `torch.inference_mode()` and optional autocast; the previous train/eval mode is restored
    when the loop ends. ``forward`` defaults to ``backbone.pool`` (pooled C5); the dense probes
    pass ``lambda b, x: b(x, stages)``. Outputs are inference tensors: move or `torch.cat` them
    outside this loop before autograd sees them.
    """
    forward = forward or (lambda b, x: b.pool(x))
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    was_training = backbone.training
    backbone.eval()
    try:
        for images, rest in loader:
            with torch.inference_mode(), autocast:
                x = normalize(images.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
                out = forward(backbone, x)
            yield out, rest
    finally:
        backbone.train(was_training)


@torch.no_grad()
def recompute_bn_stats(backbone: nn.Module, dataset: Dataset, batch_size: int = 128, device="cpu") -> None:
    """Replace every BatchNorm's running statistics by those of its input on `dataset`'s images
    (the average over batches of each batch's mean and unbiased variance), weights unchanged.

    For a random-init backbone, whose stored statistics (mean 0, variance 1) leave it
    un-normalised in eval mode, this gives it the data-derived normalisation that every trained
    backbone carries. BN runs in train mode with `momentum=None` (PyTorch's cumulative average);
    the backbone's modes and momenta are restored afterwards.
    """
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = {m: m.training for m in backbone.modules()}
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    backbone.train()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=_KeepImageAndTarget(None))
    try:
        for images, _ in loader:
            backbone.pool(normalize(images.to(device)))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for m, was in modes.items():
            m.train(was)
