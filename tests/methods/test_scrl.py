import math

import pytest
import torch
from torch import nn

from conftest import assert_momentum_end_moves_target_halfway, TINY
from densessl.config import ConfigError, build_config
from densessl.methods.losses import regression_loss
from densessl.methods.scrl import SCRL, SCRLConfig, roi_features, scrl_loss
from densessl.models.backbones import build_backbone
from fixed_batch import (assert_loss_falls, assert_target_starts_as_online_and_after_step_moves_it_halfway, crop,
                         fit_four_logged_steps, noisy_views, project_optimizer, smooth_images, train_steps)


# ----------------------------------------------------------------------------- RoIAlign


def test_roi_align_on_a_constant_per_region_map():
    # a 4x4 C5 map of a 64-px view (stride 16): value 1 in the top-left 3x3 cells, 5 elsewhere
    f = torch.full((1, 2, 4, 4), 5.0)
    f[:, :, :3, :3] = 1.0
    # box [0, 32] px -> [0, 2] cells; aligned=False samples at 0.5 and 1.5, interpolating cells 0..2
    rois = torch.tensor([[0.0, 0.0, 0.0, 32.0, 32.0]])
    assert torch.allclose(roi_features(f, rois, 64), torch.ones(1, 2))
    # constant map: every box gives the constant
    g = torch.full((2, 3, 4, 4), 7.0)
    rois = torch.tensor([[0.0, 3.0, 5.0, 60.0, 41.0], [1.0, 0.0, 0.0, 64.0, 64.0], [1.0, 20.0, 30.0, 24.0, 33.0]])
    assert torch.allclose(roi_features(g, rois, 64), torch.full((3, 3), 7.0))


def test_roi_align_hand_computation_with_aligned_false():
    # f[y, x] = x on a 4x4 map, box [0, 64] x [0, 64] px at scale 1/16 -> [0, 4] cells, adaptive
    # sampling ceil(4/1) = 4 points per axis at 0.5, 1.5, 2.5, 3.5; x = 3.5 lies past the last
    # cell, so it reads cell 3: mean = (0.5 + 1.5 + 2.5 + 3) / 4 = 1.875
    f = torch.arange(4.0).expand(1, 1, 4, 4).contiguous()
    out = roi_features(f, torch.tensor([[0.0, 0.0, 0.0, 64.0, 64.0]]), 64)
    assert math.isclose(float(out), 1.875, rel_tol=1e-6)
    # the same box in a 224-px view on a 7x7 map (ResNet-50's stride 32): [0, 2] cells -> (0.5 + 1.5) / 2
    f7 = torch.arange(7.0).expand(1, 1, 7, 7).contiguous()
    assert math.isclose(float(roi_features(f7, torch.tensor([[0.0, 0.0, 0.0, 64.0, 64.0]]), 224)), 1.0, rel_tol=1e-6)


# ----------------------------------------------------------------------------- loss


def test_scrl_loss_hand_value_and_pairing():
    # two box pairs; view-1 rows first, then view-2 rows
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # pair 0: l(p1=e1, z2=e2) + l(p2=e1, z1=e1) = 2 + 0; pair 1: l(e2, e1) + l((1,1), e1) = 2 + (2 - sqrt 2)
    expected = ((2 + 0) + (2 + 2 - math.sqrt(2))) / 2
    assert math.isclose(float(scrl_loss(p, z)), expected, rel_tol=1e-6)
    assert torch.allclose(scrl_loss(p, z), (regression_loss(p[:2], z[2:]) + regression_loss(p[2:], z[:2])).mean())


# ----------------------------------------------------------------------------- the method


def small(**kw):
    torch.manual_seed(0)
    cfg = SCRLConfig(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, min_size=8, **kw)
    return SCRL(cfg, build_backbone("resnet18_small", 8))


def geometry(box1, box2, flip1=None, flip2=None):
    B = box1.shape[0]
    no = torch.zeros(B, dtype=torch.bool)
    return {"box": [box1, box2], "flip": [no if flip1 is None else flip1, no if flip2 is None else flip2]}


def test_loss_equals_the_composition_of_its_parts():
    m = small()
    m.current_step = 3
    B = 4
    box1 = torch.tensor([[0.0, 0.0, 0.8, 0.8]]).repeat(B, 1)
    box2 = torch.tensor([[0.2, 0.1, 1.0, 1.0]]).repeat(B, 1)
    batch = geometry(box1, box2, flip2=torch.tensor([True, False, True, False]))
    views = [torch.randn(B, 3, 64, 64), torch.randn(B, 3, 64, 64)]
    out = m(views, batch)
    pairs = m.boxes(views, batch)  # the same step: the same boxes
    assert pairs.valid.all() and pairs.rois1.shape == (40, 5)
    assert float(out["boxes_per_image"]) == 10 and float(out["valid_pairs"]) == 1
    with torch.no_grad():
        def roi(net, proj):
            c1, c2 = net(torch.cat(views), stages=("c5",))["c5"].chunk(2)  # one call: BN over both views
            # reference: torchvision directly, with the 2B offset for view 2 on the concatenated map
            from torchvision.ops import roi_align

            rois = torch.cat([pairs.rois1, pairs.rois2 + torch.tensor([B, 0, 0, 0, 0])])
            r = roi_align(torch.cat([c1, c2]), rois, (1, 1), spatial_scale=4 / 64, sampling_ratio=-1, aligned=False)
            return proj(r.flatten(1))
        p = m.predictor(roi(m.backbone, m.projector))
        z = roi(m.target_backbone, m.target_projector)
        n = 40
        expected = ((2 - 2 * nn.functional.cosine_similarity(p[:n], z[n:]))
                    + (2 - 2 * nn.functional.cosine_similarity(p[n:], z[:n]))).mean()
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    assert 0 <= float(out["loss"].detach()) <= 8


def test_identical_views_with_identity_predictor_give_zero_loss_and_backbone_gradient():
    m = small()
    m.predictor = nn.Identity()
    box = torch.tensor([[0.1, 0.1, 0.9, 0.9]]).repeat(3, 1)
    v = torch.randn(3, 3, 32, 32)
    out = m([v, v.clone()], geometry(box, box))
    assert abs(float(out["loss"].detach())) < 1e-5
    m2 = small()
    out = m2([torch.randn(3, 3, 32, 32), v], geometry(box, box))
    out["loss"].backward()
    assert m2.backbone.layer4[0].conv1.weight.grad.abs().sum() > 0  # through the RoI features
    assert all(p.grad is None for p in m2.target_backbone.parameters())


def test_batch_without_boxes_gives_a_zero_loss_that_keeps_the_graph():
    m = small()
    left, right = torch.tensor([[0.0, 0.0, 0.4, 1.0]]).repeat(2, 1), torch.tensor([[0.6, 0.0, 1.0, 1.0]]).repeat(2, 1)
    out = m([torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)], geometry(left, right))
    assert float(out["loss"].detach()) == 0.0 and float(out["boxes_per_image"]) == 0 and float(out["valid_pairs"]) == 0
    assert set(out) >= {"loss", "scrl", "z_std", "features", "boxes_per_image", "valid_pairs"}
    out["loss"].backward()
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in trainable)


def test_boxes_depend_on_the_step_and_seed_only():
    m = small()
    box1, box2 = torch.rand(8, 2).repeat(1, 2) * 0.3, None
    box1[:, 2:] += 0.7
    box2 = box1.flip(0)
    batch = geometry(box1, box2)
    views = [torch.zeros(8, 3, 64, 64)] * 2
    m.current_step = 5
    a = m.boxes(views, batch)
    b = m.boxes(views, batch)
    m.current_step = 6
    c = m.boxes(views, batch)
    assert torch.equal(a.rois1, b.rois1) and not torch.equal(a.rois1, c.rois1)


def test_ema_after_step_and_faithful_target_init():
    assert_target_starts_as_online_and_after_step_moves_it_halfway(small(momentum_base=0.5))
    f = small(faithful=True)
    assert not torch.equal(f.target_backbone.conv1.weight, f.backbone.conv1.weight)
    assert not torch.equal(f.target_projector[0].weight, f.projector[0].weight)
    assert f.projector[-1].bias is None and f.predictor[-1].bias is None  # SCRL drops the last bias


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="method.num_boxes"):
        build_config("scrl-scenes", ["method.num_boxes=0"])


def scrl_fixed_batch_losses(seed: int = 0, steps: int = 20) -> list[float]:
    """LARS steps on 8 fixed images, views at 32 px of the overlapping crops (0, 0, 0.75, 0.75) and
    (0.25, 0.25, 1, 1) with their geometry (the box pairs are redrawn every step)."""
    m = small()
    x = smooth_images(8, seed=seed)
    box1, box2 = torch.tensor([[0.0, 0.0, 0.75, 0.75]]), torch.tensor([[0.25, 0.25, 1.0, 1.0]])
    views = noisy_views(crop(x, box1, 32), (32,), seed=seed + 1) + noisy_views(crop(x, box2, 32), (32,), seed=seed + 2)
    batch = geometry(box1.repeat(8, 1), box2.repeat(8, 1))
    return train_steps(m, [(views, batch)], project_optimizer(m, "lars", lr=1.0), steps)


def test_loss_falls_on_a_fixed_batch():
    assert_loss_falls(scrl_fixed_batch_losses(), drop=0.9)  # falls by 1.85-2.10 (seeds 0-7; 3.3-3.4 -> 1.2-1.5)


def test_trains_four_steps_through_the_trainer(tmp_path):
    # TINY views are 32 px: C5 is 2x2, and boxes of at least 8 px (half a cell)
    cfg = build_config("scrl-scenes", TINY + ["train.epochs=1", "method.min_size=8", f"run_dir={tmp_path / 'run'}"])
    _, recs = fit_four_logged_steps(cfg)
    assert all(r["boxes_per_image"] > 5 for r in recs)


DDP_SCRIPT = r'''
import sys
import torch
import torch.distributed as dist
from torch import nn
from densessl.common.distributed import convert_sync_batchnorm, init_distributed, shutdown_distributed
from densessl.methods.scrl import SCRL, SCRLConfig
from densessl.models.backbones import build_backbone

info = init_distributed("cpu")
torch.manual_seed(0)
m = SCRL(SCRLConfig(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, min_size=8), build_backbone("resnet18_small", 8))
if sys.argv[1] == "sync":
    m = convert_sync_batchnorm(m, torch.device("cpu"))
ddp = nn.parallel.DistributedDataParallel(m, broadcast_buffers=False)
B = 2
if info.rank == 0 or sys.argv[2] == "all":  # disjoint crops: no boxes on this rank
    b1, b2 = torch.tensor([[0.0, 0.0, 0.4, 1.0]]).repeat(B, 1), torch.tensor([[0.6, 0.0, 1.0, 1.0]]).repeat(B, 1)
else:
    b1 = b2 = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(B, 1)
batch = {"box": [b1, b2], "flip": [torch.zeros(B, dtype=torch.bool)] * 2}
torch.manual_seed(info.rank)
for step in range(2):
    m.current_step = step
    out = ddp([torch.randn(B, 3, 32, 32), torch.randn(B, 3, 32, 32)], batch)
    out["loss"].backward()
    assert (float(out["boxes_per_image"]) == 0) == (info.rank == 0 or sys.argv[2] == "all")
g = m.projector[0].weight.grad
t = g.clone()
dist.all_reduce(t)
assert torch.allclose(g, t / 2), "gradients differ across ranks"
assert (g.abs().sum() > 0) == (sys.argv[2] == "one")
assert all(torch.isfinite(b).all() for b in m.buffers()), "BN running statistics became non-finite"
print("ok", info.rank)
del ddp, out  # a DDP module freed after the process group at exit aborts the process now and then
shutdown_distributed()
'''


@pytest.mark.slow
@pytest.mark.parametrize("bn,without", [("sync", "one"), ("plain", "one"), ("sync", "all")])
def test_ddp_rank_without_boxes_does_not_hang(bn, without, tmp_path):
    """A rank without box pairs still joins the heads' BN all-reduce (synchronised BN); when no
    rank has boxes the heads' running statistics stay finite."""
    import subprocess
    import sys

    from conftest import subprocess_env

    script = tmp_path / "ddp_scrl.py"
    script.write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(script), bn, without]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("ok") == 2


def test_scrl_momentum_end_is_wired():
    """momentum_end=0.5: at the last step the target still moves half-way (the default, 1, freezes it)."""
    m = SCRL(SCRLConfig(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, momentum_base=0.5, momentum_end=0.5),
             build_backbone("resnet18_small", 8))
    assert_momentum_end_moves_target_halfway(m)
