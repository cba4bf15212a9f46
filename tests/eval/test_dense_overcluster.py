import torch

from densessl.eval.dense.config import OverclusterConfig
from densessl.eval.dense.features import DenseSplit, seg_scores
from densessl.eval.dense.overcluster import (cluster_counts, hungarian_mapping, kmeans, many_to_one_mapping,
                                            matched_confusion, overcluster_stage, standardize_pca)

NAMES = ("background", "a", "b")


def test_hungarian_matching_on_a_toy_confusion_matrix():
    # rows classes, columns clusters. Best one-to-one: cluster 0 -> a, 1 -> background, 2 -> b:
    # 8 + 10 + 9 = 27 of 32 pixels.
    counts = torch.tensor([[0, 10, 1],
                           [8, 0, 2],
                           [1, 1, 9]])
    mapping = hungarian_mapping(counts)
    assert mapping.tolist() == [1, 0, 2]
    s = seg_scores(matched_confusion(counts, mapping), NAMES)
    assert s["pixel_acc"] == 27 / 32
    # IoU of background: 10 / (11 + 11 - 10), a: 8 / (10 + 9 - 8), b: 9 / (11 + 12 - 9)
    torch.testing.assert_close(torch.tensor(s["mIoU"]), torch.tensor((10 / 12 + 8 / 11 + 9 / 14) / 3))


def test_hungarian_differs_from_greedy_where_one_to_one_matters():
    counts = torch.tensor([[5, 4],
                           [4, 0]])
    assert hungarian_mapping(counts).tolist() == [1, 0]  # 4 + 4 = 8 > 5 + 0
    assert many_to_one_mapping(counts).tolist() == [0, 0]  # each cluster to its majority class


def test_many_to_one_matching_on_a_toy_overclustering():
    # 5 clusters over 3 classes: clusters 0, 3 -> background, 1 -> b, 2, 4 -> a
    counts = torch.tensor([[7, 1, 0, 5, 1],
                           [1, 0, 6, 1, 4],
                           [0, 9, 2, 0, 0]])
    mapping = many_to_one_mapping(counts)
    assert mapping.tolist() == [0, 2, 1, 0, 1]
    s = seg_scores(matched_confusion(counts, mapping), NAMES)
    assert s["pixel_acc"] == (7 + 9 + 6 + 5 + 4) / 37


def test_cluster_counts_upsample_the_cluster_map_and_skip_ignored_pixels():
    assign = torch.tensor([[[0, 1], [0, 1]]])  # 2x2 cells -> 4x4 pixels
    labels = torch.tensor([[[0, 0, 1, 1], [0, 255, 1, 1], [2, 2, 2, 2], [2, 2, 2, 255]]], dtype=torch.uint8)
    counts = cluster_counts(assign, labels, 2, 3)
    assert counts.tolist() == [[3, 0], [0, 4], [4, 3]]


def test_kmeans_separates_well_separated_blobs_whatever_the_seed():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(50)
    x = centres[truth] + 0.3 * torch.randn(150, 2, generator=g)
    for seed in range(3):
        assign = kmeans(x, 3, seed)
        # a partition equal to the truth up to renaming: each true blob in one cluster, all distinct
        assert all(len(set(assign[truth == c].tolist())) == 1 for c in range(3))
        assert len(set(assign.tolist())) == 3


def test_standardize_pca_keeps_the_largest_variance_directions_first():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 3, generator=g) * torch.tensor([5.0, 1.0, 0.1])
    rot = torch.linalg.qr(torch.randn(3, 3, generator=g))[0]
    x = torch.cat([z @ rot.T, torch.ones(500, 1)], 1)  # a constant dimension too
    y = standardize_pca(x, 2)
    assert y.shape == (500, 2)
    var = y.var(0)
    assert var[0] >= var[1] and torch.allclose(y.mean(0), torch.zeros(2), atol=1e-4)


def test_overclustering_perfect_features_match_the_labels():
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(0, 3, (10, 4, 4), generator=g)
    feats = 5 * torch.nn.functional.one_hot(cells, 3).permute(0, 3, 1, 2).float() + 0.01 * torch.randn(10, 3, 4, 4,
                                                                                                          generator=g)
    labels = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).to(torch.uint8)
    val = DenseSplit({"c4": feats}, labels, [], [], NAMES)
    out = overcluster_stage(val, ("c4",), OverclusterConfig(pca_dim=3, seeds=2, overcluster_k=6))
    assert out["hungarian"]["K"] == 3 and out["many_to_one"]["K"] == 6
    assert out["hungarian"]["mIoU"]["mean"] == 1.0 and out["hungarian"]["mIoU"]["std"] == 0.0
    assert out["many_to_one"]["pixel_acc"]["min"] == 1.0 and len(out["many_to_one"]["mIoU"]["per_seed"]) == 2
