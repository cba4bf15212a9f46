import numpy as np
import torch

from densessl.config import ViewConfig
from densessl.data.views import ResumableBatchSampler, ViewDataset, ViewSampler, crop_view, sample_crop


def coordinate_image(h, w):
    """uint8 image whose channel 0 is the column and channel 1 the row of each pixel."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([xs, ys, torch.zeros_like(xs)]).to(torch.uint8)


def test_known_crop_maps_source_pixels_to_view_pixels():
    img = coordinate_image(40, 50)
    view, geo = crop_view(img, top=5, left=10, h=16, w=16, flip=False, size=16)  # no resize
    assert view[0, 0, 0] == 10 and view[1, 0, 0] == 5  # view (0,0) <- source (row 5, col 10)
    assert view[0, 3, 7] == 17 and view[1, 3, 7] == 8  # view (3,7) <- source (8, 17)
    assert geo.box == (10 / 50, 5 / 40, 26 / 50, 21 / 40) and not geo.flip and geo.size == (16, 16)


def test_flipped_crop_mirrors_columns():
    img = coordinate_image(40, 50)
    view, geo = crop_view(img, top=5, left=10, h=16, w=16, flip=True, size=16)
    assert geo.flip
    assert view[0, 0, 0] == 25 and view[0, 0, 15] == 10  # column c <- source column 10 + 15 - c


def test_resized_crop_scales_coordinates():
    img = coordinate_image(64, 64)
    view, geo = crop_view(img, top=0, left=0, h=32, w=32, flip=False, size=64)  # 2x zoom
    # view pixel x samples source x/2 (+-1 from bilinear interpolation at half-pixel centres)
    cols = view[0, 10].int()
    assert (cols - torch.arange(64) // 2).abs().max() <= 1
    assert geo.box == (0.0, 0.0, 0.5, 0.5)


def test_sample_crop_stays_inside_and_respects_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        t, l, h, w = sample_crop(rng, 48, 64, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= t and t + h <= 48 and 0 <= l and l + w <= 64
        assert h * w >= 0.15 * 48 * 64  # rounding may shave a little off the 0.2 area fraction


class _Images(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"image": torch.full((3, 32, 32), i, dtype=torch.uint8), "labels": torch.ones(3)}


def test_views_are_a_function_of_seed_epoch_index():
    ds = ViewDataset(_Images(), ViewSampler([ViewConfig(size=16), ViewConfig(size=8, count=2)]), seed=3)
    a, b = ds[(1, 4)], ds[(1, 4)]
    assert [v.shape[-1] for v in a["views"]] == [16, 8, 8]
    assert [g.box for g in a["geometry"]] == [g.box for g in b["geometry"]]
    assert [g.box for g in ds[(2, 4)]["geometry"]] != [g.box for g in a["geometry"]]


def test_resumed_sampler_continues_the_same_order_and_ranks_partition_the_batch():
    full = list(ResumableBatchSampler(100, 8, 12, seed=1, epoch=0))
    tail = list(ResumableBatchSampler(100, 8, 12, seed=1, epoch=0, start_step=5))
    assert tail == full[5:]
    r0 = list(ResumableBatchSampler(100, 8, 12, seed=1, epoch=0, rank=0, world_size=2))
    r1 = list(ResumableBatchSampler(100, 8, 12, seed=1, epoch=0, rank=1, world_size=2))
    assert all(a + b == f for a, b, f in zip(r0, r1, full))
    assert list(ResumableBatchSampler(100, 8, 12, seed=1, epoch=1)) != full
