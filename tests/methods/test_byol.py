import math

import torch
import torch.nn.functional as F

from conftest import assert_momentum_end_moves_target_halfway
from densessl.common.ema import ema_update_
from densessl.common.schedules import cosine_momentum
from densessl.methods.byol import BYOL, BYOLConfig
from densessl.methods.losses import byol_loss, regression_loss
from densessl.models.backbones import build_backbone
from fixed_batch import (assert_loss_falls, assert_target_starts_as_online_and_after_step_moves_it_halfway, noisy_views,
                         project_optimizer, smooth_images, train_steps)


def test_regression_loss_hand_values():
    x = torch.tensor([[3.0, 4.0]])
    assert torch.allclose(regression_loss(x, x), torch.zeros(1))
    assert torch.allclose(regression_loss(x, -x), torch.full((1,), 4.0))
    # p = (1, 0), z = (1, 1): cos = 1/sqrt(2) -> 2 - sqrt(2)
    assert torch.allclose(regression_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])),
                          torch.tensor([2 - math.sqrt(2)]))
    # invariant to positive rescaling of either input
    p, z = torch.randn(5, 8), torch.randn(5, 8)
    assert torch.allclose(regression_loss(3 * p, 0.1 * z), regression_loss(p, z), atol=1e-6)


def test_byol_loss_is_symmetric_sum_and_stops_gradient_at_targets():
    p1, p2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    z1, z2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    loss = byol_loss(p1, p2, z1, z2)
    expected = (regression_loss(p1, z2) + regression_loss(p2, z1)).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert z1.grad is None and z2.grad is None and p1.grad is not None


def test_ema_update_hand_values_and_limits():
    online, target = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        online.weight.copy_(torch.tensor([[1.0, 2.0]]))
        target.weight.copy_(torch.tensor([[3.0, 6.0]]))
        online.bias.fill_(0.0)
        target.bias.fill_(1.0)
    ema_update_(target, online, 0.75)  # 0.75 * target + 0.25 * online
    assert torch.allclose(target.weight, torch.tensor([[2.5, 5.0]])) and torch.allclose(target.bias, torch.tensor([0.75]))
    before = target.weight.clone()
    ema_update_(target, online, 1.0)
    assert torch.equal(target.weight, before)
    ema_update_(target, online, 0.0)
    assert torch.equal(target.weight, online.weight)


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100, 0.99) == 0.99
    assert cosine_momentum(100, 100, 0.99) == 1.0
    assert math.isclose(cosine_momentum(50, 100, 0.99), 0.995)
    # momentum_end < 1 (short runs): from base to that value
    assert math.isclose(cosine_momentum(100, 100, 0.99, 0.995), 0.995)
    assert math.isclose(cosine_momentum(50, 100, 0.99, 0.99), 0.99)


def test_byol_target_gets_no_gradient_and_ema_runs_after_step():
    torch.manual_seed(0)
    cfg = BYOLConfig(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, momentum_base=0.5)
    m = BYOL(cfg, build_backbone("resnet18_small", 8))
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    out = m(views, {})
    out["loss"].backward()
    assert all(p.grad is None for p in m.target_backbone.parameters())
    assert all(not p.requires_grad for p in m.target_projector.parameters())
    assert m.backbone.conv1.weight.grad is not None
    assert 0 <= out["loss"].item() <= 8 and out["features"].shape == (4, 64)
    assert_target_starts_as_online_and_after_step_moves_it_halfway(m)  # m = 0.5 at step 0


def test_byol_momentum_end_is_wired():
    """momentum_end=0.5: at the last step the target still moves half-way (the default, 1, freezes it)."""
    cfg = BYOLConfig(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, momentum_base=0.5, momentum_end=0.5)
    m = BYOL(cfg, build_backbone("resnet18_small", 8))
    assert_momentum_end_moves_target_halfway(m)


# ---------------------------------------------------------------- training on a fixed batch


def byol_on_a_fixed_batch(steps: int, seed: int = 0):
    """A tiny BYOL trained with the project's LARS on 16 fixed 32-px images (two noisy views):
    the model, the views and every step's loss."""
    torch.manual_seed(seed)
    m = BYOL(BYOLConfig(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32), build_backbone("resnet18_small", 8))
    views = noisy_views(smooth_images(16, seed=seed), (32, 32), seed=seed)
    losses = train_steps(m, [(views, {})], project_optimizer(m, "lars", lr=0.3), steps)
    return m, views, losses


def test_byol_loss_falls_on_a_fixed_batch():
    # the mean of the first three losses minus the last three, seeds 0-7: 1.37-2.03 (2.9-3.6 -> 1.1-1.6)
    _, _, losses = byol_on_a_fixed_batch(20)
    assert_loss_falls(losses, drop=0.7)


def test_byol_does_not_collapse_on_tiny_inputs():
    """The spec's CPU check (BYOL section): 20 steps on tiny 32-px inputs, the loss falls below 2
    and the per-dimension std of the normalised projections stays up (a collapsed network maps
    every image to one vector: std 0). The spec's bound, 0.01, is too lax at this size: BYOL
    without its stop-gradient and EMA target (which collapses) still gives 0.021-0.027 after these
    20 steps (loss 0.03-0.04), the real one 0.19-0.21 (seeds 0-4); the bound here is 0.1, i.e.
    0.4 / sqrt(d) for d = 16 (random unit vectors: 1 / sqrt(d))."""
    m, views, losses = byol_on_a_fixed_batch(20)
    assert losses[0] > 3.0 and sum(losses[-3:]) / 3 < 2.0, losses  # 4 for unrelated p and z
    with torch.no_grad():
        z_online = F.normalize(m.projector(m.backbone.pool(torch.cat(views))), dim=-1)
        out = m(views, {})
    assert z_online.std(dim=0).mean() > 0.1
    assert out["z_std"] > 0.1  # the target's projections (the statistic the trainer logs)
