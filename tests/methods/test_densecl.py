import math

import pytest
import torch
import torch.nn.functional as F

from densessl.config import build_config
from densessl.methods.densecl import DenseCL, DenseCLConfig, densecl_loss, gather_positions, match_by_similarity
from densessl.methods.losses import dense_info_nce, info_nce_loss
from fixed_batch import assert_loss_falls, fit_four_logged_steps, tiny_queue_method
from test_moco import queue_method_losses, smoke_overrides


def tiny_densecl(**kw):
    return tiny_queue_method(DenseCL, DenseCLConfig, **kw)


def test_correspondence_picks_the_most_cosine_similar_key_position():
    # query positions point along x, y, -x; the key view holds them in another order, rescaled
    fq = torch.tensor([[[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]])  # (1, C=2, S=3)
    fk = torch.tensor([[[0.0, 5.0, -0.2, 0.7], [3.0, 0.1, 0.0, 0.7]]])  # y, ~x, -x, diagonal
    assert match_by_similarity(fq, fk).tolist() == [[1, 0, 2]]
    # the argmax is by cosine, not by dot product: a long vector off-axis does not win
    fk2 = torch.tensor([[[0.9, 10.0], [0.0, 10.0]]])
    assert match_by_similarity(fq[:, :, :1], fk2).tolist() == [[0]]


def test_gather_positions_takes_the_matched_key_vectors():
    k_grid = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    index = torch.tensor([[3, 0], [1, 1]])
    out = gather_positions(k_grid, index)
    assert out.shape == (2, 3, 2)
    assert torch.equal(out[0, :, 0], k_grid[0, :, 3]) and torch.equal(out[1, :, 1], k_grid[1, :, 1])


def test_dense_loss_hand_value():
    # one image, two positions; query vectors x and y; matched keys x and x; queue holds y
    q_grid = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, D=2, S=2)
    k_matched = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    queue = torch.tensor([[0.0], [1.0]])
    # position 0: logits [1, 0] / 0.5; position 1: [0, 1] / 0.5
    l0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    l1 = -math.log(1 / (1 + math.exp(2)))
    assert math.isclose(dense_info_nce(q_grid, k_matched, queue, 0.5).item(), (l0 + l1) / 2, rel_tol=1e-6)


def test_dense_loss_is_infonce_over_all_positions():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8, 5), dim=1)
    k = F.normalize(torch.randn(3, 8, 5), dim=1)
    queue = F.normalize(torch.randn(8, 16), dim=0)
    flat = info_nce_loss(q.permute(0, 2, 1).reshape(15, 8), k.permute(0, 2, 1).reshape(15, 8), queue, 0.2)
    assert torch.allclose(dense_info_nce(q, k, queue, 0.2), flat)
    assert torch.allclose(densecl_loss(torch.tensor(2.0), torch.tensor(4.0), 0.5), torch.tensor(3.0))
    assert torch.allclose(densecl_loss(torch.tensor(2.0), torch.tensor(4.0), 0.0), torch.tensor(2.0))


def test_warmup_turns_the_dense_loss_off_for_the_first_iterations():
    m = tiny_densecl(warmup_iters=3)
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    m.current_step = 2
    out = m(views, {})
    assert out["lambda"].item() == 0.0 and torch.allclose(out["loss"], out["global"])
    m.current_step = 3
    out = m(views, {})
    assert out["lambda"].item() == 0.5
    assert torch.allclose(out["loss"], 0.5 * out["global"] + 0.5 * out["dense"])


def test_queues_hold_the_global_key_and_the_pooled_dense_key_and_keys_get_no_gradient():
    torch.manual_seed(0)
    m = tiny_densecl()
    views = [torch.randn(8, 3, 64, 64), torch.randn(8, 3, 64, 64)]
    out = m(views, {})
    out["loss"].backward()
    with torch.no_grad():
        k_c5, k, k_grid, k_pooled = m.key_forward(m._key, views[1])  # same step: same shuffle
    assert k_c5.shape == (8, 64, 16) and k_grid.shape == (8, 16, 16)  # a 4x4 C5 grid at 64 px
    assert torch.allclose(m.queue["global"][:, :8], k.t(), atol=1e-6)
    assert torch.allclose(m.queue["dense"][:, :8], k_pooled.t(), atol=1e-6)
    assert int(m.queue.ptr) == 8
    keys = [m.key_backbone, m.key_head, m.key_dense_head]
    assert all(p.grad is None and not p.requires_grad for mod in keys for p in mod.parameters())
    assert m.dense_head.net[0].weight.grad is not None and m.head[0].weight.grad is not None
    assert out["features"].shape == (8, 64) and torch.isfinite(out["loss"])


def test_dense_pooled_key_is_the_normalised_mean_of_the_dense_head_output():
    torch.manual_seed(0)
    m = tiny_densecl(shuffle_bn=False)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        c5, k, k_grid, k_pooled = m._key(x)
        dense = m.key_dense_head(m.key_backbone(x, stages=("c5",))["c5"])
    assert torch.allclose(k_pooled, F.normalize(dense.mean(dim=(2, 3)), dim=1), atol=1e-6)
    assert torch.allclose(k_grid, F.normalize(dense.flatten(2), dim=1), atol=1e-6)


def test_densecl_loss_falls_on_a_fixed_cycle_of_batches():
    # one cycle's mean, the first full-queue one against the last, seeds 0-7: falls by 1.38-1.99 (2.8-3.2 -> 1.1-1.5)
    assert_loss_falls(queue_method_losses(tiny_densecl), drop=0.7, k=4)


def test_densecl_trains_four_steps_through_the_trainer(tmp_path):
    _, recs = fit_four_logged_steps(build_config("densecl-scenes", smoke_overrides(tmp_path, "method.warmup_iters=2")))
    assert all(math.isfinite(r["dense"]) for r in recs)
    assert [r["lambda"] for r in recs] == [0.0, 0.0, 0.5, 0.5]


def test_key_branch_runs_the_momentum_modules_not_the_online_ones():
    # lightly's example computes its "momentum" keys with the online backbone and heads; here the
    # online side is moved away (momentum 1 keeps the key encoder where it was) and the queue must
    # hold what the key encoder gives, not what the online encoder gives
    torch.manual_seed(0)
    m = tiny_densecl(momentum=1.0, shuffle_bn=False)
    with torch.no_grad():
        for p in list(m.backbone.parameters()) + list(m.head.parameters()) + list(m.dense_head.parameters()):
            p.add_(0.5 * torch.randn_like(p))
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    m(views, {})
    with torch.no_grad():
        _, k, _, k_pooled = m._key(views[1])
        c5 = m.backbone(views[1], stages=("c5",))["c5"]
        online_k = F.normalize(m.head(c5.mean(dim=(2, 3))), dim=1)
        online_pooled = F.normalize(m.dense_head(c5).mean(dim=(2, 3)), dim=1)
    assert torch.allclose(m.queue["global"][:, :8], k.t(), atol=1e-6)
    assert torch.allclose(m.queue["dense"][:, :8], k_pooled.t(), atol=1e-6)
    assert not torch.allclose(m.queue["global"][:, :8], online_k.t(), atol=1e-2)
    assert not torch.allclose(m.queue["dense"][:, :8], online_pooled.t(), atol=1e-2)


def test_collapse_statistics_are_the_std_of_the_global_and_dense_embeddings():
    torch.manual_seed(0)
    m = tiny_densecl(shuffle_bn=False)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    out = m(views, {})
    c5 = m.backbone(views[0], stages=("c5",))["c5"]
    q = F.normalize(m.head(c5.mean(dim=(2, 3))), dim=1)
    q_grid = F.normalize(m.dense_head(c5).flatten(2), dim=1)  # (N, D, S)
    assert float(out["z_std"]) == pytest.approx(float(q.std(dim=0).mean()), abs=1e-5)
    per_position = q_grid.permute(0, 2, 1).reshape(-1, q_grid.shape[1])  # N * S rows
    assert float(out["dense_z_std"]) == pytest.approx(float(per_position.std(dim=0).mean()), abs=1e-5)
