import math

import pytest
import torch
from sklearn.metrics import average_precision_score

from densessl.eval.metrics import average_precision, count_skipped, mean_average_precision


def test_hand_computed():
    # Ranking by score: 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg).
    # Thresholds: P=1 R=1/2; P=1/2 R=1/2; P=2/3 R=1; P=1/2 R=1.
    # AP = 1/2 * 1 + 0 * 1/2 + 1/2 * 2/3 + 0 = 5/6.
    scores = torch.tensor([0.1, 0.9, 0.7, 0.8])
    targets = torch.tensor([0, 1, 1, 0])
    assert average_precision(scores, targets) == pytest.approx(5 / 6)


def test_hand_computed_with_tie():
    # Scores 0.8 (pos) and 0.8 (neg) tie: one threshold with P=1/2 R=1/2; then 0.5 (pos): P=2/3 R=1.
    # AP = 1/2 * 1/2 + 1/2 * 2/3 = 7/12, whatever order the tied pair is in.
    assert average_precision(torch.tensor([0.8, 0.8, 0.5]), torch.tensor([1, 0, 1])) == pytest.approx(7 / 12)
    assert average_precision(torch.tensor([0.8, 0.8, 0.5]), torch.tensor([0, 1, 1])) == pytest.approx(7 / 12)


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    n, c = 200, 6
    scores = torch.rand(n, c, generator=g, dtype=torch.float64)
    scores = torch.round(scores * 10) / 10  # one decimal: many ties
    targets = (torch.rand(n, c, generator=g) < 0.3).long()
    per_sklearn = [average_precision_score(targets[:, j].numpy(), scores[:, j].numpy()) for j in range(c)]
    for j in range(c):
        assert average_precision(scores[:, j], targets[:, j]) == pytest.approx(per_sklearn[j], abs=1e-12)
    mAP, per_class = mean_average_precision(scores, targets)
    assert per_class == pytest.approx(per_sklearn, abs=1e-12)
    assert mAP == pytest.approx(average_precision_score(targets.numpy(), scores.numpy(), average="macro"),
                                abs=1e-12)


def test_matches_sklearn_continuous_float32():
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(500, generator=g)
    targets = (torch.rand(500, generator=g) < 0.1).long()
    assert average_precision(scores, targets) == pytest.approx(
        average_precision_score(targets.numpy(), scores.numpy()), abs=1e-9)


def test_skips_classes_without_positives_and_ignore_mask():
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.4], [0.5, 0.3, 0.3]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    mAP, per_class = mean_average_precision(scores, targets)
    assert math.isnan(per_class[2]) and count_skipped(per_class) == 1
    assert per_class[:2] == [1.0, 1.0] and mAP == 1.0
    # Ignoring the top-scored sample of class 0 leaves (0.1 neg, 0.5 pos): AP still 1;
    # ignoring the positive of class 1 leaves it with no positive -> skipped.
    ignore = torch.zeros(3, 3, dtype=torch.bool)
    ignore[0, 0] = True
    ignore[1, 1] = True
    mAP, per_class = mean_average_precision(scores, targets, ignore=ignore)
    assert per_class[0] == 1.0 and math.isnan(per_class[1]) and count_skipped(per_class) == 2
    # Ignoring a high-scored negative raises AP: class 0 with sample 2 as a negative.
    targets2 = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 1]])
    full = mean_average_precision(scores, targets2)[1][0]
    ign = torch.zeros(3, 3, dtype=torch.bool)
    ign[0, 0] = ign[2, 0] = True
    assert full == pytest.approx(1 / 3) and mean_average_precision(scores, targets2, ignore=ign)[1][0] == 1.0


def test_errors():
    with pytest.raises(ValueError, match="same shape"):
        average_precision(torch.rand(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="binary"):
        average_precision(torch.rand(3), torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(torch.rand(4, 2), torch.zeros(4, 2))
    assert math.isnan(average_precision(torch.rand(3), torch.zeros(3)))
