import pickle

import numpy as np
import pytest
import torch

from densessl.data.fashion_mnist import load_fashion_mnist
from densessl.data.scenes import (MASK_THRESHOLD, OPACITY_GAIN, SHADE_MIN, FashionItems, FashionScenes,
                                  item_pools, make_styled_background)

N = 300


@pytest.fixture(scope="module")
def train():
    return FashionScenes("train", num_scenes=N)


@pytest.fixture(scope="module")
def val():
    return FashionScenes("val", num_scenes=N)


@pytest.fixture(scope="module")
def train_samples(train):
    return [train[i] for i in range(N)]


def mask_box(m: np.ndarray):
    ys, xs = np.nonzero(m)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_sample_format(train):
    s = train[0]
    assert set(s) == {"image", "labels", "boxes", "classes", "masks", "semantic", "item_ids"}
    n = len(s["classes"])
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 64, 64)
    assert s["labels"].dtype == torch.float32 and s["labels"].shape == (10,)
    assert s["boxes"].dtype == torch.float32 and s["boxes"].shape == (n, 4)
    assert s["classes"].dtype == torch.int64 and s["item_ids"].dtype == torch.int64
    assert s["masks"].dtype == torch.bool and s["masks"].shape == (n, 64, 64)
    assert s["semantic"].dtype == torch.int64 and s["semantic"].shape == (64, 64)
    assert len(train) == N
    with pytest.raises(IndexError):
        train[N]
    assert torch.equal(train[-1]["image"], train[N - 1]["image"])


def test_ground_truth_consistent(train, train_samples):
    labels_all = load_fashion_mnist().labels
    counts = []
    for s in train_samples:
        masks = s["masks"].numpy()
        classes = s["classes"].numpy()
        boxes = s["boxes"].numpy()
        counts.append(len(classes))
        assert 1 <= len(classes) <= 4
        assert masks.reshape(len(masks), -1).any(1).all(), "every mask non-empty"
        assert masks.sum(0).max() <= 1, "masks disjoint"
        for m, b in zip(masks, boxes):
            assert list(b) == mask_box(m), "box is the bounding box of its mask"
        expected = np.zeros(10, np.float32)
        expected[classes] = 1
        assert np.array_equal(s["labels"].numpy(), expected)
        sem = np.zeros((64, 64), np.int64)
        for m, c in zip(masks, classes):
            sem[m] = c + 1
        assert np.array_equal(s["semantic"].numpy(), sem)
        assert np.array_equal(classes, labels_all[s["item_ids"].numpy()])
    assert set(counts) == {1, 2, 3, 4}  # uniform in [min_items, max_items]
    # items are drawn from all ten classes
    assert (np.stack([s["labels"].numpy() for s in train_samples]).sum(0) > 0).all()


def test_items_visible_in_image(train_samples):
    # the top-most item's pixels differ from the background around it: items are really drawn
    diffs = []
    for s in train_samples[:50]:
        img = s["image"].numpy().astype(np.float32)
        top = s["masks"][-1].numpy()
        bg = s["semantic"].numpy() == 0
        diffs.append(np.abs(img[:, top].mean(1) - img[:, bg].mean(1)).max())
    assert np.median(diffs) > 40


def test_occlusion_bound(train):
    for i in range(N):
        g = train.generate(i)
        vis, full = g["masks"], g["full_masks"]
        for j in range(len(vis)):
            later = full[j + 1 :].any(0) if j + 1 < len(full) else np.zeros_like(full[j])
            assert np.array_equal(vis[j], full[j] & ~later)
            assert vis[j].sum() >= 0.5 * full[j].sum(), (i, j)
        assert np.array_equal(train[i]["masks"].numpy(), vis)


def test_occlusion_bound_configurable():
    ds = FashionScenes("train", num_scenes=60, min_items=4, max_items=4, min_visible=0.9)
    for i in range(60):
        g = ds.generate(i)
        assert (g["masks"].sum((1, 2)) >= 0.9 * g["full_masks"].sum((1, 2))).all()


def test_min_visible_zero_keeps_masks_non_empty():
    z = FashionScenes("train", num_scenes=40, min_items=4, max_items=4, min_visible=0.0)
    for i in range(40):
        assert z[i]["masks"].flatten(1).any(1).all()


def test_deterministic(train):
    other = FashionScenes("train", num_scenes=N)
    order = [17, 3, 250, 3]
    for i in order:
        a, b = train[i], other[i]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert not torch.equal(train[0]["image"], train[1]["image"])
    assert not torch.equal(train[0]["image"], FashionScenes("train", 10, seed=1)[0]["image"])
    assert not torch.equal(train[0]["image"], FashionScenes("val", 10)[0]["image"])


def test_without_masks(train):
    fast = FashionScenes("train", num_scenes=N, with_masks=False)
    a, b = train[7], fast[7]
    assert "masks" not in b and "semantic" not in b
    for k in b:
        assert torch.equal(a[k], b[k]), k


def test_pickle_and_workers(train):
    blob = pickle.dumps(train)
    assert len(blob) < 2_000_000  # the Fashion-MNIST arrays are not pickled
    clone = pickle.loads(blob)
    assert torch.equal(clone[5]["image"], train[5]["image"])
    loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=1,
                                         collate_fn=lambda x: x)
    batch = next(iter(loader))
    for i, s in enumerate(batch):
        assert torch.equal(s["masks"], train[i]["masks"])


def test_train_val_disjoint(train, val, train_samples):
    train_ids = set(np.concatenate([s["item_ids"].numpy() for s in train_samples]).tolist())
    val_ids = set(np.concatenate([val[i]["item_ids"].numpy() for i in range(N)]).tolist())
    assert len(train_ids) > 500 and len(val_ids) > 500
    assert not train_ids & val_ids
    n = len(load_fashion_mnist())
    pools = item_pools(n)
    assert not set(pools["train"].tolist()) & set(pools["val"].tolist())
    assert len(pools["train"]) + len(pools["val"]) == n
    assert len(pools["val"]) == round(0.2 * n)
    assert train_ids <= set(pools["train"].tolist()) and val_ids <= set(pools["val"].tolist())
    # stable, and independent of the scene seed
    assert np.array_equal(item_pools(n)["val"], pools["val"])
    assert np.array_equal(FashionScenes("val", 5, seed=9).pool, pools["val"])


def test_bad_split_and_args():
    with pytest.raises(ValueError, match="'test'"):
        FashionScenes("test")
    with pytest.raises(ValueError, match="'validation'"):
        FashionItems("validation")
    with pytest.raises(ValueError, match="min_items"):
        FashionScenes(min_items=3, max_items=2)


def test_size_and_item_counts():
    ds = FashionScenes("val", num_scenes=20, size=96, min_items=3, max_items=3)
    for i in range(20):
        s = ds[i]
        assert s["image"].shape == (3, 96, 96) and s["semantic"].shape == (96, 96)
        assert len(s["classes"]) == 3


def test_fashion_items():
    data = load_fashion_mnist()
    tr, va = FashionItems("train"), FashionItems("val", num_samples=200)
    pools = item_pools(len(data))
    assert len(tr) == len(pools["train"]) and len(va) == 200
    for i in (0, 1, 123):
        s = va[i]
        assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 64, 64)
        assert s["label"].dtype == torch.int64 and s["label"].shape == ()
        assert int(s["label"]) == data.labels[va.item_id(i)]
        assert torch.equal(s["image"], FashionItems("val", num_samples=200)[i]["image"])
    assert not torch.equal(va[0]["image"], va[1]["image"])
    val_items = {va.item_id(i) for i in range(200)}
    assert val_items <= set(pools["val"].tolist())
    assert not val_items & {tr.item_id(i) for i in range(2000)}


def test_styles_plain_and_uniform():
    """plain: black background, untinted (grey) items; uniform: one colour plus mild noise."""
    # Outside the masks a pixel is black or lies under items' faint rims (intensity <=
    # MASK_THRESHOLD). One rim on black is at most o * shade with o = OPACITY_GAIN * threshold and
    # shade = SHADE_MIN + (1 - SHADE_MIN) * threshold (52 grey levels); where the rims of j items
    # overlap, the blend v <- v (1 - o) + o * shade gives at most shade * (1 - (1 - o)^j).
    o = OPACITY_GAIN * MASK_THRESHOLD
    shade = SHADE_MIN + (1 - SHADE_MIN) * MASK_THRESHOLD

    def rim_bound(j):
        return 255 * shade * (1 - (1 - o) ** j) + 0.5

    for plain in (FashionScenes("train", 8, 32, max_items=1, style="plain"), FashionScenes("train", 8, 32, style="plain")):
        for i in range(8):
            s = plain[i]
            img, fg = s["image"].int(), s["semantic"] > 0
            assert img[:, ~fg].max() <= rim_bound(len(s["classes"])) and (img[:, ~fg] == 0).float().mean() > 0.5
            assert (img[0] == img[1]).all() and (img[1] == img[2]).all()  # grey everywhere
            assert img[:, fg].float().mean() > 100  # items bright
    # uniform: one colour plus mild noise; textured: far more varied. Judged on the background
    # itself (the first draw of the scene's generator): item rims below the mask threshold
    # tint some "background" pixels of the semantic map.
    stds = {}
    for style in ("uniform", "textured"):
        ds = FashionScenes("train", 4, 32, style=style)
        for i in range(4):
            bg = make_styled_background(ds._rng(i), 32, style)
            assert ((ds.generate(i)["image"] == np.clip(bg * 255 + 0.5, 0, 255).astype(np.uint8)).all(-1)).mean() > 0.3
            stds[style, i] = float((bg * 255).reshape(-1, 3).std(0).max())
    assert max(stds["uniform", i] for i in range(4)) < 8  # 0.015 noise ~ 4 grey levels
    assert max(stds["textured", i] for i in range(4)) > 8
    items = FashionItems("train", 3, 32, style="plain")
    assert all(items[i]["image"].float().mean() < 128 for i in range(3))
    with pytest.raises(ValueError, match="style must be one of"):
        FashionScenes("train", 1, 32, style="flat")


def test_photo_style_crops_the_shipped_photographs(monkeypatch):
    from densessl.data import photos as ph

    photos = ph.load_photos()
    assert len(photos) == len(ph.PHOTOS) and all(min(p.shape[:2]) == ph.PHOTO_SIDE for p in photos)
    a, b = FashionScenes("val", 4, 32, style="photo"), FashionScenes("val", 4, 32, style="photo")
    assert torch.equal(a[2]["image"], b[2]["image"]) and not torch.equal(a[2]["image"], a[3]["image"])
    # one photo, left half 0.2 and right half 0.8: every crop is 0.2 and/or 0.8, a vertical edge at most
    two_tone = np.full((64, 128, 3), 0.2, np.float32)
    two_tone[:, 64:] = 0.8
    monkeypatch.setattr(ph, "load_photos", lambda: (two_tone,))
    for seed in range(6):
        bg = ph.make_photo_background(np.random.default_rng(seed), 16)
        assert bg.shape == (16, 16, 3) and np.allclose(bg, bg[:1], atol=1 / 255)  # columns constant
        assert bg.min() >= 0.2 - 1 / 255 and bg.max() <= 0.8 + 1 / 255


def test_photo_style_without_scikit_image_names_the_extra(monkeypatch):
    import importlib.util

    from densessl.config import ConfigError
    from densessl.data import photos as ph

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    ph.load_photos.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"data.style=photo needs .*scikit-image.*densessl\[photos\]"):
            ph.load_photos()
    finally:
        ph.load_photos.cache_clear()
