import math

import pytest
import torch

from densessl.eval.knn import knn_accuracy, knn_predict


def test_hand_computed_vote():
    # Train points at angles 0, 60 and 90 degrees with labels 0, 1, 1; query at 40 degrees, k=2.
    # Neighbours: 60 deg (cos 20 = 0.9397, label 1) and 0 deg (cos 40 = 0.7660, label 0).
    # Votes with T=0.5: class 1 gets exp(0.9397/0.5), class 0 exp(0.7660/0.5) -> class 1.
    # With k=3 the 90-deg point (cos 50 = 0.6428) adds to class 1 as well: still 1. The query at
    # 25 deg is closer to 0 deg (cos 25 = 0.906) than to 60 deg (cos 35 = 0.819): class 0 for k=2,
    # but for k=3 class 1 gets exp(0.819/T) + exp(cos 65/T); with T=1:
    # 2.269 + 1.526 = 3.795 > exp(0.906) = 2.475 -> class 1; with T=0.05 class 0 wins.
    ang = torch.deg2rad(torch.tensor([0.0, 60.0, 90.0]))
    train = torch.stack([ang.cos(), ang.sin()], 1) * torch.tensor([[1.0], [3.0], [0.5]])  # norms don't matter
    labels = torch.tensor([0, 1, 1])
    q = torch.deg2rad(torch.tensor([40.0, 25.0]))
    query = torch.stack([q.cos(), q.sin()], 1)
    assert knn_predict(train, labels, query[:1], 2, k=2, temperature=0.5).tolist() == [1]
    assert knn_predict(train, labels, query[1:], 2, k=2, temperature=0.5).tolist() == [0]
    assert knn_predict(train, labels, query[1:], 2, k=3, temperature=1.0).tolist() == [1]
    assert knn_predict(train, labels, query[1:], 2, k=3, temperature=0.05).tolist() == [0]
    c = lambda d: math.cos(math.radians(d))
    assert math.exp(c(35)) + math.exp(c(65)) > math.exp(c(25))  # the hand computation above
    assert math.exp(c(35) / 0.05) + math.exp(c(65) / 0.05) < math.exp(c(25) / 0.05)


def _clusters(n, d=16, num_classes=3, seed=0, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, d, generator=g) * 3
    labels = torch.arange(n) % num_classes
    return centres[labels] + spread * torch.randn(n, d, generator=g), labels


def test_separated_clusters_give_full_accuracy():
    x, y = _clusters(150, seed=0)
    assert knn_accuracy(x[:90], y[:90], x[90:], y[90:], num_classes=3, k=20) == 1.0


def test_k1_is_nearest_neighbour_and_small_t_equals_k1():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(200, 8, generator=g), torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 5, (200,), generator=g)
    sim = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    nearest = labels[sim.argmax(1)]
    assert torch.equal(knn_predict(train, labels, test, 5, k=1), nearest)
    # As T -> 0 the closest neighbour's weight dominates all others (and nothing overflows).
    assert torch.equal(knn_predict(train, labels, test, 5, k=20, temperature=1e-4), nearest)


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(2)
    train, test = torch.randn(300, 32, generator=g), torch.randn(77, 32, generator=g)
    labels = torch.randint(0, 10, (300,), generator=g)
    full = knn_predict(train, labels, test, 10, k=15, chunk_size=1000)
    for chunk in (1, 7, 32):
        assert torch.equal(knn_predict(train, labels, test, 10, k=15, chunk_size=chunk), full)
    assert full.dtype == torch.int64 and full.shape == (77,)


def test_validation():
    train, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    with pytest.warns(UserWarning, match="k=20 is larger than the 5"):
        assert knn_predict(train, labels, torch.randn(3, 4), 3, k=20).shape == (3,)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        knn_predict(train, labels, torch.randn(3, 4), 2)
    with pytest.raises(ValueError, match="dimension"):
        knn_predict(train, labels, torch.randn(3, 5), 3)
    with pytest.raises(ValueError, match="train_labels must be"):
        knn_predict(train, labels[:4], torch.randn(3, 4), 3)
    with pytest.raises(ValueError, match="integer"):
        knn_predict(train, labels.float(), torch.randn(3, 4), 3)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(train, labels, torch.randn(3, 4), 3, temperature=0)
