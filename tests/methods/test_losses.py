"""densessl.methods.losses on tiny tensors, against values computed by hand (in the comments)
or by a naive loop written out here."""
import math

import pytest
import torch

from densessl.methods.losses import (byol_loss, cross_entropy_to_codes, dense_info_nce, embedding_std,
                                    info_nce_logits, info_nce_loss, instance_regression, pixcontrast_loss,
                                    pixel_consistency, pixpro_loss, regression_loss, relation, relation_ce, sinkhorn,
                                    sinkhorn_codes, swapped_prediction_loss, usage_entropy)

LN2, LN3 = math.log(2), math.log(3)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# ---------------------------------------------------------------- regression


def test_regression_loss_is_2_minus_2_cos():
    p = t([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    z = t([[0.0, 2.0], [2.0, 2.0], [-3.0, 0.0]])  # cos 0, 1, -1
    assert torch.allclose(regression_loss(p, z), t([2.0, 0.0, 4.0]), atol=1e-6)


def test_byol_loss_is_symmetric_mean_and_stops_the_target_gradient():
    p1, p2 = t([[1.0, 0.0]]).requires_grad_(), t([[0.0, 1.0]]).requires_grad_()
    z1, z2 = t([[0.0, 3.0]]).requires_grad_(), t([[1.0, 1.0]]).requires_grad_()
    loss = byol_loss(p1, p2, z1, z2)
    # l(p1, z2) = 2 - 2 / sqrt 2, l(p2, z1) = 2 - 2 = 0
    assert math.isclose(loss.item(), 2 - math.sqrt(2), rel_tol=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None and p1.grad is not None


# ---------------------------------------------------------------- InfoNCE


def test_info_nce_logits_and_loss_by_hand():
    q, k = t([[1.0, 0.0]]), t([[0.6, 0.8]])
    queue = t([[1.0, 0.0], [0.0, 1.0]])  # (d=2, K=2): columns e1, e2
    logits = info_nce_logits(q, k, queue, 0.5)
    assert torch.allclose(logits, t([[1.2, 2.0, 0.0]]))  # [q.k, q.e1, q.e2] / 0.5
    expected = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(2.0) + 1.0))
    assert math.isclose(info_nce_loss(q, k, queue, 0.5).item(), expected, rel_tol=1e-6)


def test_dense_info_nce_averages_over_positions():
    q_grid = t([[[1.0, 0.0], [0.0, 1.0]]])  # (N=1, D=2, S=2): position 0 = e1, position 1 = e2
    k_matched = t([[[0.0, 1.0], [1.0, 0.0]]])  # position 0 = e2, position 1 = e1
    queue = t([[1.0], [0.0]])  # one negative, e1
    # position 0: logits [e1.e2, e1.e1] = [0, 1] -> log(1 + e); position 1: [e2.e1, e2.e1] = [0, 0] -> log 2
    expected = (math.log(1 + math.e) + LN2) / 2
    assert math.isclose(dense_info_nce(q_grid, k_matched, queue, 1.0).item(), expected, rel_tol=1e-6)


# ---------------------------------------------------------------- relations


def test_relation_ce_by_hand():
    teacher = t([[0.0, LN3]])  # softmax at T = 1: [1/4, 3/4]
    assert torch.allclose(relation(teacher, 1.0), t([[0.25, 0.75]]))
    assert math.isclose(relation_ce(teacher, t([[0.0, 0.0]]), 1.0, 1.0).item(), LN2, rel_tol=1e-6)
    # student [0, ln3 / 2] at T = 0.5 -> log r = [-ln 4, ln 3 - ln 4]
    expected = 2 * LN2 - 0.75 * LN3
    assert math.isclose(relation_ce(teacher, t([[0.0, LN3 / 2]]), 1.0, 0.5).item(), expected, rel_tol=1e-6)


# ---------------------------------------------------------------- Sinkhorn and swapped prediction


def naive_sinkhorn(scores: list[list[float]], epsilon: float, iters: int) -> list[list[float]]:
    B, K = len(scores), len(scores[0])
    Q = [[math.exp(scores[b][k] / epsilon) for b in range(B)] for k in range(K)]  # K x B
    total = sum(map(sum, Q))
    Q = [[x / total for x in row] for row in Q]
    for _ in range(iters):
        Q = [[x / sum(row) / K for x in row] for row in Q]  # each prototype gets mass 1/K
        col = [sum(Q[k][b] for k in range(K)) for b in range(B)]
        Q = [[Q[k][b] / col[b] / B for b in range(B)] for k in range(K)]  # each sample gets mass 1/B
    return [[Q[k][b] * B for k in range(K)] for b in range(B)]


def test_sinkhorn_by_hand():
    eps = 0.05
    # a symmetric problem is balanced already: codes are the row softmax of scores / eps
    codes = sinkhorn(t([[eps * LN3, 0.0], [0.0, eps * LN3]]), eps, 3)
    assert torch.allclose(codes, t([[0.75, 0.25], [0.25, 0.75]]), atol=1e-6)
    # one sample and two prototypes: equipartition forces [1/2, 1/2] whatever the scores
    assert torch.allclose(sinkhorn(t([[eps * LN3, 0.0]]), eps, 3), t([[0.5, 0.5]]), atol=1e-6)


def test_sinkhorn_matches_a_naive_loop():
    torch.manual_seed(0)
    scores = torch.rand(4, 3)
    for iters in (1, 3):
        expected = t(naive_sinkhorn(scores.tolist(), 0.5, iters))
        assert torch.allclose(sinkhorn(scores, 0.5, iters), expected, atol=1e-5)
    assert torch.allclose(sinkhorn(scores, 0.5, 3).sum(1), torch.ones(4), atol=1e-6)


def test_sinkhorn_codes_with_queue_rows_keep_only_the_batch_rows():
    torch.manual_seed(0)
    scores, queued = torch.rand(2, 3), torch.rand(4, 3)
    expected = t(naive_sinkhorn(torch.cat([queued, scores]).tolist(), 0.5, 3)[4:])
    assert torch.allclose(sinkhorn_codes(scores, queued, 0.5, 3), expected, atol=1e-5)


def test_cross_entropy_to_codes_by_hand():
    assert math.isclose(cross_entropy_to_codes(t([[1.0, 0.0]]), t([[0.0, 0.0]]), 0.1).item(), LN2, rel_tol=1e-6)
    # logits [0, 0.1 ln 3] / 0.1 = [0, ln 3] -> log softmax [-ln 4, ln 3 - ln 4]
    got = cross_entropy_to_codes(t([[0.25, 0.75]]), t([[0.0, 0.1 * LN3]]), 0.1).item()
    assert math.isclose(got, 2 * LN2 - 0.75 * LN3, rel_tol=1e-6)


def test_swapped_prediction_loss_averages_over_predicting_crops_then_codes():
    # code [1, 0] against scores [0, c] at T = 1: CE = log(1 + e^c) = ln 2, ln 4, ln 8 for c = 0, ln 3, ln 7
    scores = [t([[0.0, c]]) for c in (0.0, LN3, math.log(7))]
    code = t([[1.0, 0.0]])
    # crop 0's code is predicted by crops 1, 2: (2 + 3) / 2 ln 2; crop 1's by crops 0, 2: (1 + 3) / 2 ln 2
    loss = swapped_prediction_loss([code, code], scores, (0, 1), 1.0)
    assert math.isclose(loss.item(), (2.5 + 2.0) / 2 * LN2, rel_tol=1e-6)


# ---------------------------------------------------------------- pixel consistency


def test_pixel_consistency_by_hand():
    q = t([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])  # (B=2, C=2, N1=2): pixels e1, e2
    k = t([[[1.0], [0.0]], [[1.0], [0.0]]])  # (B=2, C=2, N2=1): pixel e1
    mask = t([[[1.0], [1.0]], [[0.0], [0.0]]])  # image 0: both pixels positive; image 1: none
    # image 0: mean cos over its positive pairs = (1 + 0) / 2; image 1 counts 0 in the batch mean
    assert math.isclose(pixel_consistency(q, k, mask).item(), -2 * 0.25, rel_tol=1e-5)


def test_pixpro_loss_adds_both_directions():
    torch.manual_seed(0)
    q1, q2, k1, k2 = (torch.nn.functional.normalize(torch.randn(2, 4, 3), dim=1) for _ in range(4))
    mask = torch.rand(2, 3, 3) > 0.5
    expected = pixel_consistency(q1, k2, mask) + pixel_consistency(q2, k1, mask.transpose(1, 2))
    assert torch.equal(pixpro_loss(q1, q2, k1, k2, mask), expected)
    assert -4 <= expected.item() <= 4


def naive_pixcontrast(q, k, mask, tau, negatives):
    B, _, N1 = q.shape
    N2 = k.shape[2]
    per_image = []
    for b in range(B):
        terms = []
        for i in range(N1):
            pos = [j for j in range(N2) if mask[b, i, j]]
            if not pos:
                continue
            e = lambda c, j: math.exp(float(q[b, :, i] @ k[c, :, j]) / tau)  # noqa: E731
            num = sum(e(b, j) for j in pos)
            others = range(B) if negatives == "batch" else [b]
            den = sum(e(c, j) for c in others for j in range(N2))
            terms.append(-math.log(num / den))
        per_image.append(sum(terms) / len(terms) if terms else 0.0)
    return sum(per_image) / B


@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_pixcontrast_loss_matches_a_naive_loop(negatives):
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(2, 3, 2), dim=1)
    k = torch.nn.functional.normalize(torch.randn(2, 3, 3), dim=1)
    mask = torch.tensor([[[1, 0, 1], [0, 0, 0]], [[0, 1, 0], [1, 1, 0]]], dtype=torch.bool)  # a pixel without positives
    expected = naive_pixcontrast(q, k, mask, 0.3, negatives)
    assert math.isclose(pixcontrast_loss(q, k, mask, 0.3, negatives).item(), expected, rel_tol=1e-5)


def test_instance_regression_by_hand():
    p = t([[1.0, 0.0], [1.0, 1.0]])
    z = t([[0.0, 5.0], [3.0, 3.0]])  # cos 0 and 1
    assert math.isclose(instance_regression(p, z).item(), -2 * 0.5, rel_tol=1e-6)


# ---------------------------------------------------------------- collapse statistics


def test_embedding_std_is_zero_at_collapse():
    # unit rows e1, e2: per dimension values {1, 0}, unbiased std sqrt(1/2)
    assert math.isclose(embedding_std(t([[1.0, 0.0], [0.0, 1.0]])).item(), math.sqrt(0.5), rel_tol=1e-6)
    assert embedding_std(t([[2.0, 0.0], [3.0, 0.0]])).item() == 0.0  # both normalise to e1


def test_usage_entropy_by_hand():
    scores = t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 3.0, 1.0]])  # picks 0, 1, 1, 1
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert math.isclose(usage_entropy(scores).item(), expected, rel_tol=1e-6)
    assert usage_entropy(t([[1.0, 0.0]] * 3)).item() == 0.0
