import gzip
import struct

import numpy as np
import pytest

from densessl.data import fashion_mnist as fm
from densessl.data.fashion_mnist import CLASSES, load_fashion_mnist, read_idx


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr, code=0x08, gz=True):
    data = idx_bytes(arr, code)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_root(folder, n_train=3, n_test=2, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        parts[prefix] = (images, labels)
    return parts


def test_classes():
    assert CLASSES == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    got = read_idx(write_idx(tmp_path / "a.idx", a, gz=gz))
    assert got.dtype == np.uint8 and np.array_equal(got, a)
    b = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    got = read_idx(write_idx(tmp_path / "b.idx", b, code=0x0C, gz=gz))
    assert np.array_equal(got, b) and got.dtype == np.int32


def test_read_idx_bad_magic(tmp_path):
    a = np.zeros((2, 28, 28), np.uint8)
    bad = bytearray(idx_bytes(a))
    bad[0] = 0x12
    p = tmp_path / "bad-magic.idx"
    p.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="bad-magic.idx.*magic"):
        read_idx(p)


def test_read_idx_truncated(tmp_path):
    a = np.zeros((5, 28, 28), np.uint8)
    p = tmp_path / "short.gz"
    p.write_bytes(gzip.compress(idx_bytes(a)[:-10]))
    with pytest.raises(ValueError, match=r"short.gz.*expected 3920 bytes.*truncated"):
        read_idx(p)
    p2 = tmp_path / "header.idx"
    p2.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match="header.idx.*truncated IDX header"):
        read_idx(p2)
    p3 = tmp_path / "broken.gz"
    p3.write_bytes(gzip.compress(idx_bytes(a))[:40])
    with pytest.raises(ValueError, match="broken.gz"):
        read_idx(p3)


def test_read_idx_bad_type_and_ndim(tmp_path):
    p = tmp_path / "t.idx"
    p.write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(ValueError, match="t.idx.*type code 0x07"):
        read_idx(p)
    q = write_idx(tmp_path / "labels.idx", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="labels.idx.*expected 3"):
        read_idx(q, expected_ndim=3)


def test_load_from_root(tmp_path):
    parts = make_root(tmp_path / "fm")
    data = load_fashion_mnist(tmp_path / "fm")
    assert data.images.dtype == np.uint8 and data.images.shape == (5, 28, 28)
    assert data.labels.dtype == np.int64 and data.labels.shape == (5,)
    # train first, then t10k
    assert np.array_equal(data.images[:3], parts["train"][0])
    assert np.array_equal(data.images[3:], parts["t10k"][0])
    assert np.array_equal(data.labels, np.concatenate([parts["train"][1], parts["t10k"][1]]))
    assert data.source == str((tmp_path / "fm").resolve())
    assert load_fashion_mnist(tmp_path / "fm") is data  # cached per source


def test_root_missing_file(tmp_path):
    make_root(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(tmp_path / "fm")


def test_root_label_count_mismatch(tmp_path):
    make_root(tmp_path / "fm")
    write_idx(tmp_path / "fm" / "train-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz.*7 labels for 3 images"):
        load_fashion_mnist(tmp_path / "fm")


def test_env_var(tmp_path, monkeypatch):
    make_root(tmp_path / "env", n_train=4, n_test=1)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "env"))
    data = load_fashion_mnist()
    assert len(data) == 5 and data.source == str((tmp_path / "env").resolve())


def test_package_fallback(tmp_path, monkeypatch):
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "absent")
    data = load_fashion_mnist()
    assert data.source == "package:t10k"
    assert data.images.shape == (10000, 28, 28) and data.images.dtype == np.uint8
    assert np.array_equal(np.bincount(data.labels), np.full(10, 1000))
    assert data.images.max() == 255


def test_shipped_value_ignores_the_machine_copy(tmp_path, monkeypatch):
    """DENSESSL_FASHION_MNIST=shipped: a fresh machine's data even where a full copy is installed."""
    make_root(tmp_path / "system", n_train=4, n_test=1)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    assert len(load_fashion_mnist()) == 5  # the machine's copy wins by default
    monkeypatch.setenv(fm.ENV_VAR, fm.SHIPPED)
    assert load_fashion_mnist().source == "package:t10k"


@pytest.mark.full_fashion_mnist
def test_full_fashion_mnist_is_train_then_the_shipped_test_split():
    data = load_fashion_mnist()
    if data.source == "package:t10k":
        pytest.skip("needs the 70k Fashion-MNIST files (Debian's dataset-fashion-mnist, or "
                    "DENSESSL_FASHION_MNIST=<folder with the four IDX files>)")
    shipped = fm._load_folder(fm.ASSETS_DIR, fm.TEST_FILES, "package:t10k")
    assert len(data) == 70000 and np.array_equal(np.bincount(data.labels), np.full(10, 7000))
    assert np.array_equal(data.images[60000:], shipped.images) and np.array_equal(data.labels[60000:], shipped.labels)
