"""The switches that reproduce the official code where densessl deviates from it (review
findings, issue 18 item 5): each changes exactly what it says, and its default is today's path.

One section per switch: optim.wd_exclude_1d, optim.lars_exclude_1d, optim.warmup_start_lr,
SS-PRL's separate_level_calls, GAELLE's attn_source and l2g_input, model.zero_init_residual,
PixPro's bn_per_view and crop_coords, views.blur_kind (SCRL's resize blur).
"""
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densessl.common.schedules import warmup_cosine
from densessl.config import ConfigError, OptimConfig, ViewConfig, build_config
from densessl.data.augment import RESIZE_BLUR_FACTORS, apply_photometric, resize_blur, sample_photometric_params
from densessl.data.geometry import code_crop_box, pixpro_positive_mask
from densessl.data.views import ViewDataset, ViewSampler, collate_views
from densessl.engine.optim import LARS, build_optimizer
from densessl.engine.trainer import Trainer
from densessl.methods.gaelle import GAELLE, GAELLEConfig, cross_view_loss
from densessl.methods.pixpro import PixPro
from densessl.methods.pixpro_core import PixProConfig
from densessl.methods.ssprl import SSPRL, SSPRLConfig
from densessl.models.backbones import build_backbone


def count_calls(module: nn.Module) -> list:
    """A list that grows by one entry (the input's batch size) per forward call of `module`."""
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls


# ----------------------------------------------------------------------------- optim.wd_exclude_1d


def decayed_params(opt) -> set:
    """ids of the parameters that get weight decay, now and under the trainer's wd schedule."""
    return {id(p) for g in opt.param_groups if g["weight_decay"] > 0 and g["wd_scale"] > 0 for p in g["params"]}


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_wd_exclude_1d_false_decays_every_parameter_and_changes_nothing_else(name):
    net = build_backbone("resnet18_small", 8)
    params = list(net.parameters())
    weights = {id(p) for p in params if p.ndim > 1}
    default = build_optimizer(OptimConfig(name=name, weight_decay=1e-4), [net], 0.1)
    code = build_optimizer(OptimConfig(name=name, weight_decay=1e-4, wd_exclude_1d=False), [net], 0.1)
    assert decayed_params(default) == weights
    assert decayed_params(code) == {id(p) for p in params}
    assert len(weights) < len(params)  # the backbone has biases / BN parameters the switch moves
    # the same two groups, the same LARS exclusion: only the decay of the 1-d group differs
    for g0, g1 in zip(default.param_groups, code.param_groups):
        assert [id(p) for p in g0["params"]] == [id(p) for p in g1["params"]]
        assert g0["lars_exclude"] == g1["lars_exclude"]


def test_wd_exclude_1d_false_shrinks_a_bn_gamma_under_sgd():
    bn = nn.BatchNorm1d(3)
    for flag, expected in ((True, 1.0), (False, 1.0 - 0.5 * 0.1)):
        b = copy.deepcopy(bn)
        opt = build_optimizer(OptimConfig(name="sgd", weight_decay=0.1, momentum=0.0, wd_exclude_1d=flag), [b], 0.5)
        b.weight.grad, b.bias.grad = torch.zeros(3), torch.zeros(3)
        opt.step()
        assert torch.allclose(b.weight.detach(), torch.full((3,), expected)), flag


# ----------------------------------------------------------------------------- optim.lars_exclude_1d


def test_lars_exclude_1d_false_adapts_the_bias_and_leaves_the_weight_alone():
    torch.manual_seed(0)
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.bias.copy_(torch.tensor([3.0, 4.0]))  # ||b|| = 5
    grads = {"weight": torch.randn(2, 2), "bias": torch.tensor([0.0, 1.0])}
    lr, eta = 0.1, 0.01
    after = {}
    for flag in (True, False):
        m = copy.deepcopy(lin)
        opt = build_optimizer(OptimConfig(name="lars", weight_decay=0.0, eta=eta, lars_exclude_1d=flag), [m], lr)
        assert isinstance(opt, LARS)
        for n, p in m.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        after[flag] = {n: p.detach().clone() for n, p in m.named_parameters()}
    g = grads["bias"]
    assert torch.allclose(after[True]["bias"], torch.tensor([3.0, 4.0]) - lr * g)  # plain momentum SGD
    trust = eta * 5.0 / 1.0  # eta ||b|| / ||g||
    assert torch.allclose(after[False]["bias"], torch.tensor([3.0, 4.0]) - lr * trust * g)
    assert torch.equal(after[True]["weight"], after[False]["weight"])


def test_swav_code_configuration_decays_and_adapts_every_parameter():
    cfg = build_config("swav-scenes", ["optim.wd_exclude_1d=false", "optim.lars_exclude_1d=false"])
    net = build_backbone("resnet18_small", 8)
    opt = build_optimizer(cfg.optim, [net], 0.1)
    assert decayed_params(opt) == {id(p) for p in net.parameters()}
    assert not any(g["lars_exclude"] for g in opt.param_groups)


# ----------------------------------------------------------------------------- optim.warmup_start_lr


def test_warmup_start_lr_is_the_first_step_lr_and_the_default_is_unchanged():
    assert warmup_cosine(0, 100, 10, 1.0, start=0.3) == 0.3
    assert math.isclose(warmup_cosine(5, 100, 10, 1.0, start=0.3), 0.65)
    assert warmup_cosine(10, 100, 10, 1.0, start=0.3) == 1.0
    for step in range(0, 100):
        base = 0.7
        old = base * step / 10 if step < 10 else warmup_cosine(step, 100, 10, base)
        assert warmup_cosine(step, 100, 10, base) == old  # bitwise the old formula in the warm-up
        if step >= 10:  # after the warm-up the start plays no part
            assert warmup_cosine(step, 100, 10, base, start=0.3) == warmup_cosine(step, 100, 10, base)


def set_schedules_lr(optim: OptimConfig, step: int, batch: int = 4096) -> float:
    """The lr the trainer sets at `step` (Trainer._set_schedules on a stand-in trainer)."""
    group = {"params": [], "lr": 0.0, "weight_decay": 0.0, "wd_scale": 1.0}
    stub = SimpleNamespace(cfg=SimpleNamespace(optim=optim, train=SimpleNamespace(batch_size=batch)), step=step,
                           steps_per_epoch=10, total_steps=1000, peak_lr=optim.lr * batch / 256,
                           optimizer=SimpleNamespace(param_groups=[group]))
    Trainer._set_schedules(stub)
    return group["lr"]


def test_trainer_warmup_starts_at_warmup_start_lr_in_per_256_units():
    # SwAV's start_warmup 0.3 at batch 4096 is 0.3 / 16 = 0.01875 per 256 images
    o = OptimConfig(lr=0.3, warmup_epochs=10, warmup_start_lr=0.01875)
    assert math.isclose(set_schedules_lr(o, 0), 0.3)
    assert math.isclose(set_schedules_lr(o, 100), 4.8)
    assert set_schedules_lr(OptimConfig(lr=0.3, warmup_epochs=10), 0) == 0.0
    with pytest.raises(ConfigError, match="optim.warmup_start_lr"):
        build_config("swav-scenes", ["optim.warmup_start_lr=-1"])


# ----------------------------------------------------------------------------- SS-PRL separate_level_calls


def tiny_ssprl(**kw):
    torch.manual_seed(0)
    cfg = SSPRLConfig(proj_hidden_dim=32, proj_dim=128, num_prototypes=300, local_prototypes=(150, 150),
                      queue_length=0, local_queue_lengths=(0, 0), **kw)
    return SSPRL(cfg, build_backbone("resnet18_small", 8))


def pyramid(sizes, B=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, 3, s, s, generator=g) for s in sizes]


# the paper's layout, scaled: the small crops (16) and the 3x3 patches (16) share a size
SHARED = [32, 32, 16, 16] + [12] * 8 + [16] * 18
DISTINCT = [32, 32, 16, 16] + [12] * 8 + [8] * 18


def test_separate_level_calls_makes_the_codes_four_backbone_calls():
    for flag, n_calls in ((False, 3), (True, 4)):
        m = tiny_ssprl(separate_level_calls=flag)
        calls = count_calls(m.backbone.conv1)  # one stem call per backbone call (pool bypasses __call__)
        m.terms(pyramid(SHARED))
        assert len(calls) == n_calls, (flag, calls)
    assert calls == [2 * 4, 2 * 4, 8 * 4, 18 * 4]  # 224-like crops, small crops, level 1, level 2


def test_separate_level_calls_changes_only_the_bn_statistics():
    # shared sizes: the split changes BN statistics, so the losses differ
    t0 = tiny_ssprl().terms(pyramid(SHARED))
    t1 = tiny_ssprl(separate_level_calls=True).terms(pyramid(SHARED))
    assert not torch.equal(t0["glb"], t1["glb"])
    # distinct sizes: the same calls either way, bitwise the same terms
    t0 = tiny_ssprl().terms(pyramid(DISTINCT))
    t1 = tiny_ssprl(separate_level_calls=True).terms(pyramid(DISTINCT))
    for k in t0:
        assert torch.equal(t0[k], t1[k]), k


# ----------------------------------------------------------------------------- GAELLE attn_source, l2g_input


def tiny_gaelle(**kw):
    torch.manual_seed(0)
    cfg = GAELLEConfig(proj_hidden_dim=32, proj_dim=128, num_prototypes=60, local_hidden_dim=32, local_dim=128,
                       num_local_prototypes=60, groups=4, queue_length=0, **kw)
    return GAELLE(cfg, build_backbone("resnet18_small", 8))


def gaelle_views(B=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, 3, s, s, generator=g) for s in (64, 64, 16, 16)]


def test_attn_source_own_head_moves_the_per_position_calls_off_the_global_head():
    default, own = tiny_gaelle(), tiny_gaelle(attn_source="own_head")
    assert default.attn_head is None
    own.attn_head.load_state_dict(own.projector.state_dict())  # the same weights: only the source differs
    n_default, n_own, n_attn = count_calls(default.projector), count_calls(own.projector), count_calls(own.attn_head)
    t0, t1 = default.terms(gaelle_views()), own.terms(gaelle_views())
    positions = 16  # 4x4 C5 maps of the 64-px views
    assert len(n_default) == 1 + positions and len(n_own) == 1 and len(n_attn) == positions
    for k in ("glb", "local", "l2g", "attn_entropy"):
        assert torch.equal(t0[k], t1[k]), k  # same weights, same batch statistics: the same numbers
    # the global head's BN running statistics no longer see the per-position calls
    bn = lambda m: next(x for x in m.projector.modules() if isinstance(x, nn.BatchNorm1d))  # noqa: E731
    assert not torch.equal(bn(default).running_mean, bn(own).running_mean)
    # and the attention's gradient reaches the attention head, not the global head
    t1["local"].backward()
    assert own.attn_head[0].weight.grad.abs().sum() > 0
    assert own.projector[0].weight.grad is None


def test_l2g_input_scores_feeds_the_token_scores_and_changes_nothing_else():
    default, scores = tiny_gaelle(), tiny_gaelle(l2g_input="scores")
    assert default.l2g_prototypes.weight.shape == (60, 128)  # (K_global, local_dim)
    assert scores.l2g_prototypes.weight.shape == (60, 60)  # (K_global, K_local)
    t0, t1 = default.terms(gaelle_views()), scores.terms(gaelle_views())
    for k in ("glb", "local", "attn_entropy", "usage_entropy_local"):
        assert torch.equal(t0[k], t1[k]), k
    assert not torch.equal(t0["l2g"], t1["l2g"])


def test_l2g_input_scores_is_the_cross_view_loss_of_the_mean_token_scores():
    m = tiny_gaelle(l2g_input="scores")
    inputs = {}
    m.local_prototypes.register_forward_hook(lambda mod, a, out: inputs.setdefault("s", out.float()))
    t = m.terms(gaelle_views())
    B, T = 4, m.tokens
    sl = inputs["s"].view(2, B, T, -1)
    # the global codes, recomputed as the method does (Sinkhorn is deterministic)
    from densessl.methods.losses import sinkhorn_codes
    glb_scores = {}
    m2 = tiny_gaelle(l2g_input="scores")
    m2.prototypes.register_forward_hook(lambda mod, a, out: glb_scores.setdefault("s", out.float()))
    m2.terms(gaelle_views())
    sc = glb_scores["s"].split(B)
    codes = [sinkhorn_codes(sc[a], None, m.cfg.epsilon, m.cfg.sinkhorn_iters) for a in (0, 1)]
    expected = cross_view_loss(sl, m.l2g_prototypes, codes, m.cfg.temperature, False)
    assert torch.allclose(t["l2g"], expected, atol=1e-6)


def test_gaelle_switches_reject_unknown_values():
    with pytest.raises(ConfigError, match="method.attn_source"):
        build_config("gaelle-scenes", ["method.attn_source=local_head"])
    with pytest.raises(ConfigError, match="method.l2g_input"):
        build_config("gaelle-scenes", ["method.l2g_input=logits"])


# ----------------------------------------------------------------------------- model.zero_init_residual


@pytest.mark.parametrize("name,width,last_bn", [("resnet18_small", 8, "bn2"), ("resnet50", None, "bn3")])
def test_zero_init_residual_zeroes_exactly_the_last_bn_gamma_of_each_block(name, width, last_bn):
    torch.manual_seed(0)
    default = build_backbone(name, width)
    torch.manual_seed(0)
    zero = build_backbone(name, width, zero_init_residual=True)
    zeroed = {f"{layer}.{i}.{last_bn}.weight" for layer in ("layer1", "layer2", "layer3", "layer4")
              for i in range(len(getattr(zero, layer)))}
    s0, s1 = default.state_dict(), zero.state_dict()
    for k in s0:
        if k in zeroed:
            assert torch.all(s1[k] == 0) and torch.all(s0[k] == 1), k
        else:
            assert torch.equal(s0[k], s1[k]), k  # every other tensor: the default's init, same draws
    assert len(zeroed) == (8 if name == "resnet18_small" else 16)


def test_zero_init_residual_reaches_the_trainer(tmp_path):
    from conftest import TINY

    t = Trainer(build_config("pixpro-scenes", TINY + ["model.zero_init_residual=true", f"run_dir={tmp_path}"]))
    assert torch.all(t.method.backbone.layer1[0].bn2.weight == 0)
    assert torch.all(t.method.target_backbone.layer4[1].bn2.weight == 0)  # the target is a copy


# ----------------------------------------------------------------------------- PixPro bn_per_view


def tiny_pixpro(**kw):
    torch.manual_seed(0)
    cfg = PixProConfig(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, **kw)
    return PixPro(cfg, build_backbone("resnet18_small", 8))


def pixpro_batch(B=4):
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(B, 4)
    half = torch.tensor([[0.0, 0.0, 0.5, 0.5]]).expand(B, 4)
    return {"box": [full, half], "flip": [torch.zeros(B, dtype=torch.bool)] * 2}


def test_bn_per_view_runs_one_view_per_call_of_every_network():
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 3, 64, 64, generator=g) for _ in range(2)]
    for flag, per_network in ((False, [8]), (True, [4, 4])):
        m = tiny_pixpro(bn_per_view=flag)
        calls = {n: count_calls(getattr(m, n)) for n in ("backbone", "projector", "target_backbone", "target_projector")}
        m(views, pixpro_batch())
        assert all(c == per_network for c in calls.values()), (flag, calls)


def test_bn_per_view_changes_only_the_bn_statistics():
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 3, 64, 64, generator=g) for _ in range(2)]
    out0, out1 = tiny_pixpro()(views, pixpro_batch()), tiny_pixpro(bn_per_view=True)(views, pixpro_batch())
    assert not torch.allclose(out0["loss"], out1["loss"])  # batch statistics per view, not over both
    assert torch.equal(out0["positives_per_image"], out1["positives_per_image"])
    # with BN on running statistics the batch split is the only difference left: the same loss
    m0, m1 = tiny_pixpro(), tiny_pixpro(bn_per_view=True)
    for m in (m0, m1):
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.eval()
    assert torch.allclose(m0(views, pixpro_batch())["loss"], m1(views, pixpro_batch())["loss"], atol=1e-5)


# ----------------------------------------------------------------------------- PixPro crop_coords


def official_ratios(j, i, w, h, flip, W, H, grid, code: bool) -> np.ndarray:
    """An independent float64 port of PixPro's regression_loss distance ratio for one image pair:
    view v is the crop (j[v], i[v], w[v], h[v]) of a W x H source on a grid x grid map. code=True:
    the code's coordinates [j/(W-1), (j+w-1)/(W-1)]; False: pixel edges [j/W, (j+w)/W].
    A flipped view swaps x0 and x1 (the code's FlipCoord). Returns (N, N) ratios."""
    centres, diags = [], []
    for v in range(2):
        if code:
            x0, x1 = j[v] / (W - 1), (j[v] + w[v] - 1) / (W - 1)
            y0, y1 = i[v] / (H - 1), (i[v] + h[v] - 1) / (H - 1)
        else:
            x0, x1 = j[v] / W, (j[v] + w[v]) / W
            y0, y1 = i[v] / H, (i[v] + h[v]) / H
        if flip[v]:
            x0, x1 = x1, x0
        bw, bh = (x1 - x0) / grid, (y1 - y0) / grid
        xs = (np.arange(grid) + 0.5) * bw + x0
        ys = (np.arange(grid) + 0.5) * bh + y0
        cx, cy = np.meshgrid(xs, ys)  # row-major cells
        centres.append(np.stack([cx.ravel(), cy.ravel()], -1))
        diags.append(math.hypot(bw, bh))
    dist = np.linalg.norm(centres[0][:, None] - centres[1][None], axis=-1)
    return dist / max(diags)


def random_pairs(n, W, H, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.integers(W // 4, W + 1, (n, 2))
    h = rng.integers(H // 4, H + 1, (n, 2))
    j = rng.integers(0, W - w + 1)
    i = rng.integers(0, H - h + 1)
    return j, i, w, h, rng.random((n, 2)) < 0.5


def test_crop_coords_code_gives_the_official_mask_and_differs_only_at_the_threshold():
    W, H, grid, n = 500, 375, 7, 400  # an ImageNet-sized, non-square source
    j, i, w, h, flip = random_pairs(n, W, H)
    box = [torch.tensor(np.stack([j[:, v] / W, i[:, v] / H, (j[:, v] + w[:, v]) / W, (i[:, v] + h[:, v]) / H], -1),
                        dtype=torch.float32) for v in range(2)]
    flips = [torch.tensor(flip[:, v]) for v in range(2)]
    size = torch.tensor([[W, H]] * n, dtype=torch.float32)
    edges = pixpro_positive_mask(box[0], flips[0], box[1], flips[1], grid, grid)
    code = pixpro_positive_mask(box[0], flips[0], box[1], flips[1], grid, grid, crop_coords="code", source_size=size)
    r_code = np.stack([official_ratios(j[b], i[b], w[b], h[b], flip[b], W, H, grid, True) for b in range(n)])
    r_edges = np.stack([official_ratios(j[b], i[b], w[b], h[b], flip[b], W, H, grid, False) for b in range(n)])
    assert np.array_equal(code.numpy(), r_code < 0.7)  # the official mask, bit for bit
    differ = (code != edges).numpy()
    # they differ exactly where the two normalisations put a pair on opposite sides of 0.7 (but for
    # exact ties at 0.7 in the edge units, which float32 rounding decides either way)
    tie = np.isclose(r_edges, 0.7, rtol=0, atol=1e-9)
    straddle = (r_code < 0.7) != (r_edges < 0.7)
    assert np.array_equal(differ[~tie], straddle[~tie]) and tie.sum() < 5
    frac = differ.sum() / edges.sum().item()
    assert 0.003 < frac < 0.015, frac  # 0.75% of the positives here (the review measured 0.74%)


def test_code_crop_box_hand_values():
    box = torch.tensor([[2 / 10, 0.0, 7 / 10, 1.0]])  # j = 2, w = 5 of W = 10; the full height of H = 5
    got = code_crop_box(box, torch.tensor([[10.0, 5.0]]))
    assert torch.allclose(got, torch.tensor([[2 / 9, 0.0, 6 / 9, 1.0]], dtype=torch.float64))


def test_pixpro_crop_coords_reads_the_batch_source_size():
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)]
    box = [torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), torch.tensor([[0.25, 0.0, 0.75, 0.5]] * 2)]
    batch = {"box": box, "flip": [torch.zeros(2, dtype=torch.bool)] * 2}
    with pytest.raises(ValueError, match="source_size"):
        tiny_pixpro(crop_coords="code")(views, batch)
    out = tiny_pixpro(crop_coords="code")(views, {**batch, "source_size": torch.tensor([[8.0, 8.0]] * 2)})
    assert torch.isfinite(out["loss"])
    with pytest.raises(ConfigError, match="method.crop_coords"):
        build_config("pixpro-scenes", ["method.crop_coords=corners"])
    with pytest.raises(ConfigError, match="method.crop_coords"):
        build_config("pixpro-video-scenes", ["method.crop_coords=code"])


def test_collate_views_carries_the_source_size():
    images = [{"image": torch.zeros(3, 40, 50, dtype=torch.uint8)}, {"image": torch.zeros(3, 30, 20, dtype=torch.uint8)}]
    ds = ViewDataset(images, ViewSampler([ViewConfig(size=16), ViewConfig(size=16)]), seed=0)
    batch = collate_views([ds[(0, 0)], ds[(0, 1)]])
    assert torch.equal(batch["source_size"], torch.tensor([[50.0, 40.0], [20.0, 30.0]]))


# ----------------------------------------------------------------------------- views.blur_kind (SCRL)


def test_resize_blur_is_bicubic_down_then_up():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 40, generator=g)
    small = F.interpolate(x, size=(26, 26), mode="bicubic", align_corners=False, antialias=True)  # int(40 / 1.5)
    want = F.interpolate(small, size=(40, 40), mode="bicubic", align_corners=False).clamp(0, 1)
    assert torch.equal(resize_blur(x, 1.5), want)
    assert torch.allclose(resize_blur(torch.full((1, 3, 40, 40), 0.3), 1.2), torch.tensor(0.3), atol=1e-6)


def test_blur_kind_resize_applies_the_resize_blur_with_a_drawn_factor_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g)
    cfg = ViewConfig(size=32, jitter_p=0.0, gray_p=0.0, blur_p=1.0, blur_kind="resize")
    p = sample_photometric_params(cfg, 6, torch.Generator().manual_seed(1))
    out = apply_photometric(x.clone(), p, cfg)
    for b in range(6):
        factor = RESIZE_BLUR_FACTORS[int(p["resize_factor"][b])]
        assert torch.allclose(out[b:b + 1], resize_blur(x[b:b + 1], factor), atol=1e-6), b
    # blur_p still selects the samples: p = 0 leaves the image as it is
    p0 = sample_photometric_params(ViewConfig(blur_p=0.0, blur_kind="resize", jitter_p=0, gray_p=0), 6,
                                   torch.Generator().manual_seed(1))
    assert torch.equal(apply_photometric(x.clone(), p0, ViewConfig(blur_p=0.0, blur_kind="resize")), x)


def test_blur_kind_default_draws_and_blurs_as_before():
    gauss, resize = ViewConfig(blur_p=0.5), ViewConfig(blur_p=0.5, blur_kind="resize")
    p0 = sample_photometric_params(gauss, 8, torch.Generator().manual_seed(3))
    p1 = sample_photometric_params(resize, 8, torch.Generator().manual_seed(3))
    assert set(p1) - set(p0) == {"resize_factor"}
    for k in p0:  # the new draw comes last: every other parameter is unchanged
        assert torch.equal(p0[k], p1[k]), k
    with pytest.raises(ConfigError, match="views.blur_kind"):
        build_config("scrl-scenes", ["views.0.blur_kind=box"])
