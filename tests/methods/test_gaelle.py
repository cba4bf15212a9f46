import copy
import math

import pytest
import torch
import torch.nn.functional as F

from densessl.config import build_config
from densessl.methods.gaelle import (GAELLE, GAELLEConfig, attention_entropy, attention_maps, group_tokens,
                                     head_per_position, shuffled_token_loss)
from densessl.methods.losses import cross_entropy_to_codes, sinkhorn
from densessl.models.backbones import build_backbone
from densessl.models.heads import mlp
from fixed_batch import (assert_loss_falls, assert_prototypes_frozen_then_trained, fit_four_logged_steps,
                         lars_losses_on_fixed_multicrop, multicrop_prototype_overrides)


def reference_tokens(feats, attn, groups):
    """The spec's definition, one token at a time: token j = concat_g F_g a_{g T + j}."""
    n, C, N = feats.shape
    D = attn.shape[-1]
    T, Cg = D // groups, C // groups
    out = torch.zeros(n, T, C, dtype=torch.float64)
    for b in range(n):
        for j in range(T):
            out[b, j] = torch.cat([feats[b, g * Cg:(g + 1) * Cg].double() @ attn[b, :, g * T + j].double()
                                   for g in range(groups)])
    return out


def test_tokens_match_the_reference_and_constant_projection_gives_gap():
    torch.manual_seed(0)
    feats, proj = torch.randn(3, 16, 9), torch.randn(3, 9, 8)
    attn = attention_maps(proj)
    assert torch.allclose(attn.sum(dim=1), torch.ones(3, 8), atol=1e-6)
    tok = group_tokens(feats, attn, groups=4)
    assert tok.shape == (3, 2, 16)
    assert torch.allclose(tok.double(), reference_tokens(feats, attn, 4), atol=1e-6)
    # the same projection at every position: uniform attention, every token = GAP of the map
    flat = attention_maps(torch.randn(3, 1, 8).expand(3, 9, 8))
    assert torch.allclose(flat, torch.full_like(flat, 1 / 9))
    gap = feats.mean(dim=2, keepdim=True).transpose(1, 2)
    assert torch.allclose(group_tokens(feats, flat, 4), gap.expand(3, 2, 16), atol=1e-6)
    assert attention_entropy(flat).item() == pytest.approx(math.log(9), rel=1e-6)


def test_attention_temperature_sharpens_the_maps():
    proj = torch.randn(2, 16, 8)
    assert attention_entropy(attention_maps(proj, 0.1)) < attention_entropy(attention_maps(proj, 1.0))


def test_head_per_position_uses_per_position_batch_statistics():
    torch.manual_seed(0)
    head = mlp(4, 6, 3)
    fmap = torch.randn(5, 4, 2, 3)
    out = head_per_position(head, fmap)
    assert out.shape == (5, 6, 3)
    for p in range(6):
        assert torch.allclose(out[:, p], head(fmap.flatten(2)[:, :, p]), atol=1e-6)


def test_shuffled_token_loss_permutes_prediction_slots():
    torch.manual_seed(0)
    B, T, K = 2, 4, 5
    codes = sinkhorn(torch.randn(B * T, K)).view(B, T, K)
    pred = torch.randn(B, T, K)
    perm = torch.tensor([2, 0, 3, 1])
    loss = shuffled_token_loss(codes, pred, perm, 0.1)
    expected = sum(cross_entropy_to_codes(codes[:, j], pred[:, perm[j]], 0.1) for j in range(T)) / T
    assert torch.allclose(loss, expected)
    assert torch.allclose(shuffled_token_loss(codes, pred, None, 0.1), cross_entropy_to_codes(
        codes.reshape(-1, K), pred.reshape(-1, K), 0.1))


def tiny_gaelle(**kw):
    torch.manual_seed(0)
    cfg = GAELLEConfig(**{"proj_hidden_dim": 32, "proj_dim": 128, "num_prototypes": 60, "local_hidden_dim": 32,
                          "local_dim": 128, "num_local_prototypes": 60, "groups": 4, "queue_length": 0, **kw})
    return GAELLE(cfg, build_backbone("resnet18_small", 8))


def views_for(B=4, seed=0, big=32, small=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, s, s, generator=g) for s in (big, big, small, small)]


def test_shapes_initial_losses_and_attention_entropy_at_initialisation():
    m = tiny_gaelle()
    t = m.terms(views_for(big=64))  # 4x4 maps: N = 16 positions, T = 128 / 4 = 32 tokens
    assert m.tokens == 32
    # random unit vectors in d = 128 dims: each CE ~ ln K + 1 / (2 d T^2)
    expected = math.log(60) + 1 / (2 * 128 * 0.01)
    for k in ("glb", "local", "l2g"):
        assert abs(t[k].item() - expected) < 0.25, (k, t[k].item())
    assert t["attn_entropy"].item() >= 0.95 * math.log(16)
    out = m(views_for(big=64), {})
    assert abs(out["loss"].item() - expected) < 0.25  # (the mean of three terms of ~ln K)
    for k in ("glb", "local", "l2g", "usage_entropy", "usage_entropy_local", "attn_entropy", "z_std"):
        assert out[k].ndim == 0 and not out[k].requires_grad
    assert out["features"].shape == (4, 64)


def _grad_norms(m, loss):
    m.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: (0.0 if p.grad is None else p.grad.abs().sum().item()) for n, p in m.named_parameters()}


def test_faithful_cross_view_term_cannot_change_the_backbone():
    m = tiny_gaelle(cross_view_detach=True)
    g = _grad_norms(m, m.terms(views_for())["l2g"])
    assert g["l2g_prototypes.weight"] > 0
    assert all(v == 0 for n, v in g.items() if n != "l2g_prototypes.weight"), \
        [n for n, v in g.items() if v and n != "l2g_prototypes.weight"]
    m = tiny_gaelle(cross_view_detach=False)  # intended: it trains the trunk, attention and local head
    g = _grad_norms(m, m.terms(views_for())["l2g"])
    assert g["backbone.conv1.weight"] > 0 and g["local_head.0.weight"] > 0 and g["projector.0.weight"] > 0
    assert g["prototypes.weight"] == 0 and g["local_prototypes.weight"] == 0


def test_faithful_backbone_trajectory_is_the_same_without_the_cross_view_term():
    def train(weights, detach):
        m = tiny_gaelle(cross_view_detach=detach, loss_weights=weights, freeze_prototypes_iters=0)
        opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
        for step in range(2):
            m.current_step = step
            opt.zero_grad()
            m(views_for(seed=step), {})["loss"].backward()
            opt.step()
        return m

    with_term, without = train((1 / 3, 1 / 3, 1 / 3), True), train((1 / 3, 1 / 3, 0.0), True)
    for (n, a), b in zip(with_term.named_parameters(), without.parameters()):
        assert torch.equal(a, b) == (n != "l2g_prototypes.weight"), n
    intended = train((1 / 3, 1 / 3, 1 / 3), False)
    assert not torch.equal(intended.backbone.conv1.weight, without.backbone.conv1.weight)
    # the claims study's control (gaelle-nocross-third: the recipe's undetached term at weight 0)
    # trains the code's backbone too
    zero_weight = train((1 / 3, 1 / 3, 0.0), False)
    for (n, a), b in zip(zero_weight.named_parameters(), with_term.parameters()):
        assert torch.equal(a, b) == (n != "l2g_prototypes.weight"), n


def test_token_shuffle_is_reproducible_and_a_no_op_with_one_token():
    m = tiny_gaelle()
    m.current_step = 3
    a, b = m._perm(0, torch.device("cpu")), m._perm(0, torch.device("cpu"))
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(32)) and not torch.equal(a, torch.arange(32))
    assert not torch.equal(a, m._perm(1, torch.device("cpu")))
    again = tiny_gaelle()
    again.current_step = 3
    with torch.no_grad():
        assert torch.equal(m(views_for(), {})["local"], again(views_for(), {})["local"])
        shuffled = tiny_gaelle(proj_dim=4, groups=4)(views_for(), {})["local"]  # T = 1
        plain = tiny_gaelle(proj_dim=4, groups=4, token_shuffle=False)(views_for(), {})["local"]
    assert torch.allclose(shuffled, plain, rtol=1e-6)


def test_three_prototype_banks_renormalised_and_frozen_together():
    m = tiny_gaelle(freeze_prototypes_iters=1)
    with torch.no_grad():
        for layer in m.prototype_layers():
            layer.weight.mul_(2.0)
    m(views_for(), {})["loss"].backward()
    for layer in m.prototype_layers():
        assert torch.allclose(layer.weight.norm(dim=1), torch.ones(layer.weight.shape[0]), atol=1e-5)
    m.before_optimizer_step(0)
    assert all(layer.weight.grad is None for layer in m.prototype_layers())


def test_local_queue_holds_tokens_scored_with_local_prototypes():
    m = tiny_gaelle(local_queue_length=256, queue_length=8, epoch_queue_starts=0)  # B * T = 128 per push
    with torch.no_grad():
        for step in range(3):
            m.current_step = step
            out = m(views_for(seed=step), {})
    assert m.local_queue.rows_pushed == [384, 384] and m.queue.rows_pushed == [12, 12]
    assert out["queue_used"].item() == 1.0  # 8 rows, full after 2 pushes of 4


def test_local_queue_is_scored_with_the_local_prototypes_not_the_global_ones(monkeypatch):
    """The code's bug (specs 3.7.4) is not reproduced: the queued token embeddings enter the local
    Sinkhorn scored against the local prototypes. So, with a full local queue, L_local (a) uses
    the queue, (b) is unchanged when only the global prototypes change, and (c) the queue scores
    that enter Sinkhorn are exactly queue @ local_prototypes^T."""
    import densessl.methods.gaelle as gaelle

    m = tiny_gaelle(local_queue_length=256, epoch_queue_starts=0)  # B * T = 4 * 32 = 128 tokens per push
    with torch.no_grad():
        for step in range(2):
            m.current_step = step
            m(views_for(seed=step), {})
    assert m.local_queue.rows_pushed == [256, 256] and m.local_queue.queue.abs().sum() > 0
    m.current_step = 2
    views = views_for(seed=5)

    def local_term(model):
        with torch.no_grad():
            return copy.deepcopy(model).terms(views)["local"]  # a copy: the queue push stays out of m

    base = local_term(m)
    unused = copy.deepcopy(m)
    unused.local_queue.rows_pushed = [0, 0]  # not full: not used
    assert not torch.allclose(local_term(unused), base, rtol=1e-4)  # (a)
    other = copy.deepcopy(m)
    with torch.no_grad():
        other.prototypes.weight.copy_(torch.randn_like(other.prototypes.weight))
    assert torch.equal(local_term(other), base)  # (b)

    calls = []
    original = gaelle.sinkhorn_codes

    def recording(scores, queue_scores=None, *args, **kwargs):
        calls.append((scores.shape, queue_scores))
        return original(scores, queue_scores, *args, **kwargs)

    monkeypatch.setattr(gaelle, "sinkhorn_codes", recording)
    with torch.no_grad():
        copy.deepcopy(m).terms(views)
    local_calls = [q for shape, q in calls if shape[0] == 4 * 32]  # B * T token rows (global calls: B rows)
    assert len(local_calls) == 2
    for a, q in enumerate(local_calls):  # the queue rows as they were before this step's push
        expected = m.local_queue.queue[a, :256] @ F.normalize(m.local_prototypes.weight, dim=1).t()
        assert q is not None and torch.allclose(q, expected, atol=1e-5)
        assert not torch.allclose(q, m.local_queue.queue[a, :256] @ F.normalize(m.prototypes.weight, dim=1).t(),
                                  atol=1e-2)


def test_three_prototype_banks_stay_fixed_under_lars_during_the_freeze_and_train_after_it():
    m = tiny_gaelle(freeze_prototypes_iters=3)
    assert_prototypes_frozen_then_trained(m, views_for(), freeze=3)


def gaelle_fixed_batch_losses(seed: int = 0, steps: int = 20) -> list[float]:
    """Losses of LARS steps on 2 x 32 + 2 x 16 px views of 8 fixed images."""
    return lars_losses_on_fixed_multicrop(tiny_gaelle(freeze_prototypes_iters=0), 8, seed, steps)


def test_gaelle_loss_falls_on_a_fixed_batch():
    assert_loss_falls(gaelle_fixed_batch_losses(), drop=0.4)  # falls by 0.77-0.97 (seeds 0-7; 4.3-4.4 -> 3.4-3.6)


# ---------------------------------------------------------------- smoke


def gaelle_overrides(tmp_path):
    return multicrop_prototype_overrides(tmp_path, "method.local_hidden_dim=32", "method.local_dim=16",
                                         "method.num_local_prototypes=32", "method.queue_length=16")


def test_gaelle_trains_four_steps_through_the_trainer(tmp_path):
    cfg = build_config("gaelle-scenes", gaelle_overrides(tmp_path))
    _, recs = fit_four_logged_steps(cfg)
    assert all(k in recs[0] for k in ("glb", "local", "l2g", "attn_entropy"))
    assert [r["queue_used"] for r in recs] == [0.0, 0.0, 0.0, 1.0]
