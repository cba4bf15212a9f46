"""A folder of images as a dataset, labelled by sub-folder or unlabelled."""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import Dataset

from densessl.common.errors import ImageReadError  # noqa: F401  (raised here; importers take it from here too)
from densessl.data.image_io import DecodeError, decode_rgb, encoded_hw, fit_square

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFolder(Dataset):
    """Images under `root`, each item {"image": uint8 (3, H, W) RGB, "label": int64 scalar, "path": str}.

    Layouts:
      - labelled: `root/<class>/.../<image>`; classes are the sub-folder names, sorted (as in
        torchvision), label = index in `self.classes`. Every class folder must hold an image.
      - unlabelled: every image under `root`, recursively; items have no "label".
      - `labelled=None` detects the layout: sub-folders holding images and no image directly in
        `root` -> labelled; images directly in `root` and none in sub-folders -> unlabelled;
        both -> ValueError (pass `labelled=` to choose).
    Files are matched by extension, case-insensitively: .jpg .jpeg .png .bmp .webp; names that
    start with "." (hidden files, macOS "._*" metadata) are ignored. Order is sorted by path.

    Images are decoded by densessl.data.image_io (torchvision for JPEG, PIL otherwise; the same
    pixels) and converted to RGB (grayscale, RGBA (alpha dropped), palette,
    CMYK ...). With `size`, the shorter side is resized to `size` (bilinear, antialiased) and
    the centre `size` x `size` crop is kept, so items can be batched.

    Unreadable files (corrupt, truncated, not an image), and images whose shorter side is below
    `min_side` px (a 1x1 or 1-px-wide image would be upsampled into a smear; default 1: no
    check, the config's `data.min_side` sets 16):
      - `on_error="raise"` (default): reading one raises `ImageReadError` (a ValueError) naming
        the file, when that item is loaded.
      - `on_error="skip"`: every file is decoded once at construction (full decode, so
        truncated files are caught; this costs one pass over the data), the unreadable and the
        too-small ones are dropped, their paths are kept in `self.skipped` (unreadable) and
        `self.too_small` (below `min_side`), and one warning gives the counts.
    An empty folder, or one with no image of the accepted extensions, raises FileNotFoundError.
    """

    def __init__(self, root: str | os.PathLike, labelled: bool | None = None, on_error: str = "raise",
                 size: int | None = None, min_side: int = 1):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive int or None, got {size!r}")
        if not isinstance(min_side, int) or min_side < 1:
            raise ValueError(f"min_side must be a positive int, got {min_side!r}")
        self.root = os.fspath(root)
        self.on_error, self.size, self.min_side = on_error, size, min_side
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder {self.root!r} does not exist or is not a directory")

        top_images = [os.path.join(self.root, f) for f in sorted(os.listdir(self.root))
                      if _is_image(f) and os.path.isfile(os.path.join(self.root, f))]
        subdirs = sorted(d for d in os.listdir(self.root)
                         if not d.startswith(".") and os.path.isdir(os.path.join(self.root, d)))
        per_class = {d: _walk_images(os.path.join(self.root, d)) for d in subdirs}
        if labelled is None:
            in_subdirs = any(per_class.values())
            if top_images and in_subdirs:
                raise ValueError(f"{self.root!r} has images both directly inside it and in sub-folders; "
                                 f"pass labelled=True (sub-folders are classes, top-level images ignored) "
                                 f"or labelled=False (all images, no labels)")
            labelled = in_subdirs
        self.labelled = labelled

        if labelled:
            self.classes = list(subdirs)
            empty = [d for d in self.classes if not per_class[d]]
            if not self.classes or empty:
                what = f"class folder(s) {empty}" if empty else "no class sub-folders"
                raise FileNotFoundError(f"labelled image folder {self.root!r}: {what} with images of the "
                                        f"accepted extensions {list(IMAGE_EXTENSIONS)}")
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
            samples = [(p, self.class_to_idx[c]) for c in self.classes for p in per_class[c]]
        else:
            self.classes, self.class_to_idx = [], {}
            samples = [(p, -1) for p in _walk_images(self.root)]
            if not samples:
                raise FileNotFoundError(f"no images in {self.root!r} (searched recursively for the accepted "
                                        f"extensions {list(IMAGE_EXTENSIONS)})")

        self.skipped: list[str] = []  # unreadable (on_error="skip")
        self.too_small: list[str] = []  # shorter side below min_side (on_error="skip")
        if on_error == "skip":
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                sizes = list(pool.map(_decoded_size, [p for p, _ in samples]))
            self.skipped = [p for (p, _), wh in zip(samples, sizes) if wh is None]
            small = [(p, wh) for (p, _), wh in zip(samples, sizes) if wh is not None and min(wh) < min_side]
            self.too_small = [p for p, _ in small]
            samples = [s for s, wh in zip(samples, sizes) if wh is not None and min(wh) >= min_side]
            report = []
            if self.skipped:
                report.append(f"skipped {len(self.skipped)} unreadable image(s) (e.g. {self.skipped[0]!r}); "
                              f"their paths are in .skipped")
            if small:
                (p, (w, h)) = small[0]
                report.append(f"skipped {len(small)} image(s) whose shorter side is below min_side={min_side} px "
                              f"(e.g. {p!r}, {w}x{h}); their paths are in .too_small")
            if report:
                warnings.warn(f"ImageFolder {self.root!r}: " + "; ".join(report), stacklevel=2)
            if not samples:
                raise FileNotFoundError(f"no usable images in {self.root!r}: {len(self.skipped)} failed to decode, "
                                        f"{len(small)} have a shorter side below min_side={min_side} px")
        self.samples = samples
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        image = read_image_rgb(path)
        if min(image.shape[1:]) < self.min_side:
            raise ImageReadError(
                f"image {path!r} is {image.shape[2]}x{image.shape[1]} px, its shorter side below data.min_side="
                f"{self.min_side} px (it would be upsampled into a smear); to skip such images, set "
                f"data.on_error=skip, or lower data.min_side (in Python: ImageFolder(..., on_error='skip', "
                f"min_side=...))")
        if self.size is not None:
            image = fit_square(image, self.size)
        item = {"image": image, "path": path}
        if self.labelled:
            item["label"] = torch.tensor(label, dtype=torch.int64)
        return item

    def encoded(self, index: int) -> dict:
        """The file's bytes, undecoded, with the size of the image its views are cut from
        (data.decode_on=device: densessl/data/device_decode.py); the same checks as __getitem__'s
        that the header allows (an undecodable body is reported when it is decoded)."""
        path, label = self.samples[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageReadError(f"could not read image {path!r} ({type(e).__name__}: {e})") from e
        hw = encoded_hw(data)
        if hw is None:  # a header PIL cannot read: decode it (the readers' ImageReadError names the file)
            hw = tuple(read_image_rgb(path).shape[-2:])
        if min(hw) < self.min_side:
            self[index]  # the shorter-side error, worded once
        item = {"data": data, "hw": hw if self.size is None else (self.size, self.size), "where": f"image {path!r}",
                "fit": self.size}
        if self.labelled:
            item["label"] = torch.tensor(label, dtype=torch.int64)
        return item


def read_image_rgb(path: str) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor (3, H, W); ImageReadError names the file on failure."""
    try:
        return decode_rgb(path)
    except (OSError, DecodeError) as err:
        cause = err.cause if isinstance(err, DecodeError) else err
        raise ImageReadError(f"could not decode image {path!r} ({type(cause).__name__}: {cause}); to skip "
                             f"unreadable images, set data.on_error=skip (in Python: ImageFolder(..., "
                             f"on_error='skip'))") from cause


def _decoded_size(path: str) -> tuple[int, int] | None:
    """(width, height) of a fully decoded image, or None when it cannot be decoded."""
    try:
        image = read_image_rgb(path)
    except ImageReadError:
        return None
    return int(image.shape[2]), int(image.shape[1])


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return sorted(found)
