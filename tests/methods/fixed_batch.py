"""Shared by the method tests: real optimiser steps on one fixed batch, in the trainer's order.

(A plain module, not tests/methods/conftest.py: a second conftest.py would replace the
`conftest` module that the test files import TINY and friends from.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from densessl.config import OptimConfig
from densessl.engine.optim import build_optimizer


def project_optimizer(method, name: str = "lars", lr: float = 1.0, weight_decay: float = 1e-6, **kw):
    """The trainer's optimiser (densessl.engine.optim.build_optimizer) over the method's parameters."""
    cfg = OptimConfig(name=name, lr=lr, weight_decay=weight_decay, **kw)
    return build_optimizer(cfg, [method], lr)


def smooth_images(B: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """B fixed images with spatial structure (upsampled 4x4 noise), so that views of one image
    share content that a network can pick up within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(B, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def noisy_views(x: torch.Tensor, sizes, noise: float = 0.3, seed: int = 1) -> list[torch.Tensor]:
    """One view per entry of `sizes`: x resized to that size plus fixed Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in sizes:
        v = x if x.shape[-1] == s else torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear",
                                                                        align_corners=False)
        out.append(v + noise * torch.randn(v.shape, generator=g))
    return out


def crop(x: torch.Tensor, box, size: int) -> torch.Tensor:
    """The region `box` (normalised x0, y0, x1, y1, the same for every image) of x, resized to size."""
    H, W = x.shape[-2:]
    x0, y0, x1, y1 = (float(v) for v in torch.as_tensor(box).flatten()[:4])
    region = x[:, :, round(y0 * H):round(y1 * H), round(x0 * W):round(x1 * W)]
    return torch.nn.functional.interpolate(region, size=(size, size), mode="bilinear", align_corners=False)


def train_steps(method, batches, optimizer, steps: int, start: int = 0, total_steps: int | None = None,
                each_step=None) -> list[float]:
    """`steps` optimiser steps, step t on batches[t % len(batches)] (a list of (views, batch)
    pairs; one pair: a fixed batch), as Trainer.train_step orders them: current_step, forward,
    zero_grad, backward, before_optimizer_step, optimiser step, after_step. Returns every step's
    loss (the loss its gradient came from). `each_step(step)`, if given, runs after each step."""
    method.train()
    method.total_steps = total_steps or start + steps
    losses = []
    for step in range(start, start + steps):
        views, batch = batches[step % len(batches)]
        method.current_step = step
        out = method(views, batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        method.before_optimizer_step(step)
        optimizer.step()
        method.after_step(step, method.total_steps)
        losses.append(float(out["loss"].detach()))
        if each_step is not None:
            each_step(step)
    return losses


def assert_loss_falls(losses: list[float], drop: float, k: int = 3) -> None:
    """The mean of the last k losses is at least `drop` below the mean of the first k."""
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert first - last > drop, f"loss {first:.4f} -> {last:.4f} (needs to fall by > {drop}); all: " \
                                f"{[round(x, 4) for x in losses]}"


def assert_prototypes_frozen_then_trained(method, views, freeze: int, after: int = 2, lr: float = 1.0) -> None:
    """Real LARS steps (the project's optimiser builder) on one batch, with the method built with
    freeze_prototypes_iters = `freeze`. During the freeze every prototype bank keeps its initial
    weights up to the re-normalisation of the first forward (no gradient, hence no momentum,
    weight-decay or trust-ratio update: weights are compared right after each optimiser step,
    before the next forward re-normalises them), while the backbone trains. After it every bank
    moves, by more than a change of row norms, and keeps moving."""
    assert method.cfg.freeze_prototypes_iters == freeze
    banks = [layer.weight for layer in method.prototype_layers()]
    initial = [F.normalize(w.detach(), dim=1) for w in banks]
    conv = method.backbone.conv1.weight
    conv0 = conv.detach().clone()
    opt = project_optimizer(method, "lars", lr=lr, weight_decay=1e-6)
    record = []

    def snapshot(step):
        record.append(([w.detach().clone() for w in banks], conv.detach().clone()))

    train_steps(method, [(views, {})], opt, freeze + after, each_step=snapshot)
    for step in range(freeze):
        for i, (w, w0) in enumerate(zip(record[step][0], initial)):
            assert torch.allclose(w, w0, rtol=0, atol=1e-6), (step, i, (w - w0).abs().max().item())
    assert not torch.allclose(record[0][1], conv0, rtol=0, atol=1e-4)  # the rest of the model trains meanwhile
    for i, (w, w0) in enumerate(zip(record[freeze][0], initial)):
        moved = (F.normalize(w, dim=1) - w0).abs().max().item()  # more than a change of row norms
        assert moved > 1e-4, (i, moved)
    for i, (w, w1) in enumerate(zip(record[-1][0], record[freeze][0])):
        assert (F.normalize(w, dim=1) - F.normalize(w1, dim=1)).abs().max().item() > 1e-4, i
