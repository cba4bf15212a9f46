import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from densessl.config import build_config
from densessl.engine.trainer import Trainer
from densessl.methods.losses import info_nce_logits, info_nce_loss
from densessl.methods.moco import MoCo, MoCoConfig
from densessl.methods.momentum import (SplitBatchNorm2d, batch_shuffle, batch_unshuffle, convert_split_bn, momentum_at,
                                       shuffle_permutation, shuffled_forward)
from fixed_batch import (assert_loss_falls, fit_four_logged_steps, noisy_views, project_optimizer, smooth_images,
                         tiny_queue_method, train_steps)


def tiny_moco(**kw):
    return tiny_queue_method(MoCo, MoCoConfig, **kw)


def test_logits_shape_is_n_by_one_plus_k_with_the_positive_first():
    q, k = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    queue = F.normalize(torch.randn(8, 12), dim=0)
    logits = info_nce_logits(q, k, queue, 0.2)
    assert logits.shape == (5, 13)
    assert torch.allclose(logits[:, 0], (q * k).sum(1) / 0.2) and torch.allclose(logits[:, 1:], q @ queue / 0.2)


def test_info_nce_hand_value_on_a_2x2_toy():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    queue = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # columns (0, 1) and (-1, 0)
    # sample 0: logits [1, 0, -1] / 0.5; sample 1: [0, 1, 0] / 0.5; target 0
    l0 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    l1 = -math.log(1 / (1 + math.exp(2) + 1))
    assert math.isclose(info_nce_loss(q, k, queue, 0.5).item(), (l0 + l1) / 2, rel_tol=1e-6)


def test_info_nce_gradient_reaches_only_the_query():
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8, requires_grad=True)
    queue = torch.randn(8, 16, requires_grad=True)
    info_nce_loss(q, k, queue, 0.2).backward()
    assert q.grad is not None and k.grad is None and queue.grad is None


def test_shuffle_then_unshuffle_is_the_identity():
    x = torch.randn(16, 3)
    perm = shuffle_permutation(16, step=5, device=x.device)
    assert sorted(perm.tolist()) == list(range(16)) and perm.tolist() != list(range(16))
    assert torch.equal(batch_shuffle(x, perm), x[perm])
    assert torch.equal(batch_unshuffle(batch_shuffle(x, perm), perm), x)
    assert torch.equal(shuffle_permutation(16, 5, x.device), perm)  # every rank derives the same one
    # a batch-dependent function of the shuffled batch, unshuffled, gives per-sample results in order
    out, seen = shuffled_forward(lambda t: (t - t.mean(0), t), x, step=5)
    assert torch.allclose(out, x - x.mean(0), atol=1e-6) and torch.equal(seen, x)


def test_split_batchnorm_normalises_strided_groups_and_is_plain_bn_in_eval():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    split = convert_split_bn(torch.nn.Sequential(bn), 4)[0]
    assert isinstance(split, SplitBatchNorm2d) and set(split.state_dict()) == set(bn.state_dict())
    x = torch.randn(8, 3, 2, 2) * 3 + 1
    y = split(x)
    ref = torch.nn.BatchNorm2d(3)
    ref.load_state_dict(split.state_dict())
    means = []
    for g in range(4):  # group g = samples g and g + 4
        r = torch.nn.BatchNorm2d(3)
        r.weight.data, r.bias.data = split.weight.data.clone(), split.bias.data.clone()
        assert torch.allclose(y[g::4], r(x[g::4]), atol=1e-5)
        means.append(r.running_mean)
    assert torch.allclose(split.running_mean, torch.stack(means).mean(0), atol=1e-6)
    split.eval()
    ref.eval()
    ref.load_state_dict(split.state_dict())
    assert torch.allclose(split(x), ref(x))
    with pytest.raises(ValueError, match="method.bn_splits=4 must divide the per-process batch"):
        split.train()(torch.randn(6, 3, 2, 2))


def test_momentum_schedules():
    assert momentum_at(10, 100, 0.999, "const") == 0.999
    assert momentum_at(0, 100, 0.99, "cosine") == 0.99 and momentum_at(100, 100, 0.99, "cosine") == 1.0
    # solo-learn's CIFAR presets: cosine from 0.99 to 0.999; halfway is the midpoint
    assert momentum_at(100, 100, 0.99, "cosine", 0.999) == 0.999
    assert math.isclose(momentum_at(50, 100, 0.99, "cosine", 0.999), 0.9945)
    with pytest.raises(ValueError, match="momentum_schedule"):
        momentum_at(0, 1, 0.9, "linear")


def test_the_key_update_follows_the_configured_cosine_end():
    # after step 8 of 10 the key moves with the momentum of step 9 (the key pass it prepares)
    m = tiny_moco(momentum=0.9, momentum_schedule="cosine", momentum_end=0.95)
    with torch.no_grad():
        m.backbone.conv1.weight.add_(1.0)
    old = m.key_backbone.conv1.weight.clone()
    m.after_step(8, 10)
    m9 = momentum_at(9, 10, 0.9, "cosine", 0.95)
    assert 0.9 < m9 < 0.95 and m.momentum == momentum_at(8, 10, 0.9, "cosine", 0.95)  # logged: the step just taken
    assert torch.allclose(m.key_backbone.conv1.weight, m9 * old + (1 - m9) * m.backbone.conv1.weight)
    before = m.key_backbone.conv1.weight.clone()
    m.after_step(9, 10)  # the last step: no key pass follows, so no update (as the official code)
    assert torch.equal(m.key_backbone.conv1.weight, before) and m.momentum == m9


def test_key_encoder_gets_no_gradient_and_ema_runs_after_the_optimiser_step():
    torch.manual_seed(0)
    m = tiny_moco(momentum=0.5)
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    assert torch.equal(m.key_backbone.conv1.weight, m.backbone.conv1.weight)
    with torch.no_grad():
        m.backbone.conv1.weight.add_(1.0)
    old = m.key_backbone.conv1.weight.clone()
    out = m(views, {})
    assert torch.equal(m.key_backbone.conv1.weight, old)  # forward leaves the key encoder alone
    m.after_step(0, 10)
    assert torch.allclose(m.key_backbone.conv1.weight, 0.5 * old + 0.5 * m.backbone.conv1.weight)
    out["loss"].backward()
    key_params = list(m.key_backbone.parameters()) + list(m.key_head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in key_params)
    assert m.backbone.conv1.weight.grad is not None and m.head[0].weight.grad is not None
    assert out["features"].shape == (8, 64) and not out["features"].requires_grad
    assert 0 <= out["top1"].item() <= 1 and torch.isfinite(out["loss"])


def test_forward_enqueues_the_keys_it_used():
    torch.manual_seed(0)
    m = tiny_moco()
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    m(views, {})
    with torch.no_grad():
        k = m.key_forward(m._key, views[1])  # same step -> same shuffle, same weights
    assert int(m.queue.ptr) == 8
    assert torch.allclose(m.queue["key"][:, :8], k.t(), atol=1e-6)
    assert torch.allclose(k.norm(dim=1), torch.ones(8))


def test_symmetric_variant_enqueues_both_views():
    torch.manual_seed(0)
    m = tiny_moco(symmetric=True)
    out = m([torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)], {})
    assert int(m.queue.ptr) == 16 and torch.isfinite(out["loss"])


def test_without_shuffle_bn_the_backbone_keeps_plain_batchnorm():
    m = tiny_moco(shuffle_bn=False)
    assert not any(isinstance(x, SplitBatchNorm2d) for x in m.modules())
    m2 = tiny_moco()
    assert any(isinstance(x, SplitBatchNorm2d) for x in m2.key_backbone.modules())
    assert any(isinstance(x, SplitBatchNorm2d) for x in m2.backbone.modules())


def batch_cycle(n: int = 4, B: int = 8, seed: int = 0) -> list:
    """n fixed batches of B images (two noisy 32-px views each), trained on in turn. With a queue
    of (n - 1) * B keys the negatives are always the other batches' images; one fixed batch would
    fill the queue with copies of its own positives, and the loss would rise to ln K."""
    return [(noisy_views(smooth_images(B, seed=seed * n + i), (32, 32), noise=0.1, seed=100 + seed * n + i), {})
            for i in range(n)]


def queue_method_losses(make, seed: int = 0, steps: int = 32) -> list[float]:
    """The losses of `make` (a tiny_* builder) trained with the project's SGD on batch_cycle(),
    from step 3 on: the first steps' queues still hold random columns (a much lower loss)."""
    torch.manual_seed(seed)
    m = make(queue_size=24, momentum=0.9, bn_splits=2)  # shuffle-BN in 2 groups of 4 images
    opt = project_optimizer(m, "sgd", lr=0.01, weight_decay=1e-4)
    return train_steps(m, batch_cycle(seed=seed), opt, steps)[3:]


def test_moco_loss_falls_on_a_fixed_cycle_of_batches():
    # the mean over one cycle, the first full-queue one against the last, seeds 0-7: falls by 0.65-1.58
    # (3.0-3.2, about ln 25, -> 1.6-2.4)
    assert_loss_falls(queue_method_losses(tiny_moco), drop=0.3, k=4)


def smoke_overrides(tmp_path, *extra):
    """TINY, without BYOL's predictor key, at 4 steps of 8 images (BN in 4 groups of 2)."""
    return [o for o in TINY if not o.startswith("method.pred_hidden_dim")] + [
        "train.epochs=1", "train.batch_size=8", "train.steps_per_epoch=4", "method.queue_size=32",
        "method.bn_splits=4", f"run_dir={tmp_path / 'run'}", *extra]


def test_moco_trains_four_steps_through_the_trainer(tmp_path):
    trainer, _ = fit_four_logged_steps(build_config("mocov2-scenes", smoke_overrides(tmp_path)))
    assert int(trainer.method.queue.ptr) == 0  # 4 steps x 8 keys = one full turn of a 32-key queue


@pytest.mark.slow
def test_resume_from_a_mid_run_checkpoint_restores_queue_and_shuffle_exactly(tmp_path):
    import shutil

    from densessl.common.checkpoint import load_checkpoint

    run = tmp_path / "run"
    args = smoke_overrides(tmp_path, "train.keep_every=2", "train.ckpt_every=2")
    Trainer(build_config("mocov2-scenes", args)).fit()
    shutil.move(str(run), str(tmp_path / "done"))
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "done" / "checkpoints" / "step_0000002.pt", run / "checkpoints" / "last.pt")
    Trainer(build_config("mocov2-scenes", args)).fit()  # resumes at step 2 in the same run_dir
    a = load_checkpoint(tmp_path / "done" / "checkpoints" / "last.pt")["method"]
    b = load_checkpoint(run / "checkpoints" / "last.pt")["method"]
    assert {"queue.queue_key", "queue.ptr"} <= set(a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
