import math

import torch

from densessl.eval.dense.features import DenseSplit, seg_scores
from densessl.eval.dense.retrieval import (_fraction_name, build_memory, knn_label_transfer, patch_histograms,
                                           retrieval_miou, sample_cells)

NAMES = ("background", "a", "b")


def test_patch_histograms_are_class_fractions_without_the_ignored_pixels():
    labels = torch.tensor([[[0, 0, 1, 1],
                            [0, 1, 1, 255],
                            [2, 2, 255, 255],
                            [2, 0, 255, 255]]])
    hist, valid = patch_histograms(labels, 3, (2, 2))
    assert hist.shape == (1, 4, 3)
    torch.testing.assert_close(hist[0, 0], torch.tensor([0.75, 0.25, 0.0]))  # top-left: 3 bg, 1 a
    torch.testing.assert_close(hist[0, 1], torch.tensor([0.0, 1.0, 0.0]))  # top-right: 3 a, 1 ignored
    torch.testing.assert_close(hist[0, 2], torch.tensor([0.25, 0.0, 0.75]))
    assert valid.tolist() == [[True, True, True, False]]  # bottom-right: only ignored pixels


def test_softmax_weighted_neighbours_give_the_hand_computed_labels():
    # query (1, 0); keys at cosine 1 (class a), 0.8 and 0.6 (class b); k = 3, temperature 0.1:
    # weights exp(10), exp(8), exp(6) -> a = 1 / (1 + e^-2 + e^-4) = 0.8668. Plain similarity
    # weights would give a = 1 / 2.4 and let b win.
    keys = torch.tensor([[2.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-1.0, 0.0]])  # the first one not unit length
    values = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    out = knn_label_transfer(torch.tensor([[3.0, 0.0]]), keys, values, k=3, temperature=0.1)
    a = 1 / (1 + math.exp(-2) + math.exp(-4))
    torch.testing.assert_close(out, torch.tensor([[0.0, a, 1 - a]]))
    assert out.argmax(1).tolist() == [1]
    # k = 1: the single nearest key's histogram, whatever the temperature
    torch.testing.assert_close(knn_label_transfer(torch.tensor([[-1.0, -0.1], [0.5, 0.7]]), keys, values, k=1,
                                                  temperature=5.0, chunk_size=1), values[[3, 2]])


def _toy_split(n=6, seed=0, noise=0.0):
    """Features = one-hot of each cell's class (8 channels: classes in 0..2, rest 0), labels the
    cells' classes upsampled 2x: a perfect feature for every probe."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, 3, (n, 4, 4), generator=g)
    feats = torch.nn.functional.one_hot(cells, 8).permute(0, 3, 1, 2).float()
    feats = feats + noise * torch.randn(feats.shape, generator=g)
    labels = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).to(torch.uint8)
    return DenseSplit({"c4": feats}, labels, [torch.zeros(0, 4)] * n, [torch.zeros(0, dtype=torch.long)] * n, NAMES)


class _R:
    k, temperature, memory_size, sampling, chunk_size = 5, 0.02, 10_000, "rare", 7


def test_retrieval_on_perfect_features_scores_one_and_counts_the_memory():
    train, val = _toy_split(8, 0), _toy_split(4, 1)
    res = retrieval_miou(train, val, ("c4",), 1.0, _R())
    assert res["mIoU"] == 1.0 and res["fg_mIoU"] == 1.0 and res["pixel_acc"] == 1.0
    assert res["memory_images"] == 8 and res["memory_patches"] == 8 * 16
    r = _R()
    r.memory_size = 8  # a quarter of the images (2), 8 // 2 = 4 cells each
    small = retrieval_miou(train, val, ("c4",), 0.25, r)
    assert small["memory_images"] == 2 and small["memory_patches"] == 8 and 0 < small["mIoU"] <= 1


def test_memory_keeps_rare_class_cells_first():
    # 3 cells of background only and 1 cell holding the rare class 2, in 4000 images; one cell kept
    # per image. Rare-first scores the rare cell 1 * u3 and the others 3 * u (u uniform): it is kept
    # when u3 < 3 min(u0, u1, u2), with probability int_0^1 (1 - u/3)^3 du = 3/4 (1 - (2/3)^4) = 0.602;
    # uniform sampling keeps it 1 time in 4.
    n = 4000
    hist = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]]).expand(n, 4, 3)
    valid = torch.ones(n, 4, dtype=torch.bool)
    rare = sample_cells(hist, valid, 1, "rare", torch.Generator().manual_seed(0))
    uniform = sample_cells(hist, valid, 1, "uniform", torch.Generator().manual_seed(0))
    assert abs(float((rare == 3).float().mean()) - 0.75 * (1 - (2 / 3) ** 4)) < 0.03
    assert abs(float((uniform == 3).float().mean()) - 0.25) < 0.03
    # invalid (all-ignored) cells are never kept while valid ones remain
    valid = valid.clone()
    valid[:, 3] = False
    assert not (sample_cells(hist, valid, 3, "rare", torch.Generator().manual_seed(0)) == 3).any()


def test_build_memory_drops_ignored_cells_and_keeps_histograms_with_their_features():
    split = _toy_split(2, 0)
    split.labels[0, :2, :2] = 255  # cell (0, 0) of image 0: only ignored pixels
    keys, values = build_memory(split, ("c4",), torch.arange(2), 10_000, "rare", torch.Generator().manual_seed(0))
    assert keys.shape == (31, 8) and values.shape == (31, 3)
    torch.testing.assert_close(keys[:, :3], values)  # one-hot features: feature == its cell's histogram


def test_fg_miou_exposes_a_background_only_prediction():
    cm = torch.tensor([[90, 0, 0], [6, 0, 0], [4, 0, 0]])  # everything predicted background
    s = seg_scores(cm, NAMES)
    assert s["fg_mIoU"] == 0.0 and math.isclose(s["mIoU"], 0.9 / 3) and s["pixel_acc"] == 0.9
    assert s["iou_per_class"]["background"] == 0.9


def test_fraction_names():
    assert [_fraction_name(f) for f in (1 / 16, 0.25, 1.0, 0.3)] == ["1/16", "1/4", "1", "0.3"]


def test_a_stage_set_cosine_is_the_mean_of_the_stages_cosines_whatever_their_scales():
    g = torch.Generator().manual_seed(0)
    c4, c5 = torch.randn(2, 6, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g)
    split = DenseSplit({"c4": c4, "c5": c5}, torch.zeros(2, 8, 8, dtype=torch.uint8), [], [], NAMES)
    big = DenseSplit({"c4": 1000 * c4, "c5": c5}, split.labels, [], [], NAMES)
    m = split.maps(("c4", "c5"), unit=True)
    torch.testing.assert_close(m, big.maps(("c4", "c5"), unit=True))
    assert m.shape == (2, 11, 4, 4)
    a, b = m[0, :, 1, 2], m[1, :, 3, 0]  # two cells; C5 upsampled bilinearly to C4's 4x4 grid
    up5 = torch.nn.functional.interpolate(c5, size=(4, 4), mode="bilinear", align_corners=False)
    cos4 = torch.cosine_similarity(c4[0, :, 1, 2], c4[1, :, 3, 0], dim=0)
    cos5 = torch.cosine_similarity(up5[0, :, 1, 2], up5[1, :, 3, 0], dim=0)
    torch.testing.assert_close(torch.cosine_similarity(a, b, dim=0), (cos4 + cos5) / 2)
