import math

import numpy as np
import pytest
import torch

from densessl.config import ViewConfig
from densessl.data.geometry import (boxes_to_source, cell_centres, crop_intersection, pixpro_positive_mask,
                                    positives_from_centres, scrl_boxes)
from densessl.data.views import ViewSampler

FULL = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
NO, YES = torch.tensor([False]), torch.tensor([True])


# ----------------------------------------------------------------------------- cell centres


def test_cell_centres_row_major_and_flip_mirrors_columns():
    box = torch.tensor([[0.2, 0.4, 0.6, 0.8]])
    c = cell_centres(box, NO, (2, 4)).view(2, 4, 2)
    assert torch.allclose(c[0, :, 0], torch.tensor([0.25, 0.35, 0.45, 0.55]))  # x along a row
    assert torch.allclose(c[:, 0, 1], torch.tensor([0.5, 0.7]))  # y down a column
    f = cell_centres(box, YES, (2, 4)).view(2, 4, 2)
    assert torch.allclose(f[..., 0], c[..., 0].flip(-1)) and torch.equal(f[..., 1], c[..., 1])


def test_cell_centres_match_the_pixels_a_view_shows():
    """A cell centre is where the view's pixels in that cell come from (crop_view's convention)."""
    box = torch.tensor([[10 / 50, 5 / 40, 26 / 50, 21 / 40]])  # 16x16 source pixels, view of 16 px
    c = cell_centres(box, YES, (4, 4)).view(4, 4, 2)
    # flipped view: cell column 0 covers view columns 0-3 = source columns 25..22, centre x = 24/50
    assert math.isclose(float(c[0, 0, 0]), 24 / 50, rel_tol=1e-6)
    assert math.isclose(float(c[0, 0, 1]), 7 / 40, rel_tol=1e-6)


def test_flip_none_equals_no_flip():
    box = torch.rand(3, 2).sort(dim=1).values.repeat(1, 2)[:, [0, 0, 1, 1]]
    assert torch.equal(cell_centres(box, None, 3), cell_centres(box, torch.zeros(3, dtype=torch.bool), 3))


# ----------------------------------------------------------------------------- PixPro positives


def test_identical_crops_give_identity():
    m = pixpro_positive_mask(FULL, NO, FULL, NO, (7, 7), (7, 7))
    assert m.dtype == torch.bool and m.shape == (1, 49, 49)
    assert torch.equal(m[0], torch.eye(49, dtype=torch.bool))
    # identical non-square crops: cells 0.4/7 wide, 0.6/7 tall; horizontal neighbours are
    # 0.4 / sqrt(0.4^2 + 0.6^2) = 0.55 diagonals apart (positive), vertical ones 0.83 (not)
    box = torch.tensor([[0.1, 0.3, 0.5, 0.9]])
    m = pixpro_positive_mask(box, YES, box, YES, 7, 7)[0]
    assert int(m.sum()) == 49 + 2 * 7 * 6
    assert m[0, 1] and not m[0, 7] and m.diagonal().all()


def test_flipped_copy_gives_mirrored_mask():
    m = pixpro_positive_mask(FULL, NO, FULL, YES, (7, 7), (7, 7))[0]
    expected = torch.zeros(49, 49, dtype=torch.bool)
    for r in range(7):
        for c in range(7):
            expected[r * 7 + c, r * 7 + (6 - c)] = True
    assert torch.equal(m, expected)


def test_two_times_zoom_gives_133_positives():
    half = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    m = pixpro_positive_mask(FULL, NO, half, NO, (7, 7), (7, 7))[0]
    assert int(m.sum()) == 133
    rows_with = m.any(1).view(7, 7)
    assert rows_with[:4, :4].all() and int(rows_with.sum()) == 16  # only view-1 bins in the top-left 4x4
    per_v2 = m.sum(0)
    assert int(per_v2.min()) >= 1 and int(per_v2.max()) <= 3  # each view-2 bin has 1-3
    # symmetric: swapping the views transposes the mask
    assert torch.equal(pixpro_positive_mask(half, NO, FULL, NO, 7, 7)[0], m.T)


def test_disjoint_crops_have_no_positives_and_threshold_is_strict():
    left, right = torch.tensor([[0.0, 0.0, 0.4, 1.0]]), torch.tensor([[0.6, 0.0, 1.0, 1.0]])
    assert not pixpro_positive_mask(left, NO, right, NO, 7, 7).any()
    # two cells exactly at the threshold distance are not positive (strict <)
    c1, c2 = torch.zeros(1, 1, 2), torch.tensor([[[0.5, 0.0]]])
    d = torch.ones(1)
    assert not positives_from_centres(c1, c2, d, d, threshold=0.5).any()
    assert positives_from_centres(c1, c2, d, d, threshold=0.5001).all()


def test_positive_mask_is_batched_and_uses_max_diagonal():
    boxes1 = torch.cat([FULL, FULL, torch.tensor([[0.0, 0.0, 0.4, 1.0]])])
    boxes2 = torch.cat([FULL, torch.tensor([[0.0, 0.0, 0.5, 0.5]]), torch.tensor([[0.6, 0.0, 1.0, 1.0]])])
    m = pixpro_positive_mask(boxes1, torch.zeros(3, dtype=torch.bool), boxes2, torch.zeros(3, dtype=torch.bool), 7, 7)
    assert m.sum((1, 2)).tolist() == [49, 133, 0]
    # different grid sizes: the same crop on 7x7 and 14x14. Normalised by the larger (7x7) cell
    # diagonal, offsets are (a, b) / (2 sqrt 2) with a, b in {+-0.5, +-1.5}: positive unless both
    # are 1.5, so an interior cell has 12 positives, including the 4 finer cells it contains
    m2 = pixpro_positive_mask(FULL, NO, FULL, NO, (7, 7), (14, 14))[0].view(7, 7, 14, 14)
    assert int(m2[3, 3].sum()) == 12 and m2[3, 3, 6:8, 6:8].all() and not m2[3, 3, 5, 5]


def test_valid_mask_drops_view1_cells():
    c = cell_centres(FULL, NO, 2)
    d = torch.full((1,), math.sqrt(2) / 2)
    valid = torch.tensor([[True, False, True, True]])
    m = positives_from_centres(c, c, d, d, 0.7, valid1=valid)[0]
    assert m.diagonal().tolist() == [True, False, True, True]


# ----------------------------------------------------------------------------- intersection


def test_crop_intersection():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]])
    b = torch.tensor([[0.25, 0.1, 1.0, 1.0], [0.5, 0.0, 1.0, 1.0], [0.6, 0.6, 1.0, 1.0]])
    inter, valid = crop_intersection(a, b)
    assert torch.allclose(inter[0], torch.tensor([0.25, 0.1, 0.5, 0.5]))
    assert valid.tolist() == [True, False, False]  # touching edges do not intersect


# ----------------------------------------------------------------------------- SCRL boxes


def random_geometry(n: int, seed: int, scale=(0.2, 1.0)):
    """Box/flip pairs as the view sampler draws them on a 64x64 source."""
    sampler = ViewSampler([ViewConfig(size=64, scale=scale, flip_p=0.5, count=2)])
    rng = np.random.default_rng(seed)
    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    geoms = [sampler(img, rng)[1] for _ in range(n)]
    box = [torch.tensor([g[v].box for g in geoms]) for v in range(2)]
    flip = [torch.tensor([g[v].flip for g in geoms]) for v in range(2)]
    return box, flip


@pytest.mark.parametrize("grid", [True, False])
def test_scrl_box_pairs_cover_the_same_source_region_inside_both_crops(grid):
    box, flip = random_geometry(64, seed=1, scale=(0.08, 1.0))
    S = 224
    g = torch.Generator().manual_seed(0)
    pairs = scrl_boxes(box[0], flip[0], box[1], flip[1], S, num_boxes=10, min_size=32, grid=grid, generator=g)
    n_valid = int(pairs.valid.sum())
    assert 0 < n_valid < 64  # some pairs overlap too little at this scale
    assert pairs.rois1.shape == (10 * n_valid, 5) and pairs.rois2.shape == (10 * n_valid, 5)
    assert torch.equal(pairs.rois1[:, 0], pairs.rois2[:, 0])
    assert set(pairs.rois1[:, 0].long().tolist()) == set(pairs.valid.nonzero().squeeze(1).tolist())
    for r in (pairs.rois1, pairs.rois2):
        assert (r[:, 1:] >= 0).all() and (r[:, 1:] <= S).all()
        assert (r[:, 3] > r[:, 1]).all() and (r[:, 4] > r[:, 2]).all()
    src1 = boxes_to_source(pairs.rois1, box[0], flip[0], S)
    src2 = boxes_to_source(pairs.rois2, box[1], flip[1], S)
    assert (src1 - src2).abs().max() < 1e-5  # the same source rectangle (normalised units)
    inter, _ = crop_intersection(box[0], box[1])
    it = inter[pairs.rois1[:, 0].long()]
    assert (src1[:, :2] >= it[:, :2] - 1e-6).all() and (src1[:, 2:] <= it[:, 2:] + 1e-6).all()
    # every box is at least min_size pixels in the less-zoomed view (within float error)
    b1, b2 = box[0][pairs.rois1[:, 0].long()], box[1][pairs.rois1[:, 0].long()]
    zoom_w = torch.minimum(S / (b1[:, 2] - b1[:, 0]), S / (b2[:, 2] - b2[:, 0]))
    zoom_h = torch.minimum(S / (b1[:, 3] - b1[:, 1]), S / (b2[:, 3] - b2[:, 1]))
    w_px = (src1[:, 2] - src1[:, 0]) * zoom_w
    h_px = (src1[:, 3] - src1[:, 1]) * zoom_h
    assert w_px.min() > 31.4 and h_px.min() > 31.4  # clipping to the intersection shaves < 0.5 px


def test_scrl_boxes_identical_crops_and_flip():
    box = torch.tensor([[0.1, 0.2, 0.7, 0.9]])
    g = torch.Generator().manual_seed(3)
    p = scrl_boxes(box, NO, box, NO, 224, generator=g)
    assert p.valid.all() and torch.allclose(p.rois1, p.rois2)
    g = torch.Generator().manual_seed(3)
    q = scrl_boxes(box, NO, box, YES, 224, generator=g)
    # same draws; view 2 is mirrored: x -> 224 - x with left/right swapped
    assert torch.allclose(q.rois1, p.rois1)
    assert torch.allclose(q.rois2[:, 1], 224 - p.rois1[:, 3]) and torch.allclose(q.rois2[:, 3], 224 - p.rois1[:, 1])
    assert torch.allclose(q.rois2[:, [2, 4]], p.rois1[:, [2, 4]])


def test_scrl_boxes_iou_filter_and_last_try_kept():
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    p = scrl_boxes(box, NO, box, NO, 224, num_boxes=10, generator=g)
    r = p.rois1[:, 1:]
    lt = torch.maximum(r[:, None, :2], r[None, :, :2])
    rb = torch.minimum(r[:, None, 2:], r[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area = (r[:, 2:] - r[:, :2]).prod(-1)
    iou = inter / (area[:, None] + area[None] - inter)
    assert (iou.triu(1) < 0.5).all()  # a large intersection: every box passed the IoU test
    # a tiny intersection (33 px, min 32): no box can pass, yet 10 are emitted (last try kept)
    small = torch.tensor([[0.0, 0.0, 33 / 224, 33 / 224]])
    p = scrl_boxes(small, NO, small, NO, 224, num_boxes=10, generator=torch.Generator().manual_seed(0))
    assert p.valid.all() and p.rois1.shape == (10, 5)


def test_scrl_boxes_skip_disjoint_and_small_intersections():
    a = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.5, 0.5]])
    b = torch.tensor([[0.5, 0.0, 1.0, 1.0], [0.4, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]])
    # sample 1: overlap 0.1 wide; in the less-zoomed view (view 2: 224 px over 0.6) that is 37 px,
    # so min_size 32 keeps it and min_size 40 drops it; sample 0 is disjoint; sample 2 identical
    p = scrl_boxes(a, None, b, None, 224, min_size=32, generator=torch.Generator().manual_seed(0))
    assert p.valid.tolist() == [False, True, True]
    p = scrl_boxes(a, None, b, None, 224, min_size=40, generator=torch.Generator().manual_seed(0))
    assert p.valid.tolist() == [False, False, True]
    # min_size >= W' drops (the official test is `min_size >= W'`): W' = round(0.1 * 224 / 0.6) = 37
    p = scrl_boxes(a[1:2], None, b[1:2], None, 224, min_size=37, generator=torch.Generator().manual_seed(0))
    assert not p.valid.any() and p.rois1.shape == (0, 5) and p.rois2.shape == (0, 5)


def test_scrl_boxes_deterministic_given_generator_and_view_sizes():
    box, flip = random_geometry(16, seed=2)
    run = lambda s: scrl_boxes(box[0], flip[0], box[1], flip[1], (64, 32), min_size=8,
                               generator=torch.Generator().manual_seed(s))
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a.rois1, b.rois1) and torch.equal(a.rois2, b.rois2)
    assert not torch.equal(a.rois1, c.rois1)
    assert (a.rois1[:, 1:] <= 64).all() and (a.rois2[:, 1:] <= 32).all()
    s1 = boxes_to_source(a.rois1, box[0], flip[0], 64)
    s2 = boxes_to_source(a.rois2, box[1], flip[1], 32)
    assert (s1 - s2).abs().max() < 1e-5
