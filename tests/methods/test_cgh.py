import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from densessl.config import build_config
from densessl.engine.trainer import Trainer
from densessl.methods.cgh import CGH, CGHConfig, cgh_losses, cgh_weights, hypercolumn
from densessl.methods.losses import relation, relation_ce
from densessl.models.backbones import build_backbone
from fixed_batch import assert_loss_falls
from test_moco import queue_method_losses, smoke_overrides


def tiny_cgh(backbone="resnet18_small", width=8, **kw):
    kw.setdefault("bn_splits", 4)
    kw.setdefault("queue_size", 64)
    cfg = CGHConfig(proj_hidden_dim=32, proj_dim=16, **kw)
    return CGH(cfg, build_backbone(backbone, width))


def test_defaults_are_the_effective_temperatures_of_the_code():
    c = CGHConfig()
    assert (c.temp_teacher_g2h, c.temp_student_g2h, c.temp_teacher_h2g, c.temp_student_h2g) == (0.04, 0.08, 0.08, 0.1)
    assert c.temp_infonce == 0.2 and c.warmup_loss_epochs == 5.0 and c.queue_size == 131072 and c.proj_dim == 512
    assert c.hyper_stages == ("c4", "c5") and c.momentum == 0.999


def test_hypercolumn_shapes_resnet18_at_64_px():
    torch.manual_seed(0)
    m = tiny_cgh("resnet18", None, distill_dim=64)
    x = torch.randn(4, 3, 64, 64)
    feats = m.backbone(x, stages=("c4", "c5"))
    assert feats["c4"].shape == (4, 256, 4, 4) and feats["c5"].shape == (4, 512, 2, 2)
    hyper = hypercolumn([feats["c4"], feats["c5"]], (2, 2))
    assert hyper.shape == (4, 768, 2, 2)
    assert torch.equal(hyper[:, 256:], feats["c5"])  # c5 is already at the target size
    assert torch.allclose(hyper[:, :256], F.interpolate(feats["c4"], size=(2, 2), mode="bilinear",
                                                        align_corners=False))
    h, q, q_h = m.embed(m.backbone, m.head, m.distiller, x)
    assert h.shape == (4, 512) and q.shape == q_h.shape == (4, 16)
    assert torch.allclose(q_h.norm(dim=1), torch.ones(4)) and torch.allclose(q.norm(dim=1), torch.ones(4))
    with torch.no_grad():  # at 224 px, the hypercolumn is built on c5's 7x7 grid (c4 is downsampled from 14x14)
        feats = m.backbone.eval()(torch.randn(1, 3, 224, 224), stages=("c4", "c5"))
    assert feats["c4"].shape[-2:] == (14, 14)
    assert hypercolumn([feats["c4"], feats["c5"]], m._hyper_size(feats)).shape == (1, 768, 7, 7)


def test_hypercolumn_at_a_configured_size_and_stage_list():
    m = tiny_cgh(hyper_stages=("c3", "c4", "c5"), hyper_size=4)
    x = torch.randn(4, 3, 32, 32)  # c3 8x8, c4 4x4, c5 2x2 with resnet18_small
    feats = m.backbone(x, stages=m.stages)
    assert m._hyper_size(feats) == (4, 4)
    assert m.distiller.reduce[0].in_channels == 16 + 32 + 64
    with pytest.raises(ValueError, match="hyper_stages"):
        tiny_cgh(hyper_stages=("c6",))


def test_relations_sum_to_one():
    logits = torch.randn(5, 12) * 3
    for t in (0.04, 0.08, 0.1):
        assert torch.allclose(relation(logits, t).sum(dim=1), torch.ones(5))


def test_loss_equals_teacher_entropy_when_student_equals_teacher_and_is_its_minimum():
    torch.manual_seed(0)
    t = torch.randn(4, 10)
    p = relation(t, 0.1)
    entropy = -(p * p.log()).sum(dim=1).mean()
    s = t.clone().requires_grad_(True)
    loss = relation_ce(t.requires_grad_(True), s, 0.1, 0.1)
    assert torch.allclose(loss, entropy, atol=1e-5)
    for _ in range(5):  # any other student distribution costs more (Gibbs' inequality)
        assert relation_ce(t, t + 0.5 * torch.randn(4, 10), 0.1, 0.1) > entropy
    loss.backward()
    assert s.grad is not None and t.grad is None  # gradients reach only the student
    assert torch.allclose(s.grad, torch.zeros_like(s.grad), atol=1e-6)  # a stationary point


def test_cross_context_terms_pair_the_right_relations():
    torch.manual_seed(0)
    q, q_h, k, k_h = (F.normalize(torch.randn(3, 8), dim=1) for _ in range(4))
    qg, qh = F.normalize(torch.randn(8, 16), dim=0), F.normalize(torch.randn(8, 16), dim=0)
    cfg = CGHConfig()
    out = cgh_losses(q, q_h, k, k_h, qg, qh, cfg, w_cl=0.0)
    assert set(out) == {"cl_hyper", "csist", "teacher_entropy"}  # no InfoNCE logits once its weight is 0
    assert torch.allclose(out["cl_hyper"], relation_ce(k @ qg, q_h @ qh, 0.04, 0.08))
    assert torch.allclose(out["csist"], relation_ce(k_h @ qh, q @ qg, 0.08, 0.1))
    # the ablation: each student learns its own context's teacher relation, temperatures unchanged
    within = dataclasses.replace(cfg, relation_targets="within")
    out_w = cgh_losses(q, q_h, k, k_h, qg, qh, within, w_cl=0.0)
    assert torch.allclose(out_w["cl_hyper"], relation_ce(k_h @ qh, q_h @ qh, 0.04, 0.08))
    assert torch.allclose(out_w["csist"], relation_ce(k @ qg, q @ qg, 0.08, 0.1))
    assert not torch.allclose(out_w["csist"], out["csist"])
    out = cgh_losses(q, q_h, k, k_h, qg, qh, cfg, w_cl=0.5)
    from densessl.methods.losses import info_nce_loss

    assert torch.allclose(out["cl"], info_nce_loss(q, k, qg, 0.2) + info_nce_loss(q_h, k_h, qh, 0.2))


def test_weight_schedule():
    spe = 100
    assert cgh_weights(0, spe, 5.0) == (1.0, 0.0, 0.0)
    assert cgh_weights(250, spe, 5.0) == (0.5, 0.25, 0.25)
    assert cgh_weights(500, spe, 5.0) == (0.0, 0.5, 0.5)
    assert cgh_weights(10_000, spe, 5.0) == (0.0, 0.5, 0.5)
    assert cgh_weights(0, spe, 0.0) == (0.0, 0.5, 0.5)


def test_queues_stay_aligned_and_only_the_student_learns():
    torch.manual_seed(0)
    m = tiny_cgh()
    m.steps_per_epoch = 10
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    for step in (0, 1):
        m.current_step = step
        out = m(views, {})
        out["loss"].backward()
    with torch.no_grad():
        k, k_h = m.key_forward(m._teacher, views[0])  # the weak view (view 0) goes to the teacher
    p = 8  # the second batch went to columns 8..15 of both queues
    assert int(m.queue.ptr) == 16
    assert torch.allclose(m.queue["global"][:, p:p + 8], k.t(), atol=1e-6)
    assert torch.allclose(m.queue["hyper"][:, p:p + 8], k_h.t(), atol=1e-6)
    teacher = [m.key_backbone, m.key_head, m.key_distiller]
    assert all(q.grad is None and not q.requires_grad for mod in teacher for q in mod.parameters())
    assert m.distiller.reduce[0].weight.grad is not None and m.head[0].weight.grad is not None
    assert out["w_cl"].item() == pytest.approx(1 - 1 / 50) and "cl" in out


def test_student_sees_the_strong_view():
    torch.manual_seed(0)
    m = tiny_cgh(shuffle_bn=False)
    weak, strong = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    out = m([weak, strong], {})
    h, _, _ = m.embed(m.backbone, m.head, m.distiller, strong)
    assert torch.allclose(out["features"], h.detach(), atol=1e-6)


def cgh_in_phase(phase: str):
    """A tiny_cgh builder in one phase of the loss schedule: "warmup", the start of the InfoNCE
    warm-up (weights 1, 0, 0 to within 1e-5 over the run), or "relations", past it (0, 0.5, 0.5)."""
    def make(**kw):
        m = tiny_cgh(warmup_loss_epochs=5.0 if phase == "warmup" else 0.0, **kw)
        m.steps_per_epoch = 10**6
        return m
    return make


# One cycle's mean, the first full-queue one against the last, seeds 0-7: the warm-up (InfoNCE on
# both contexts) falls by 1.06-3.19 (about 2 ln 25 = 6.4 -> 2.8-5.0); the relation terms alone by
# 0.16-0.45 (3.3-3.6 -> 3.18). At this size the latter fall comes with the student's embeddings
# collapsing (z_std 0.06 -> 0.01): the loss settles at ln 24 = 3.18, the cross-entropy of a uniform
# relation over the 24-key queue, and gets there with the gradient reversed too; only the
# warm-up's fall shows that the gradient has the right sign.
@pytest.mark.parametrize("phase,drop", [("warmup", 0.5), ("relations", 0.08)])
def test_cgh_loss_falls_on_a_fixed_cycle_of_batches(phase, drop):
    assert_loss_falls(queue_method_losses(cgh_in_phase(phase)), drop=drop, k=4)


def test_cgh_trains_four_steps_through_the_trainer(tmp_path):
    cfg = build_config("cgh-scenes", smoke_overrides(tmp_path, "method.warmup_loss_epochs=0.5"))
    result = Trainer(cfg).fit()
    assert result["step"] == 4
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    assert len(recs) == 4 and all(math.isfinite(r["loss"]) for r in recs)
    assert [r["w_cl"] for r in recs] == [1.0, 0.5, 0.0, 0.0]  # 2-step warm-up


def test_collapse_statistics():
    """teacher_entropy is ln K for a queue whose columns are all the same vector (the relation
    carries nothing) and far below it for a spread queue; z_std is the embedding std."""
    torch.manual_seed(0)
    m = tiny_cgh(shuffle_bn=False)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    K = m.queue["global"].shape[1]
    out = m(views, {})
    assert 0 < float(out["teacher_entropy"]) < math.log(K) - 0.5  # random unit queue, T = 0.04: peaked
    m.queue["global"].copy_(F.normalize(torch.ones_like(m.queue["global"]), dim=0))
    out = m(views, {})
    assert float(out["teacher_entropy"]) == pytest.approx(math.log(K), abs=1e-4)
    _, q, _ = m.embed(m.backbone, m.head, m.distiller, views[1])
    assert float(out["z_std"]) == pytest.approx(float(q.std(dim=0).mean()), abs=1e-5)


def test_unknown_relation_targets_is_rejected_by_name():
    with pytest.raises(ValueError, match="relation_targets='both'"):
        tiny_cgh(relation_targets="both")
