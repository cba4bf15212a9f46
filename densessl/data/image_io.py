"""The one image decoder of densessl's readers: file path or encoded bytes -> uint8 RGB (3, H, W).

JPEGs (recognised by their first bytes, not their name) go to torchcodec's decode_jpeg when
torchcodec is installed, else torchvision.io.decode_jpeg (both libjpeg-turbo; torchvision 0.29
deprecates its decoders in favour of torchcodec's). Everything else, and any JPEG they refuse
(truncated, 12-bit, arithmetic-coded ...), goes to PIL with ``convert("RGB")``: grayscale
replicated, alpha dropped, palette expanded, CMYK inverted as PIL does. Their output is
pixel-identical to PIL's on baseline, progressive, subsampled, grayscale and CMYK JPEGs
(tests/data/test_image_io.py checks it; `python benchmarks/decoders.py` measures them side by
side: docs/performance.md). Because a JPEG they refuse is retried with PIL, the errors for
broken files are PIL's, as they were before this module existed.

Readers catch :class:`DecodeError` (and FileNotFoundError) and raise their own error type
naming the file (ImageReadError, AnnotationError, VideoReadError), so messages stay theirs.
"""
from __future__ import annotations

import functools
import io
import os
import warnings

import numpy as np
import torch
from PIL import Image

DECODERS = ("auto", "pil", "torchvision", "torchcodec")
# torchvision 0.29 warns on every decode that its decoders are deprecated; densessl prefers
# torchcodec when it is installed and falls back knowingly, so the warning says nothing new.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
_JPEG_MAGIC = b"\xff\xd8\xff"


class DecodeError(ValueError):
    """Encoded data that could not be decoded; ``cause`` is the decoder's own exception."""

    def __init__(self, cause: BaseException):
        self.cause = cause
        super().__init__(f"{type(cause).__name__}: {cause}")


def decode_rgb(src: str | os.PathLike | bytes | bytearray | memoryview, decoder: str = "auto") -> torch.Tensor:
    """uint8 RGB tensor (3, H, W) of an image file or its encoded bytes.

    decoder: "auto" (torchcodec or torchvision for JPEG, PIL otherwise), "pil" (always PIL: the
    reference path), "torchvision" / "torchcodec" (that library for JPEG, PIL otherwise; for the
    benchmark).
    Raises FileNotFoundError for a missing file and DecodeError for anything undecodable.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r}; expected one of {', '.join(DECODERS)}")
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        with open(src, "rb") as f:  # FileNotFoundError (an OSError) propagates as it is
            data = f.read()
    if decoder != "pil" and data[:3] == _JPEG_MAGIC and _header_ok(data):
        image = _fast_jpeg(data, jpeg_decoder(None if decoder == "auto" else decoder))
        if image is not None:
            return image
    return _pil(data)


def encoded_hw(data: bytes) -> tuple[int, int] | None:
    """(H, W) from an encoded image's header (PIL reads only the header), or None if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            return h, w
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def fit_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """The readers' data.size rule: shorter side resized to `size` (bilinear, antialiased), centre
    `size` x `size` kept."""
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(TF.resize(image, size, antialias=True), [size, size])


@functools.lru_cache(maxsize=None)
def jpeg_decoder(name: str | None = None):
    """(name, decode_jpeg, RGB mode) of torchcodec if installed, else torchvision (or `name`)."""
    if name in (None, "torchcodec"):
        try:
            from torchcodec.decoders import ImageReadMode, decode_jpeg

            return "torchcodec", decode_jpeg, ImageReadMode.RGB
        except ImportError:
            if name == "torchcodec":
                raise
    import torchvision.io as tio

    return "torchvision", tio.decode_jpeg, tio.ImageReadMode.RGB


def _header_ok(data: bytes) -> bool:
    """PIL reads the header only (tens of microseconds): an image PIL calls a decompression bomb
    (over 2 x Image.MAX_IMAGE_PIXELS) or cannot even open is left to PIL, which raises as before
    this module; torchvision has no such limit and would allocate the whole frame."""
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def _fast_jpeg(data: bytes, decoder) -> torch.Tensor | None:
    """libjpeg-turbo through torchcodec / torchvision, or None where it refuses (PIL then
    decodes, or names the fault)."""
    _, decode_jpeg, rgb = decoder
    try:
        # contiguous (3, H, W), as PIL's path gives (decode_jpeg returns a permuted HWC buffer)
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=rgb).contiguous()
    except (RuntimeError, ValueError):
        return None


def _pil(data: bytes) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            array = np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DecodeError(err) from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
