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
