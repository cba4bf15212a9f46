import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densessl.config import build_config
from densessl.methods.losses import (cross_entropy_to_codes, sinkhorn, sinkhorn_codes, swapped_prediction_loss,
                                    usage_entropy)
from densessl.methods.prototypes import EmbeddingQueue
from densessl.methods.swav import SwAV, SwAVConfig
from densessl.models.backbones import build_backbone
from fixed_batch import (assert_loss_falls, assert_prototypes_frozen_then_trained, fit_four_logged_steps,
                         lars_losses_on_fixed_multicrop, multicrop_prototype_overrides)


def cosines(B, K, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, d, generator=g), dim=1) @ F.normalize(torch.randn(K, d, generator=g), dim=1).t()


def reference_sinkhorn(scores, eps, iters):
    """SwAV's single-process formula in float64 numpy, no max subtraction."""
    Q = np.exp(scores.double().numpy() / eps).T
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(iters):
        Q /= Q.sum(axis=1, keepdims=True)
        Q /= K
        Q /= Q.sum(axis=0, keepdims=True)
        Q /= B
    return torch.from_numpy((Q * B).T)


# ---------------------------------------------------------------- Sinkhorn


def test_sinkhorn_matches_reference_and_rows_sum_to_one():
    s = cosines(64, 16)
    q = sinkhorn(s, 0.05, 3)
    assert q.dtype == torch.float32 and q.shape == (64, 16)
    assert torch.allclose(q.double(), reference_sinkhorn(s, 0.05, 3), rtol=1e-4, atol=1e-7)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)  # exactly 1 after the last step


def test_sinkhorn_prototype_marginals_approach_one_over_k():
    s = cosines(64, 16)
    B, K = s.shape
    raw = torch.softmax(s / 0.05, dim=1).sum(0) / B  # no balancing at all
    three = sinkhorn(s, 0.05, 3).sum(0) / B
    many = sinkhorn(s, 0.05, 200).sum(0) / B
    assert torch.allclose(many, torch.full((K,), 1 / K), rtol=1e-3)
    assert (three - 1 / K).abs().mean() < 0.7 * (raw - 1 / K).abs().mean()
    assert ((three * K) > 0.5).all() and ((three * K) < 2.0).all()
    # the usual regime at initialisation: nearly uniform scores -> marginals within a few % of 1/K
    near = sinkhorn(0.05 * cosines(256, 30, d=128), 0.05, 3).sum(0) / 256
    assert torch.allclose(near * 30, torch.ones(30), atol=0.05)


def test_sinkhorn_is_shift_invariant_globally_and_per_prototype_not_per_sample():
    s = cosines(32, 12)
    q = sinkhorn(s)
    assert torch.allclose(sinkhorn(s + 3.7), q, atol=1e-6)
    assert torch.allclose(sinkhorn(s - 0.05 * torch.arange(12.0)), q, atol=1e-6)  # per prototype
    assert not torch.allclose(sinkhorn(s + 0.5 * torch.arange(32.0)[:, None]), q, atol=1e-3)  # per sample


def test_sinkhorn_constant_scores_give_uniform_codes_and_large_scores_do_not_overflow():
    assert torch.allclose(sinkhorn(torch.zeros(6, 4)), torch.full((6, 4), 0.25))
    s = cosines(16, 8)
    q = sinkhorn(5 + s, 0.05, 3)  # exp(6 / 0.05) would overflow fp32 without the shift
    assert torch.isfinite(q).all() and torch.allclose(q, sinkhorn(s, 0.05, 3), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = sinkhorn(s.bfloat16(), 0.05, 3)  # bf16 scores under autocast: computed in fp32
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    assert torch.allclose(q.sum(1), torch.ones(16), atol=1e-5)


def test_collapsed_embeddings_are_a_fixed_point_at_ln_k():
    """The failure docs/studies/2026-11-results-notebook.md measured on 64-px scenes: identical embeddings give identical
    score rows, Sinkhorn returns uniform codes (however peaked each row is), and a prediction
    that is uniform too costs exactly ln K with zero gradient: nothing pulls the run out."""
    K, B = 12, 16
    row = cosines(1, K)
    q = sinkhorn(row.expand(B, K).contiguous(), 0.02, 3)
    assert torch.allclose(q, torch.full((B, K), 1 / K), atol=1e-6)
    uniform_scores = torch.zeros(B, K, requires_grad=True)
    loss = cross_entropy_to_codes(q, uniform_scores, 0.1)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(K), abs=1e-6)
    assert uniform_scores.grad.abs().max() < 1e-7
    varied = cosines(B, K, seed=1)  # distinct embeddings: codes differ between samples
    assert sinkhorn(varied, 0.02, 3).std(dim=0).max() > 0.05


def test_sinkhorn_codes_drop_queue_rows():
    s, extra = cosines(8, 6, seed=1), cosines(24, 6, seed=2)
    q = sinkhorn_codes(s, extra)
    assert q.shape == (8, 6)
    assert torch.allclose(q, sinkhorn(torch.cat([extra, s]))[-8:])
    assert not torch.allclose(q, sinkhorn(s), atol=1e-3)


def _sinkhorn_worker(rank, world, port, tmp, global_scores, order):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        n = global_scores.shape[0] // world
        mine = order[rank * n:(rank + 1) * n]  # any partition of the rows: Sinkhorn sees a set
        codes = sinkhorn(global_scores[mine], 0.05, 3)
        # the queue holds the gathered rows in the 1-process order (blocks = 2 cells per image)
        queue = EmbeddingQueue(1, 12, 3)
        z = torch.tensor([[9.0 * cell + 100 * rank] * 3 for cell in range(2)])  # 2 cells x 1 image per rank
        queue.push(0, z, 12, blocks=2)
        torch.save({"codes": codes, "rows": mine, "queue": queue.queue.clone(),
                    "pushed": queue.rows_pushed[0]}, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_give_the_codes_of_one_process(tmp_path):
    scores = cosines(16, 10, seed=3) * 0.9
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    torch.multiprocessing.spawn(_sinkhorn_worker, args=(2, _free_port(), str(tmp_path), scores, order), nprocs=2)
    one = sinkhorn(scores, 0.05, 3)
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.allclose(res["codes"], one[res["rows"]], atol=1e-6), r
    # the gathered queue is the same on both ranks and in the 1-process order: cell-major, then rank
    q0, q1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(q0["queue"], q1["queue"]) and q0["pushed"] == 4
    cells = q0["queue"][0, :4, 0].tolist()
    assert cells == [0.0, 100.0, 9.0, 109.0]  # cell 0 (rank 0, rank 1), then cell 1 (rank 0, rank 1)


# ---------------------------------------------------------------- loss


def test_swapped_prediction_loss_matches_explicit_sum_and_hand_values():
    K, B = 7, 5
    scores = [cosines(B, K, seed=i) for i in range(4)]
    codes = [sinkhorn(scores[0]), sinkhorn(scores[1])]
    loss = swapped_prediction_loss(codes, scores, (0, 1), 0.1)
    expected = 0
    for q, a in zip(codes, (0, 1)):
        for v in range(4):
            if v != a:
                expected -= (q * torch.log_softmax(scores[v] / 0.1, 1)).sum(1).mean() / 3
    assert torch.allclose(loss, expected / 2)
    # uniform predictions: ln K whatever the codes
    flat = [torch.zeros(B, K)] * 3
    assert math.isclose(swapped_prediction_loss(codes[:1], flat, (0,), 0.1).item(), math.log(K), rel_tol=1e-6)
    # two crops: half of l(z1, q0) + l(z0, q1)
    two = swapped_prediction_loss(codes, scores[:2], (0, 1), 0.1)
    half = 0.5 * (cross_entropy_to_codes(codes[0], scores[1], 0.1) + cross_entropy_to_codes(codes[1], scores[0], 0.1))
    assert torch.allclose(two, half)


def test_codes_are_constants():
    s = cosines(6, 4).requires_grad_(True)
    q = sinkhorn(s)
    assert not q.requires_grad
    loss = cross_entropy_to_codes(q, s, 0.1)
    loss.backward()  # gradient only through the prediction
    assert s.grad is not None


def test_usage_entropy():
    assert usage_entropy(torch.eye(4).repeat(2, 1)).item() == pytest.approx(math.log(4))
    assert usage_entropy(torch.tensor([[0.0, 1.0]] * 5)).item() == 0.0


# ---------------------------------------------------------------- module


def tiny_swav(**kw):
    torch.manual_seed(0)
    cfg = SwAVConfig(**{"proj_hidden_dim": 32, "proj_dim": 128, "num_prototypes": 50, **kw})
    return SwAV(cfg, build_backbone("resnet18_small", 8))


def random_views(B=16, seed=0, sizes=(32, 32, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, s, s, generator=g) for s in sizes]


def test_initial_loss_is_about_ln_k():
    # independent random crops: CE = logsumexp of K logits of std sigma ~ ln K + sigma^2 / 2,
    # sigma^2 = 1 / (d T^2) for random unit vectors in d = 128 dims (0.39 here)
    m = tiny_swav()
    out = m(random_views(), {})
    expected = math.log(50) + 1 / (2 * 128 * 0.1 ** 2)
    assert abs(out["loss"].item() - expected) < 0.15, out["loss"].item()
    assert out["features"].shape == (16, 64) and not out["features"].requires_grad
    for k in ("swav", "usage_entropy", "z_std", "queue_used"):
        assert out[k].ndim == 0 and not out[k].requires_grad
    assert out["usage_entropy"] > 1.0  # no collapse at initialisation


def test_prototypes_are_renormalised_before_forward_and_frozen_at_first():
    m = tiny_swav(freeze_prototypes_iters=2)
    with torch.no_grad():
        m.prototypes.weight.mul_(3.0)
    out = m(random_views(), {})
    assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(50), atol=1e-6)
    out["loss"].backward()
    assert m.prototypes.weight.grad is not None
    m.before_optimizer_step(1)
    assert m.prototypes.weight.grad is None and m.projector[0].weight.grad is not None
    m(random_views(), {})["loss"].backward()
    m.before_optimizer_step(2)  # freeze over
    assert m.prototypes.weight.grad is not None


def test_prototypes_stay_fixed_under_lars_during_the_freeze_and_train_after_it():
    """Real optimiser steps (the project's LARS, momentum and weight decay on): the frozen
    prototypes get no update at all for 3 steps, then move."""
    m = tiny_swav(freeze_prototypes_iters=3)
    assert_prototypes_frozen_then_trained(m, random_views(B=8), freeze=3)


def swav_fixed_batch_losses(seed: int = 0, steps: int = 20) -> list[float]:
    """Losses of 20 LARS steps on 2 x 32 + 2 x 16 px views of 16 fixed images."""
    return lars_losses_on_fixed_multicrop(tiny_swav(freeze_prototypes_iters=0), 16, seed, steps)


def test_swav_loss_falls_on_a_fixed_batch():
    assert_loss_falls(swav_fixed_batch_losses(), drop=0.2)  # falls by 0.45-0.72 (seeds 0-7; 4.1-4.2 -> 3.4-3.7)


def test_gradient_reaches_backbone_head_and_prototypes():
    m = tiny_swav(freeze_prototypes_iters=0)
    m(random_views(), {})["loss"].backward()
    for p in (m.backbone.conv1.weight, m.projector[3].weight, m.prototypes.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_queue_inactive_before_start_epoch_then_fifo_and_used_once_full():
    m = tiny_swav(queue_length=40, epoch_queue_starts=2)  # usable 32 = 2 batches of 16
    m.steps_per_epoch = 3
    assert m.queue.queue.shape == (2, 40, 128)
    for step in range(6):  # epochs 0 and 1: nothing queued
        m.current_step = step
        out = m(random_views(seed=step), {})
        assert out["queue_used"].item() == 0.0
    assert m.queue.rows_pushed == [0, 0] and not m.queue.queue.any()

    m.current_step = 6
    out = m(random_views(seed=6), {})  # first push: queue not yet full -> not used
    assert out["queue_used"].item() == 0.0 and m.queue.rows_pushed == [16, 16]
    first = m.queue.queue[:, :16].clone()
    assert first.norm(dim=-1).allclose(torch.ones(2, 16), atol=1e-5) and not m.queue.queue[:, 16:].any()
    m.current_step = 7
    m(random_views(seed=7), {})
    assert torch.equal(m.queue.queue[:, 16:32], first)  # FIFO: the older batch moved back
    assert not m.queue.queue[:, 32:].any()  # rows past the usable length are never used
    m.current_step = 8
    out = m(random_views(seed=8), {})
    assert out["queue_used"].item() == 1.0


def test_queue_scores_enter_sinkhorn_and_state_survives_a_checkpoint():
    m = tiny_swav(queue_length=16, epoch_queue_starts=0)
    views = random_views(seed=1)
    m(random_views(seed=2), {})  # (a queue holding the current batch itself would not change the codes)
    state = m.state_dict()
    assert state["queue._extra_state"] == {"rows_pushed": [16, 16]}
    m2 = tiny_swav(queue_length=16, epoch_queue_starts=0)
    m2.load_state_dict(state)
    assert m2.queue.rows_pushed == [16, 16] and torch.equal(m2.queue.queue, m.queue.queue)
    with torch.no_grad():
        with_queue = m(views, {})["loss"]
        without = tiny_swav()(views, {})["loss"]
    assert not torch.isclose(with_queue, without)


def test_queue_shorter_than_the_batch_is_an_error():
    m = tiny_swav(queue_length=8, epoch_queue_starts=0)
    with pytest.raises(ValueError, match="queue_length=8 is shorter than the global batch 16"):
        m(random_views(), {})


def test_too_few_views_is_a_clear_error():
    with pytest.raises(ValueError, match="crops_for_assign"):
        tiny_swav()(random_views(sizes=(32,)), {})


# ---------------------------------------------------------------- smoke


def swav_overrides(tmp_path):
    return multicrop_prototype_overrides(tmp_path, "method.queue_length=16")


def test_swav_trains_four_steps_through_the_trainer(tmp_path):
    cfg = build_config("swav-scenes", swav_overrides(tmp_path))
    trainer, recs = fit_four_logged_steps(cfg)
    assert trainer.method.queue.rows_pushed == [32, 32]  # epoch 1 = steps 2 and 3
    assert [r["queue_used"] for r in recs] == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_process_with_the_queue(tmp_path):
    """End to end: 2 ranks (gathered queue, all-reduced Sinkhorn, synchronised BN) give the
    losses of 1 process on the same global batch, including the steps that use the queue."""
    import subprocess
    import sys

    from conftest import cli_command, subprocess_env

    args = [o for o in swav_overrides(tmp_path) if not o.startswith("run_dir=")] + [
        "optim.lr=0.05", "train.ckpt_every=100", "method.queue_length=32", "method.epoch_queue_starts=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    env = subprocess_env()
    subprocess.run(cli_command("pretrain", "swav-scenes", *args, f"run_dir={one}"), check=True, env=env,
                   capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "densessl.cli", "pretrain", "swav-scenes", *args, f"run_dir={two}",
                "train.sync_bn=true"]
    res = subprocess.run(torchrun, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    def records(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in recs if "loss" in r}

    r1, r2 = records(one), records(two)
    assert sorted(r1) == sorted(r2) == [1, 2, 3, 4]
    assert [r1[s]["queue_used"] for s in r1] == [0.0, 0.0, 1.0, 1.0]  # 32 rows = 2 global batches
    for s in r1:
        assert abs(r1[s]["loss"] - r2[s]["loss"]) < 1e-4 * max(1.0, abs(r1[s]["loss"])), (s, r1[s], r2[s])
        assert r1[s]["queue_used"] == r2[s]["queue_used"]
