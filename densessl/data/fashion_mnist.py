"""Fashion-MNIST: IDX reader and a loader that finds the data on this machine.

Search order of :func:`load_fashion_mnist`:

1. ``root`` when given (a folder holding the four ``*-ubyte.gz`` files);
2. the folder named by the environment variable ``DENSESSL_FASHION_MNIST``; its value
   ``shipped`` selects the shipped split (4.) whatever the machine has: a fresh machine's
   configuration, which CI tests in;
3. ``/usr/share/datasets/fashion-mnist`` (Debian's package) when it holds all four files;
4. the t10k split shipped inside the package (``densessl/data/assets``, 10 000 items).

Where all four files are found, the train and t10k splits are concatenated (70 000 items,
train first). Loaded arrays are cached per source in this process.
"""
from __future__ import annotations

import gzip
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

ENV_VAR = "DENSESSL_FASHION_MNIST"
SHIPPED = "shipped"  # DENSESSL_FASHION_MNIST=shipped: only the 10k split inside the package
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

TRAIN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
ALL_FILES = TRAIN_FILES + TEST_FILES

# IDX type codes -> big-endian numpy dtypes
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True)
class FashionMNIST:
    """Fashion-MNIST items: ``images`` uint8 (N,28,28), ``labels`` int64 (N,), ``source``."""

    images: np.ndarray
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a numpy array.

    The header is validated: two zero bytes, a known type code, the number of dimensions, and
    a payload whose size matches the dimensions exactly. Malformed input raises ``ValueError``
    naming the file and what was expected.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read IDX file ({e.strerror or e})") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: expected an IDX header of at least 4 bytes, got {len(raw)} bytes")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()}; expected 0x0000TTNN "
            "(two zero bytes, type code, number of dimensions)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: unknown IDX type code 0x{code:02x}; expected one of "
            + ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        )
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions; expected at least 1")
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path}: IDX file has {ndim} dimensions; expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header; expected {header} bytes, got {len(raw)}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        raise ValueError(
            f"{path}: IDX payload is {got} bytes; expected {expected} bytes for shape {dims} "
            f"of {dtype.name} ({'truncated' if got < expected else 'trailing data'})"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _read_pair(folder: Path, images_name: str, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(folder / images_name, expected_ndim=3)
    labels = read_idx(folder / labels_name, expected_ndim=1)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"{folder / images_name}: expected uint8 images of shape (N, 28, 28), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{folder / labels_name}: {labels.shape[0]} labels for {images.shape[0]} images "
            f"in {images_name}; expected the same count"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(
            f"{folder / labels_name}: labels must lie in [0, {len(CLASSES) - 1}], "
            f"found [{labels.min()}, {labels.max()}]"
        )
    return images, labels.astype(np.int64)


def _check_folder(folder: Path, names: tuple[str, ...], what: str) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {folder} is not a directory")
    for name in names:
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{what} {folder} lacks {name}; expected the Fashion-MNIST files "
                + ", ".join(names)
            )


_CACHE: dict[str, FashionMNIST] = {}
_LOCK = threading.Lock()


def _load_folder(folder: Path, names: tuple[str, ...], source: str) -> FashionMNIST:
    with _LOCK:
        hit = _CACHE.get(source)
        if hit is not None:
            return hit
        parts = [_read_pair(folder, names[k], names[k + 1]) for k in range(0, len(names), 2)]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        images.setflags(write=False)
        labels.setflags(write=False)
        data = FashionMNIST(images=images, labels=labels, source=source)
        _CACHE[source] = data
        return data


def load_fashion_mnist(root: str | os.PathLike | None = None) -> FashionMNIST:
    """Load Fashion-MNIST from the first source found (see the module docstring).

    ``source`` of the result is the resolved folder (all four files: train then t10k) or
    ``"package:t10k"`` for the test split shipped with densessl.
    """
    if root is not None:
        folder = Path(root).expanduser().resolve()
        _check_folder(folder, ALL_FILES, "Fashion-MNIST root")
        return _load_folder(folder, ALL_FILES, str(folder))
    env = os.environ.get(ENV_VAR)
    if env and env != SHIPPED:
        folder = Path(env).expanduser().resolve()
        _check_folder(folder, ALL_FILES, f"${ENV_VAR} =")
        return _load_folder(folder, ALL_FILES, str(folder))
    if env != SHIPPED and all((SYSTEM_DIR / n).is_file() for n in ALL_FILES):
        folder = SYSTEM_DIR.resolve()
        return _load_folder(folder, ALL_FILES, str(folder))
    _check_folder(ASSETS_DIR, TEST_FILES, "densessl's asset folder")
    return _load_folder(ASSETS_DIR, TEST_FILES, "package:t10k")
