"""densessl.data.image_io: one decoder for every reader, pixel-identical to PIL."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from densessl.data.image_io import DecodeError, decode_rgb, jpeg_decoder


def encoded(mode: str, fmt: str = "JPEG", **kw) -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((45, 38), Image.BICUBIC).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


CASES = [("RGB", "JPEG", {"quality": 95}), ("RGB", "JPEG", {"quality": 70, "subsampling": 2}),
         ("RGB", "JPEG", {"quality": 90, "progressive": True}), ("L", "JPEG", {}), ("CMYK", "JPEG", {}),
         ("RGBA", "PNG", {}), ("P", "PNG", {}), ("L", "PNG", {})]


@pytest.mark.parametrize("mode,fmt,kw", CASES)
def test_every_decoder_gives_pils_pixels(mode, fmt, kw, tmp_path):
    data = encoded(mode, fmt, **kw)
    want = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    for decoder in ("auto", "pil", "torchvision", *(("torchcodec",) if has_torchcodec() else ())):
        for src in (data, path):
            got = decode_rgb(src, decoder)
            assert got.dtype == torch.uint8 and got.shape == (3, 38, 45) and got.is_contiguous()
            assert torch.equal(got, want), (decoder, type(src))


def test_a_jpeg_is_sent_to_the_fast_decoder(monkeypatch):
    """Not to PIL: the libjpeg-turbo path is what runs (counted through a spy)."""
    import densessl.data.image_io as image_io

    calls = []
    real = image_io._fast_jpeg
    monkeypatch.setattr(image_io, "_fast_jpeg", lambda data, dec: calls.append(dec[0]) or real(data, dec))
    decode_rgb(encoded("RGB"))
    decode_rgb(encoded("RGB", "PNG"))
    assert calls == [jpeg_decoder()[0]]


def test_broken_files_fail_with_pils_own_error(tmp_path):
    data = encoded("RGB")
    with pytest.raises(DecodeError, match="(?i)truncated") as err:
        decode_rgb(data[: len(data) // 2])
    assert isinstance(err.value.cause, OSError)
    with pytest.raises(DecodeError, match="cannot identify image file"):
        decode_rgb(b"\xff\xd8\xffnot a jpeg at all")
    with pytest.raises(FileNotFoundError):
        decode_rgb(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="decoder='x'"):
        decode_rgb(data, "x")


def has_torchcodec() -> bool:
    try:
        import torchcodec.decoders  # noqa: F401
    except ImportError:
        return False
    return True
