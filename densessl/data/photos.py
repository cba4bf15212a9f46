"""Natural photographs as scene backgrounds (`data.style=photo`): crops of scikit-image's samples."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

# Natural photographs shipped with scikit-image (skimage/data, public domain or CC0; see its
# README): the backgrounds of the `photo` style, a distribution the small recipes were not tuned on.
PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
          "gravel.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")
PHOTO_SIDE = 256  # photos are kept at this shorter side; crops take 1/4 to all of it


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[np.ndarray, ...]:
    """The PHOTOS as float32 (H, W, 3) arrays in [0, 1], shorter side PHOTO_SIDE (read once per process).

    Read from scikit-image's data folder without importing scikit-image itself (slow to import)."""
    import importlib.util

    from densessl.config import ConfigError

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.style=photo needs the Python package 'scikit-image' (its sample photographs), "
                          "which is not installed; pip install 'densessl[photos]'")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    photos = []
    for name in PHOTOS:
        with Image.open(folder / name) as im:
            im = im.convert("RGB")
            scale = PHOTO_SIDE / min(im.size)
            im = im.resize((max(PHOTO_SIDE, round(im.width * scale)), max(PHOTO_SIDE, round(im.height * scale))),
                           Image.BILINEAR)
            photos.append(np.asarray(im, dtype=np.float32) * np.float32(1.0 / 255.0))
    return tuple(photos)


def make_photo_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop (1/4 to all of the shorter side, random position and flip) of a random
    photograph, resized (bilinear) to size x size."""
    photos = load_photos()
    photo = photos[int(rng.integers(len(photos)))]
    H, W = photo.shape[:2]
    side = int(round(rng.uniform(0.25, 1.0) * min(H, W)))
    y, x = int(rng.integers(0, H - side + 1)), int(rng.integers(0, W - side + 1))
    crop = photo[y:y + side, x:x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    img = Image.fromarray(np.clip(crop * 255.0 + 0.5, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
