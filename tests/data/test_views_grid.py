"""Pyramid patch views (ViewConfig.grid > 0, SS-PRL's levels) and the unchanged plain crops."""
import numpy as np
import pytest
import torch

from densessl.config import ViewConfig
from densessl.data.views import ViewDataset, ViewSampler, collate_views, crop_view, expand_slots, sample_crop

COLOURS = torch.tensor([[10, 0, 0], [0, 40, 0], [0, 0, 70], [100, 100, 0], [0, 130, 130],
                        [160, 0, 160], [190, 20, 0], [0, 220, 30], [250, 250, 250]], dtype=torch.uint8)


def cell_image(grid: int, cell: int) -> torch.Tensor:
    """grid x grid solid cells of distinct colours, row-major."""
    img = torch.zeros(3, grid * cell, grid * cell, dtype=torch.uint8)
    for r in range(grid):
        for c in range(grid):
            img[:, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = COLOURS[r * grid + c].view(3, 1, 1)
    return img


def coordinate_image(h, w):
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([xs, ys, torch.zeros_like(xs)]).to(torch.uint8)


def whole_image(grid, size, region_size, count=2, flip_p=0.5):
    return ViewConfig(size=size, count=count, grid=grid, region_size=region_size, scale=(1.0, 1.0),
                      ratio=(1.0, 1.0), flip_p=flip_p)


@pytest.mark.parametrize("grid", [2, 3])
def test_patches_of_a_cell_share_its_colour_across_views_and_count_is_view_major(grid):
    img = cell_image(grid, 30)  # region = whole image, no resize: cells of exactly 30 px
    views, geoms = ViewSampler([whole_image(grid, 20, 30 * grid)])(img, np.random.default_rng(0))
    n = grid * grid
    assert len(views) == 2 * n and all(v.shape == (3, 20, 20) for v in views)
    for v in range(2):
        for k in range(n):
            patch = views[v * n + k]
            assert (patch == COLOURS[k].view(3, 1, 1)).all(), (v, k)  # slot v*n+k shows cell k
            x0, y0, x1, y1 = geoms[v * n + k].box
            r, c = divmod(k, grid)
            assert c / grid <= x0 and x1 <= (c + 1) / grid + 1e-9 and r / grid <= y0 and y1 <= (r + 1) / grid + 1e-9
            assert np.isclose(x1 - x0, 20 / (30 * grid)) and geoms[v * n + k].size == (20, 20)


def test_paper_level_sizes_and_cell_size_floor():
    # SS-PRL's levels: 314 px cut 2x2 -> 157-px cells, 112-px patches; 383 px cut 3x3 -> 127-px cells
    # (2 px dropped), 96-px patches. With these, 8 global crops give 8 + 2*4 + 2*9 = 34 slots.
    img = coordinate_image(240, 250)
    groups = [ViewConfig(size=224, count=2, scale=(0.14, 1.0)), ViewConfig(size=96, count=6, scale=(0.05, 0.14)),
              ViewConfig(size=112, count=2, grid=2, region_size=314, scale=(0.6, 1.0)),
              ViewConfig(size=96, count=2, grid=3, region_size=383, scale=(0.6, 1.0))]
    assert len(expand_slots(groups)) == 34
    views, geoms = ViewSampler(groups)(img, np.random.default_rng(1))
    assert [v.shape[-1] for v in views] == [224] * 2 + [96] * 6 + [112] * 8 + [96] * 18
    # all patches of one level lie inside one region; the two views of a cell overlap heavily
    lvl2 = np.array([g.box for g in geoms[16:]])
    x0 = lvl2[:, 0].min()
    cell_w = (lvl2[:, 2].max() - x0) / 3  # >= a cell's width in source units (up to the dropped 2 px)
    for k in range(9):
        a, b = lvl2[k], lvl2[9 + k]
        assert abs(a[0] - b[0]) <= cell_w and abs(a[1] - b[1]) <= cell_w * 1.5


def test_boxes_locate_patch_pixels_in_the_source():
    img = coordinate_image(64, 64)  # channel 0 = column, channel 1 = row
    g = ViewConfig(size=12, count=2, grid=2, region_size=0, scale=(0.5, 0.5), ratio=(1.0, 1.0), flip_p=0.0)
    # region_size 0 -> 2 * 12 = 24 px, smaller than the ~45-px region: a downscale; check the mapping
    views, geoms = ViewSampler([g])(img, np.random.default_rng(3))
    for v, geo in zip(views, geoms):
        x0, y0, x1, y1 = geo.box
        # centre of the patch maps to the centre of its box (+-1.5 px of interpolation)
        assert abs(float(v[0, 6, 6]) - ((x0 + x1) / 2 * 64 - 0.5)) < 2.0
        assert abs(float(v[1, 6, 6]) - ((y0 + y1) / 2 * 64 - 0.5)) < 2.0


def test_flip_mirrors_patch_and_is_recorded():
    img = coordinate_image(32, 32)
    g = ViewConfig(size=16, count=1, grid=2, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    views, geoms = ViewSampler([g])(img, np.random.default_rng(0))
    assert all(geo.flip for geo in geoms)
    assert views[0][0, 0, 0] == 15 and views[0][0, 0, 15] == 0  # cell (0,0) = columns 0..15, mirrored


def test_plain_groups_draw_exactly_as_before():
    """grid = 0 consumes the generator as the original sampler did, whatever follows."""
    img = coordinate_image(48, 40)
    groups = [ViewConfig(size=16, count=2, scale=(0.2, 1.0)), ViewConfig(size=8, count=3, scale=(0.05, 0.3))]
    rng = np.random.default_rng(5)
    expected = []
    for g in groups:  # the sampler's original loop
        for _ in range(g.count):
            t, l, h, w = sample_crop(rng, 48, 40, g.scale, g.ratio)
            expected.append(crop_view(img, t, l, h, w, bool(rng.random() < g.flip_p), g.size))
    views, geoms = ViewSampler(groups + [ViewConfig(size=8, count=2, grid=2)])(img, np.random.default_rng(5))
    assert len(views) == 5 + 8
    for (ev, eg), v, g in zip(expected, views, geoms):
        assert torch.equal(ev, v) and eg == g


def test_dataset_and_collate_carry_patch_slots():
    class _Images(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"image": cell_image(2, 16)}

    groups = [ViewConfig(size=16, count=2), ViewConfig(size=12, count=2, grid=2, region_size=32)]
    ds = ViewDataset(_Images(), ViewSampler(groups), seed=0)
    batch = collate_views([ds[(0, i)] for i in range(3)])
    assert len(batch["views"]) == len(expand_slots(groups)) == 10
    assert batch["views"][2].shape == (3, 3, 12, 12) and batch["box"][9].shape == (3, 4)
    assert [s.grid for s in expand_slots(groups)] == [0, 0] + [2] * 8


def test_cells_smaller_than_patches_are_rejected_with_the_key():
    with pytest.raises(ValueError, match=r"views\[1\].*cells of 10 px, smaller than the patch size 12"):
        ViewSampler([ViewConfig(), ViewConfig(size=12, grid=3, region_size=30)])
