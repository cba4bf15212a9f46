"""Linear probes on cached (frozen) features.

One protocol for every backbone, random-init included: an `nn.Linear(D, C)` trained with SGD
(momentum 0.9, cosine learning-rate decay per step to 0), cross-entropy for single-label
targets (int64 (N,)) and BCE-with-logits for multi-label targets (float multi-hot (N, C)),
summed over classes and averaged over samples. The metric reported is the one after the
LAST epoch (top-1 fraction, or mAP via `metrics.mean_average_precision`), never the best.

Standardisation (default on): each feature dimension is shifted and scaled by the mean and
standard deviation of the *training* features (dimensions with std < 1e-6 are only shifted).
Pooled features of different backbones differ in scale by orders of magnitude (a random-init
ResNet's C5 is not a pretrained one's), and an SGD probe's good learning rate scales with the
feature scale; standardising makes one learning rate work for all of them, so the comparison
measures the features, not the luck of the lr. It is an affine map the probe could learn
itself, so it changes the optimisation, not the probe's capacity.

Defaults (lr 0.01, weight decay 0, batch 256, 100 epochs) were chosen by a sweep over
lr {0.001..1} x wd {0..1e-2} on standardised pooled features of dimension 256..2048 (random-init
resnet18_small and resnet18, and 2048-d random ReLU features) with 1000-3000 training images of
Fashion-MNIST: lr 0.01 / wd 0 was best or within 0.5 points of best in every case, larger lrs
overfit (last-epoch test top-1 1-3 points lower, train loss near 0) and weight decay changed
little. They still reach ~100% on linearly separable data. Losses are means over the batch, so
the step size does not depend on the batch size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from densessl.eval.metrics import count_skipped, mean_average_precision

Tensor = torch.Tensor


def train_linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, multilabel: bool,
                       epochs: int = 100, lr: float = 0.01, weight_decay: float = 0.0, batch_size: int = 256,
                       seed: int = 0, standardize: bool = True, num_classes: int | None = None,
                       device: str | torch.device | None = None) -> dict:
    """Train a linear probe on (train_x, train_y) and evaluate it on (test_x, test_y).

    Single-label (`multilabel=False`): int targets (N,); `num_classes` defaults to
    1 + the largest label in train and test. Multi-label: float/bool multi-hot targets (N, C).
    Deterministic for a given `seed` (a torch.Generator drives the weight init and the
    shuffling). `device` defaults to the device of `train_x`.

    Returns {"top1": fraction} or {"mAP": ..., "ap_per_class": [...], "skipped_classes": n},
    plus "train_loss_last" (mean training loss of the last epoch), "weight" and "bias" of the
    trained probe (on CPU) and "settings" (everything needed to state the protocol).
    """
    train_x, test_x = _check_x(train_x, "train_x"), _check_x(test_x, "test_x")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_x and test_x differ in dimension: {train_x.shape[1]} vs {test_x.shape[1]}")
    num_classes = _check_targets(train_y, test_y, train_x, test_x, multilabel, num_classes)
    if epochs < 1 or batch_size < 1 or not lr > 0 or weight_decay < 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0, weight_decay >= 0; got epochs={epochs}, "
                         f"batch_size={batch_size}, lr={lr}, weight_decay={weight_decay}")
    device = torch.device(device) if device is not None else train_x.device

    # clone(): features from extract_features are inference tensors, which autograd cannot save.
    train_x, test_x = train_x.to(device).float().clone(), test_x.to(device).float().clone()
    if standardize:
        mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True)
        std = torch.where(std < 1e-6, torch.ones_like(std), std)
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    if multilabel:
        train_t = train_y.to(device).float().clone()
    else:
        train_t = train_y.to(device).long().clone()

    gen = torch.Generator().manual_seed(seed)
    probe = linear_head(train_x.shape[1], num_classes, gen).to(device)
    n = train_x.shape[0]
    if multilabel:
        def loss_fn(logits, targets):
            return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]
    else:
        loss_fn = F.cross_entropy
    epoch_losses = [loss for _, loss in sgd_epochs(probe, lambda epoch, perm: (train_x, (train_t,), perm.to(device)),
                                                   loss_fn, n=n, epochs=epochs, batch_size=batch_size, lr=lr,
                                                   gen=gen, weight_decay=weight_decay)]
    train_loss_last = epoch_losses[-1]
    if not math.isfinite(train_loss_last):
        raise FloatingPointError(f"linear probe diverged (last-epoch loss {train_loss_last}); lower lr={lr}")

    with torch.no_grad():
        test_logits = probe(test_x).cpu()
    result: dict = {}
    if multilabel:
        mAP, per_class = mean_average_precision(test_logits, test_y.cpu().float())
        result.update(mAP=mAP, ap_per_class=per_class, skipped_classes=count_skipped(per_class))
    else:
        result["top1"] = float((test_logits.argmax(1) == test_y.cpu().long()).double().mean())
    result.update(
        train_loss_last=train_loss_last,
        weight=probe.weight.detach().cpu(), bias=probe.bias.detach().cpu(),
        settings=dict(probe="linear", optimizer="sgd", momentum=0.9, schedule="cosine-per-step",
                      loss="bce-sum-over-classes" if multilabel else "cross-entropy", multilabel=multilabel,
                      epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, seed=seed,
                      standardize=standardize, num_classes=num_classes, n_train=n, n_test=test_x.shape[0],
                      dim=train_x.shape[1], metric="last-epoch"),
    )
    return result


def linear_head(dim: int, num_classes: int, gen: torch.Generator, bias: float = 0.0) -> nn.Linear:
    """nn.Linear(dim, num_classes): weights N(0, 0.01^2) drawn from `gen`, a constant bias."""
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.fill_(bias)
    return head


def sgd_epochs(head: nn.Module, epoch_data, loss_fn, *, n: int, epochs: int, batch_size: int, lr: float,
               gen: torch.Generator, momentum: float = 0.9, weight_decay: float = 0.0,
               clip_grad: float | None = None):
    """The probe loop of every linear probe: SGD with momentum, the learning rate cosine-decayed
    per step to 0, over `epochs` shuffled passes of `n` training samples; yields
    (epoch index, mean training loss of that epoch) after each epoch.

    Each epoch draws a permutation of range(n) from `gen`; `epoch_data(epoch, perm)` returns
    (features, targets tuple, order): batches are `order[start:start + batch_size]` of those,
    moved to the head's device, and `loss_fn(logits, *targets)` is their loss. (Cached features
    give `perm` as the order; features recomputed per epoch in `perm`'s order give arange(n).)"""
    device = head.weight.device
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    total = epochs * math.ceil(n / batch_size)
    step = 0
    for epoch in range(epochs):
        x, targets, order = epoch_data(epoch, torch.randperm(n, generator=gen))
        # float64: the same sum as adding the losses as Python floats, without a device sync per step
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, n, batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            idx = order[start:start + batch_size]
            logits = head(x[idx].to(device))
            loss = loss_fn(logits, *(t[idx].to(device) for t in targets))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad:
                nn.utils.clip_grad_norm_(head.parameters(), clip_grad)
            optimizer.step()
            loss_sum += loss.detach().double() * idx.numel()
            step += 1
        yield epoch, float(loss_sum) / n


def _check_x(x: Tensor, name: str) -> Tensor:
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) tensor, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _check_targets(train_y, test_y, train_x, test_x, multilabel, num_classes) -> int:
    for y, x, name in ((train_y, train_x, "train_y"), (test_y, test_x, "test_y")):
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{name} has {y.shape[0]} rows but the features have {x.shape[0]}")
        if multilabel and y.ndim != 2:
            raise ValueError(f"multilabel=True needs multi-hot {name} of shape (N, C), got {tuple(y.shape)}")
        if not multilabel and (y.ndim != 1 or y.is_floating_point()):
            raise ValueError(f"multilabel=False needs integer class indices {name} of shape (N,), got "
                             f"shape {tuple(y.shape)} dtype {y.dtype}")
    if multilabel:
        if train_y.shape[1] != test_y.shape[1]:
            raise ValueError(f"train_y and test_y differ in class count: {train_y.shape[1]} vs {test_y.shape[1]}")
        if num_classes is not None and num_classes != train_y.shape[1]:
            raise ValueError(f"num_classes={num_classes} but targets have {train_y.shape[1]} columns")
        return train_y.shape[1]
    lo = min(int(train_y.min()), int(test_y.min()))
    hi = max(int(train_y.max()), int(test_y.max()))
    if num_classes is None:
        num_classes = hi + 1
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), found values in [{lo}, {hi}]")
    return num_classes
