import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from densessl.config import build_config
from densessl.data.views import expand_slots
from densessl.methods.ssprl import SSPRL, SSPRLConfig, l2g_loss, pool_patch_scores
from densessl.methods.losses import cross_entropy_to_codes, sinkhorn
from densessl.models.backbones import build_backbone
from fixed_batch import (assert_loss_falls, assert_prototypes_frozen_then_trained, crop, fit_four_logged_steps,
                         multicrop_prototype_overrides, noisy_views, project_optimizer, smooth_images, train_steps)


def test_per_image_pooling_uses_only_that_images_patches():
    cells, B, K = 4, 3, 2
    # row k * B + i is patch k of image i; its value encodes (patch, image)
    scores = torch.tensor([[100.0 * i + k, -(100.0 * i + k)] for k in range(cells) for i in range(B)])
    pooled = pool_patch_scores(scores, cells)
    assert pooled.shape == (B, K)
    for i in range(B):
        assert pooled[i, 0].item() == pytest.approx(100 * i + 1.5)  # mean of patches 0..3 of image i only
        assert pooled[i, 1].item() == pytest.approx(-(100 * i + 1.5))


def test_l2g_loss_hand_composition():
    torch.manual_seed(0)
    cells, B, Ks, K0 = 4, 3, 5, 6
    learner = torch.nn.Linear(Ks, K0, bias=False)
    views = [torch.randn(cells * B, Ks) for _ in range(2)]
    codes = [sinkhorn(torch.randn(B, K0)) for _ in range(2)]
    loss = l2g_loss(views, cells, learner, codes, 0.1)
    expected = 0
    for v in views:
        logits = learner(torch.nn.functional.normalize(v.view(cells, B, Ks).mean(0), dim=1))
        expected += sum(cross_entropy_to_codes(q, logits, 0.1) for q in codes)
    assert torch.allclose(loss, expected / 4)


def tiny_ssprl(**kw):
    torch.manual_seed(0)
    cfg = SSPRLConfig(**{"proj_hidden_dim": 32, "proj_dim": 128, "num_prototypes": 300,
                         "local_prototypes": (150, 150), "queue_length": 0, "local_queue_lengths": (0, 0), **kw})
    return SSPRL(cfg, build_backbone("resnet18_small", 8))


def pyramid_views(B=8, seed=0):
    """2 x 32 + 2 x 16 crops, then 2 x 4 patches of 12 px and 2 x 9 patches of 8 px."""
    g = torch.Generator().manual_seed(seed)
    sizes = [32, 32, 16, 16] + [12] * 8 + [8] * 18
    return [torch.randn(B, 3, s, s, generator=g) for s in sizes]


def test_shapes_and_initial_losses_are_about_ln_k():
    m = tiny_ssprl()
    t = m.terms(pyramid_views())
    # random unit vectors: each CE ~ ln K + 1 / (2 d T^2), d the dimension of the cosines
    glb = math.log(300) + 1 / (2 * 128 * 0.01)
    loc = math.log(150) + 1 / (2 * 128 * 0.01)
    l2g = math.log(300) + 1 / (2 * 150 * 0.01)  # the learner's input is a unit vector in R^K_s
    assert abs(t["glb"].item() - glb) < 0.2 and abs(t["l2g_l1"].item() - l2g) < 0.2
    for s in (1, 2):
        assert abs(t[f"loc_l{s}"].item() - loc) < 0.2, (s, t[f"loc_l{s}"].item())
        assert abs(t[f"l2g_l{s}"].item() - l2g) < 0.2, (s, t[f"l2g_l{s}"].item())
    total = m(pyramid_views(), {})["loss"].item()
    # the spec's ~11.06 for 300 / 150 / 150 and lambda 0.25 (plus the same offsets)
    assert abs(total - (glb + 0.5 * loc + 0.5 * l2g)) < 0.3, total
    assert math.log(300) + 0.5 * math.log(150) + 0.5 * math.log(300) == pytest.approx(11.06, abs=0.01)


LEVELS = ((4, 2), (12, 3))  # (first slot, g) of each level in pyramid_views: view 0's g*g cells, then view 1's


def level_embeddings(m, views, s):
    """What the forward computes for level s: the unit embeddings and the local scores of every
    patch, one backbone call on the level's slots (its own resolution, so the same BN batch)."""
    start, g = LEVELS[s]
    n = 2 * g * g
    with torch.no_grad():
        z = F.normalize(m.local_heads[s](m.backbone.pool(torch.cat(views[start:start + n]))), dim=-1)
        return z, m.local_prototypes[s](z)


def test_local_loss_pairs_each_patch_with_the_same_cell_of_the_other_view():
    """L_loc^s by hand: for each view j, Sinkhorn codes over all g*g*B patches of j; patch (cell k,
    image i) of view 1 - j predicts the code of patch (k, i) of view j; mean over patches and j."""
    m = tiny_ssprl()
    views = pyramid_views(B=4)
    with torch.no_grad():
        t = m.terms(views)  # (normalises the prototypes)
    for s, (start, g) in enumerate(LEVELS):
        cells, B = g * g, 4
        _, scores = level_embeddings(m, views, s)
        per_view = scores.view(2, cells, B, -1)  # (view, cell, image, K): slot start + j * cells + k
        codes = [sinkhorn(per_view[j].reshape(cells * B, -1)).view(cells, B, -1) for j in range(2)]
        expected = 0.0
        for j in range(2):
            for k in range(cells):
                expected += cross_entropy_to_codes(codes[j][k], per_view[1 - j][k], m.cfg.temperature) / cells
        assert torch.allclose(t[f"loc_l{s + 1}"], expected / 2, rtol=1e-5), s


def test_local_loss_is_invariant_to_a_common_cell_order_but_not_to_mismatched_cells():
    """Reordering the cells the same way in both views keeps every pair (and Sinkhorn sees a set);
    reordering one view's cells (e.g. cell k against cell k + 1) changes the loss."""
    m = tiny_ssprl()
    views = pyramid_views(B=4)

    def loc(v):
        with torch.no_grad():
            out = m.terms(v)
        return out["loc_l1"], out["loc_l2"]

    base = loc(views)
    for s, (start, g) in enumerate(LEVELS):
        cells = g * g
        perm = [1, 0] + list(range(2, cells))[::-1]  # not a rotation: a shifted pairing does not survive it
        same, shifted = list(views), list(views)
        for j in range(2):
            for k in range(cells):
                same[start + j * cells + k] = views[start + j * cells + perm[k]]
        for k in range(cells):  # view 1 only: cell k against cell k + 1
            shifted[start + cells + k] = views[start + cells + (k + 1) % cells]
        assert torch.allclose(loc(same)[s], base[s], rtol=1e-5), s
        assert not torch.allclose(loc(shifted)[s], base[s], rtol=1e-3), s


def _grads(m, loss):
    m.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: (p.grad is not None and p.grad.abs().sum().item() > 0) for n, p in m.named_parameters()}


def test_gradient_routing_of_each_term():
    m = tiny_ssprl()
    t = m.terms(pyramid_views())
    g = _grads(m, t["l2g_l1"])
    assert g["backbone.conv1.weight"] and g["local_heads.0.0.weight"] and g["local_prototypes.0.weight"]
    assert g["l2g_prototypes.0.weight"]
    assert not g["projector.0.weight"] and not g["prototypes.weight"]  # global codes are constants
    assert not g["local_heads.1.0.weight"] and not g["l2g_prototypes.1.weight"]  # other level untouched
    g = _grads(m, t["loc_l2"])
    assert g["local_heads.1.0.weight"] and g["local_prototypes.1.weight"] and g["backbone.conv1.weight"]
    assert not g["projector.0.weight"] and not g["prototypes.weight"] and not g["l2g_prototypes.1.weight"]
    g = _grads(m, t["glb"])
    assert g["projector.0.weight"] and g["prototypes.weight"] and not g["local_heads.0.0.weight"]


def test_all_three_prototype_kinds_renormalised_and_frozen():
    m = tiny_ssprl(freeze_prototypes_iters=3)
    with torch.no_grad():
        for layer in m.prototype_layers():
            layer.weight.mul_(2.0)
    out = m(pyramid_views(), {})
    assert len(m.prototype_layers()) == 5
    for layer in m.prototype_layers():
        assert torch.allclose(layer.weight.norm(dim=1), torch.ones(layer.weight.shape[0]), atol=1e-5)
    out["loss"].backward()
    m.before_optimizer_step(2)
    assert all(layer.weight.grad is None for layer in m.prototype_layers())
    assert m.local_heads[0][0].weight.grad is not None


def queue_model(faithful):
    # B = 8: global queue 32 rows (full after 4 pushes of 8); level queues full after 1 push
    # (2x2: 32 rows per push into 32; 3x3: 72 rows per push into 64)
    m = tiny_ssprl(queue_length=32, local_queue_lengths=(32, 64), epoch_queue_starts=1, faithful=faithful,
                   num_prototypes=20, local_prototypes=(10, 10), proj_dim=16)
    m.steps_per_epoch = 2
    return m


@pytest.mark.parametrize("faithful", [False, True])
def test_queues_push_per_level_and_are_used_once_full(faithful):
    m = queue_model(faithful)
    used = []
    for step in range(5):
        m.current_step = step
        with torch.no_grad():
            out = m(pyramid_views(seed=step), {})
        used.append((out["queue_used"].item(), out["queue_used_l1"].item(), out["queue_used_l2"].item()))
    assert used[:2] == [(0, 0, 0)] * 2  # epoch 0: no queue
    assert m.queue.rows_pushed == [24, 24]  # 3 pushes of B = 8
    assert m.local_queues["0"].rows_pushed == [3 * 32] * 2 and m.local_queues["1"].rows_pushed == [3 * 72] * 2
    if faithful:  # the shared flag: once a level queue is full, all queues are used, the global one half empty
        assert used[2:] == [(0, 0, 0), (1, 1, 1), (1, 1, 1)]
    else:
        assert used[2:] == [(0, 0, 0), (0, 1, 1), (0, 1, 1)]
    with torch.no_grad():
        m.current_step = 5
        assert m(pyramid_views(seed=5), {})["queue_used"].item() == float(faithful)  # 4th push
        m.current_step = 6
        assert m(pyramid_views(seed=6), {})["queue_used"].item() == 1  # full


def test_level_queue_holds_patch_embeddings_newest_first():
    """After two pushes into a level queue of two pushes' length: the newest push's embeddings
    first, then the older ones, each push in the forward's row order (cell-major: row k * B + i
    is cell k of image i), one slot per patch view; a push longer than the queue keeps its first
    rows."""
    m = tiny_ssprl(queue_length=32, local_queue_lengths=(64, 64), epoch_queue_starts=1, num_prototypes=20,
                   local_prototypes=(10, 10), proj_dim=16)
    m.steps_per_epoch = 2
    old, new = pyramid_views(seed=0), pyramid_views(seed=1)
    with torch.no_grad():
        for step, views in ((2, old), (3, new)):
            m.current_step = step
            m(views, {})
    assert m.local_queues["0"].rows_pushed == [64, 64] and m.local_queues["1"].rows_pushed == [144, 144]
    # the weights did not change (no optimiser step): recomputing the embeddings gives what was pushed
    z_old, _ = level_embeddings(m, old, 0)
    z_new, _ = level_embeddings(m, new, 0)
    q = m.local_queues["0"].queue  # (2 patch views, 64, 16); a push is 4 cells x 8 images = 32 rows
    for j in range(2):
        assert torch.allclose(q[j, :32], z_new[j * 32:(j + 1) * 32], atol=1e-6), j
        assert torch.allclose(q[j, 32:], z_old[j * 32:(j + 1) * 32], atol=1e-6), j
    z3, _ = level_embeddings(m, new, 1)
    q3 = m.local_queues["1"].queue  # 9 cells x 8 images = 72 rows per push, into 64: the first 64
    for j in range(2):
        assert torch.allclose(q3[j], z3[j * 72:j * 72 + 64], atol=1e-6), j


def test_wrong_number_of_views_names_the_layout():
    with pytest.raises(ValueError, match=r"2 \* g\*\*2 patch slots per level \(26 in all\); got 20"):
        tiny_ssprl()(pyramid_views()[:20], {})


def test_all_prototype_kinds_stay_fixed_under_lars_during_the_freeze_and_train_after_it():
    m = tiny_ssprl(freeze_prototypes_iters=3)
    assert_prototypes_frozen_then_trained(m, pyramid_views(B=4), freeze=3)


def pyramid_batch(B: int, seed: int = 0) -> list[torch.Tensor]:
    """Structured pyramid views of B fixed 48-px images: 2 x 32 + 2 x 16 crops of the image, then
    per level the g x g cells, each resized to the level's patch size, once per patch view (with
    different noise): patch k of both views shows cell k."""
    x = smooth_images(B, size=48, seed=seed)
    views = noisy_views(x, (32, 32, 16, 16), seed=seed + 1)
    for g, size in ((2, 12), (3, 8)):
        cells = torch.cat([crop(x, (c / g, r / g, (c + 1) / g, (r + 1) / g), size) for r in range(g) for c in range(g)])
        for j in range(2):
            views += noisy_views(cells, (size,), seed=seed + 2 + j)[0].split(B)
    return views


def ssprl_fixed_batch_losses(seed: int = 0, steps: int = 20) -> list[float]:
    m = tiny_ssprl(freeze_prototypes_iters=0)
    return train_steps(m, [(pyramid_batch(8, seed), {})], project_optimizer(m, "lars", lr=1.0), steps)


def test_ssprl_loss_falls_on_a_fixed_batch():
    assert_loss_falls(ssprl_fixed_batch_losses(), drop=0.5)  # falls by 0.94-1.37 (seeds 0-7; 11.6-11.7 -> 10.3-10.7)


# ---------------------------------------------------------------- smoke


@pytest.fixture
def expand_grid_groups(monkeypatch):
    """The trainer's device augmentation, given one group per slot (a grid group expands into
    count * grid**2 slots), so that it holds whether or not augment_batch expands grid groups."""
    import densessl.engine.trainer as trainer_module

    original = trainer_module.augment_batch

    def per_slot(views, groups, *args, **kwargs):
        slots = [dataclasses.replace(g, count=1, grid=0, region_size=0) for g in expand_slots(groups)]
        return original(views, slots, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "augment_batch", per_slot)


def ssprl_overrides(tmp_path):
    return multicrop_prototype_overrides(
        tmp_path, "views.2.size=12", "views.2.region_size=32", "views.3.size=8", "views.3.region_size=30",
        "method.local_prototypes=[16,16]", "method.queue_length=8", "method.local_queue_lengths=[32,72]",
        "train.batch_size=8",
        "views.2.hue=0.0", "views.3.hue=0.0",  # (the hue op is the costly one on CPU)
    )


def test_ssprl_trains_four_steps_through_the_trainer(tmp_path, expand_grid_groups):
    cfg = build_config("ssprl-scenes", ssprl_overrides(tmp_path))
    assert len(expand_slots(cfg.views)) == 4 + 8 + 18
    trainer, recs = fit_four_logged_steps(cfg)
    assert all(k in recs[0] for k in ("glb", "loc_l1", "l2g_l2", "usage_entropy_l2"))
    assert [r["queue_used_l1"] for r in recs] == [0.0, 0.0, 0.0, 1.0]
    assert trainer.method.local_queues["1"].rows_pushed == [2 * 9 * 8] * 2
