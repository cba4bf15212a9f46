import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from densessl.data.imagefolder import ImageFolder, ImageReadError


def _save(path, mode="RGB", size=(12, 10), fmt=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode in ("L", "P") else (size[1], size[0], len(mode))
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
    """Two classes of PNGs (one grayscale, one RGBA, one palette) + a corrupt and a truncated JPEG."""
    root = tmp_path / "imgs"
    _save(str(root / "cat" / "a.png"))
    _save(str(root / "cat" / "b.PNG"), mode="L")
    _save(str(root / "dog" / "c.png"), mode="RGBA")
    _save(str(root / "dog" / "d.png"), mode="P")
    (root / "dog" / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "._a.png").write_bytes(b"macOS metadata")
    return root


def test_default_raises_naming_the_file(folder):
    ds = ImageFolder(folder)
    assert ds.labelled and ds.classes == ["cat", "dog"] and len(ds) == 6
    names = [os.path.basename(p) for p, _ in ds.samples]
    bad = names.index("corrupt.jpg")
    with pytest.raises(ImageReadError, match="corrupt.jpg.*on_error='skip'"):
        ds[bad]
    with pytest.raises(ValueError, match="truncated.jpg"):
        ds[names.index("truncated.jpg")]


def test_skip_mode_drops_unreadable_files(folder):
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        ds = ImageFolder(folder, on_error="skip")
    assert sorted(os.path.basename(p) for p in ds.skipped) == ["corrupt.jpg", "truncated.jpg"]
    got = {os.path.basename(ds[i]["path"]): int(ds[i]["label"]) for i in range(len(ds))}
    assert got == {"a.png": 0, "b.PNG": 0, "c.png": 1, "d.png": 1}
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 10, 12)
        assert item["label"].dtype == torch.int64 and item["label"].ndim == 0


def test_grayscale_becomes_three_equal_channels(folder):
    ds = ImageFolder(folder)
    i = [os.path.basename(p) for p, _ in ds.samples].index("b.PNG")
    img = ds[i]["image"]
    assert img.shape == (3, 10, 12)
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    expected = torch.from_numpy(np.array(Image.open(ds.samples[i][0])))
    assert torch.equal(img[0], expected)


def test_unlabelled_and_autodetect(tmp_path):
    _save(str(tmp_path / "x1.jpg"), fmt="JPEG")
    _save(str(tmp_path / "x2.webp"), fmt="WEBP")
    _save(str(tmp_path / "nested" / "x3.bmp"), fmt="BMP")
    ds = ImageFolder(tmp_path, labelled=False)
    assert len(ds) == 3 and not ds.labelled
    assert "label" not in ds[0] and ds[0]["image"].shape == (3, 10, 12)
    with pytest.raises(ValueError, match="both directly inside it and in sub-folders"):
        ImageFolder(tmp_path)
    flat = tmp_path / "nested"
    auto = ImageFolder(flat)
    assert not auto.labelled and len(auto) == 1


def test_size_resizes_and_centre_crops(folder):
    with pytest.warns(UserWarning, match="skipped 2"):
        ds = ImageFolder(folder, on_error="skip", size=8)
    batch = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert batch.shape == (4, 3, 8, 8)


def test_empty_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\.jpg.*\.webp"):
        ImageFolder(tmp_path)
    (tmp_path / "a").mkdir()
    _save(str(tmp_path / "b" / "x.png"))
    with pytest.raises(FileNotFoundError, match=r"\['a'\]"):
        ImageFolder(tmp_path)
    with pytest.raises(ValueError, match="on_error"):
        ImageFolder(tmp_path, on_error="ignore")


@pytest.fixture
def with_tiny(tmp_path):
    """Two usable images, a 1x1, a 1-px-wide strip, a 15x40 and a corrupt file."""
    root = tmp_path / "mixed"
    _save(str(root / "a.png"), size=(20, 16))
    _save(str(root / "b.png"), size=(16, 30))
    _save(str(root / "one.png"), size=(1, 1))
    _save(str(root / "strip.png"), size=(1, 50))
    _save(str(root / "narrow.png"), size=(15, 40))
    (root / "corrupt.png").write_bytes(b"not an image")
    return root


def test_min_side_skips_and_counts_small_images_with_the_unreadable(with_tiny):
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*skipped 3 image\(s\) whose shorter side is "
                                         r"below min_side=16 px \(e.g. '.*narrow.png', 15x40\)"):
        ds = ImageFolder(with_tiny, on_error="skip", min_side=16)
    assert [os.path.basename(p) for p, _ in ds.samples] == ["a.png", "b.png"]
    assert sorted(os.path.basename(p) for p in ds.too_small) == ["narrow.png", "one.png", "strip.png"]
    assert [os.path.basename(p) for p in ds.skipped] == ["corrupt.png"]
    with pytest.raises(FileNotFoundError, match="1 failed to decode, 5 have a shorter side below min_side=100 px"):
        with pytest.warns(UserWarning):
            ImageFolder(with_tiny, on_error="skip", min_side=100)


def test_min_side_in_raise_mode_names_the_file_the_size_and_the_keys(with_tiny):
    ds = ImageFolder(with_tiny, min_side=16)
    names = [os.path.basename(p) for p, _ in ds.samples]
    assert ds[names.index("a.png")]["image"].shape == (3, 16, 20)
    with pytest.raises(ImageReadError, match=r"strip.png' is 1x50 px, its shorter side below data.min_side=16 px.*"
                                             r"set data.on_error=skip, or lower data.min_side"):
        ds[names.index("strip.png")]
    assert ImageFolder(with_tiny)[names.index("one.png")]["image"].shape == (3, 1, 1)  # Python default: no check


def test_config_min_side_defaults_to_16_through_build_dataset(with_tiny):
    from densessl.config import ConfigError, DataConfig
    from densessl.data.build import build_dataset

    assert DataConfig().min_side == 16
    with pytest.warns(UserWarning, match="skipped 3 image"):
        ds = build_dataset(DataConfig(dataset="imagefolder", root=str(with_tiny), on_error="skip", size=None))
    assert len(ds) == 2 and len(ds.too_small) == 3
    with pytest.raises(ConfigError, match="data.root=.*nope.*does not exist"):
        build_dataset(DataConfig(dataset="imagefolder", root=str(with_tiny / "nope")))
