"""Shared by the method tests: real optimiser steps on one fixed batch, in the trainer's order.

(A plain module, not tests/methods/conftest.py: a second conftest.py would replace the
`conftest` module that the test files import TINY and friends from.)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from conftest import TINY
from densessl.config import OptimConfig
from densessl.engine.optim import build_optimizer
from densessl.engine.trainer import Trainer
from densessl.methods.base import check_outputs
from densessl.models.backbones import build_backbone


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
    loss (the loss its gradient came from). `each_step(step)`, if given, runs after each step.
    Every forward's outputs are checked against the Method contract."""
    method.train()
    method.total_steps = total_steps or start + steps
    losses = []
    for step in range(start, start + steps):
        views, batch = batches[step % len(batches)]
        method.current_step = step
        out = method(views, batch)
        check_outputs(out)
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


def lars_losses_on_fixed_multicrop(method, images: int, seed: int = 0, steps: int = 20,
                                   sizes=(32, 32, 16, 16)) -> list[float]:
    """Losses of `steps` LARS steps (lr 1) on one batch: noisy views at `sizes` (by default
    2 x 32 + 2 x 16 px) of `images` fixed smooth images."""
    views = noisy_views(smooth_images(images, seed=seed), sizes, seed=seed + 1)
    return train_steps(method, [(views, {})], project_optimizer(method, "lars", lr=1.0), steps)


def tiny_queue_method(method_cls, config_cls, **kw):
    """A momentum-encoder method with a key queue (MoCo and its dense variants) on the 8-wide
    small ResNet with a 32 -> 16 projector: shuffle-BN in 4 groups and a 64-key queue unless kw
    says otherwise."""
    kw.setdefault("bn_splits", 4)
    kw.setdefault("queue_size", 64)
    return method_cls(config_cls(proj_hidden_dim=32, proj_dim=16, **kw), build_backbone("resnet18_small", 8))


def assert_target_starts_as_online_and_after_step_moves_it_halfway(method) -> None:
    """For a method built with momentum_base = 0.5: the EMA target starts equal to the online
    backbone, and after an online change after_step(0, ...) moves it half-way to it."""
    assert torch.equal(method.target_backbone.conv1.weight, method.backbone.conv1.weight)
    with torch.no_grad():
        method.backbone.conv1.weight.add_(1.0)
    old = method.target_backbone.conv1.weight.clone()
    method.after_step(0, 10)
    assert torch.allclose(method.target_backbone.conv1.weight, 0.5 * old + 0.5 * method.backbone.conv1.weight)


def multicrop_prototype_overrides(tmp_path, *extra) -> list[str]:
    """Trainer overrides for the multi-crop prototype methods (SwAV, Gaelle, SSPRL): TINY without
    its method and view keys, one 32 px view and two 16 px views, a 32 -> 16 projector onto 32
    prototypes, the queue from epoch 1, prototypes frozen for 2 steps, 2 epochs of 2 steps; then
    `extra`."""
    base = [o for o in TINY if not o.startswith(("method.", "views."))]
    return base + [
        f"run_dir={tmp_path / 'run'}", "views.0.size=32", "views.1.size=16", "views.1.count=2",
        "method.proj_hidden_dim=32", "method.proj_dim=16", "method.num_prototypes=32",
        "method.epoch_queue_starts=1", "method.freeze_prototypes_iters=2",
        "train.steps_per_epoch=2", "train.epochs=2", *extra,
    ]


def fit_four_logged_steps(cfg):
    """Trainer(cfg).fit(), checked to end at step 4 with a finite loss logged at each of the 4
    steps: the trainer and the metrics.jsonl records that carry a loss."""
    trainer = Trainer(cfg)
    assert trainer.fit()["step"] == 4
    recs = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    assert len(recs) == 4 and all(math.isfinite(r["loss"]) for r in recs)
    return trainer, recs
