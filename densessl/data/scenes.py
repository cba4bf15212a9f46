"""Fashion-Scenes: multi-object scenes composed from real Fashion-MNIST items.

Every scene is a pure function of ``(seed, split, index)``: it does not depend on access order,
on the worker that builds it, or on any other scene. Train and val scenes draw their items from
disjoint pools: a fixed seeded permutation of all item indices of the source, whose last 20 %
are the val pool (the pools depend only on the number of items, so they are the same for every
``seed`` and every dataset instance built on the same source).

A scene: a ``size`` x ``size`` canvas with a smooth random colour gradient, low-frequency colour
blobs, an optional mild texture (stripes, checks or grain) and pixel noise; then
``min_items..max_items`` items, each resized bilinearly to a side of ``item_scale`` times the
canvas, tinted with a random colour that stands out from what lies under it, shaded by the
item's intensity and alpha-blended with the intensity (times ``OPACITY_GAIN``, clipped) as
alpha. An item's mask is where its intensity exceeds ``MASK_THRESHOLD``; its visible mask is
that minus the pixels of items pasted after it. Occlusion is bounded: an item is pasted only where every
earlier item keeps at least ``min_visible`` of its pixels visible; otherwise another position
is tried (the item shrinks after every few failed tries) and, after ``MAX_TRIES``, the item is
dropped and a fresh item drawn in its place (at most as many replacements as items wanted).
The first item is always placed, so a scene has at least one item; with the defaults fewer than
the wanted number of items is rare (none in 2000 scenes of 4 items).
"""
from __future__ import annotations

import functools
import operator
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from densessl.data.fashion_mnist import CLASSES, FashionMNIST, load_fashion_mnist
from densessl.data.photos import make_photo_background

NUM_CLASSES = len(CLASSES)
SPLITS = {"train": 0, "val": 1}
POOL_SEED = 0x5CE7E5  # fixed: the train/val item pools never depend on the user's seed
VAL_FRACTION = 0.2
MASK_THRESHOLD = 0.2  # an item pixel belongs to its mask where its intensity (alpha) > this
MAX_TRIES = 30  # placements tried per item before it is dropped
SHRINK_EVERY = 10  # the item shrinks by SHRINK_FACTOR after this many failed placements
SHRINK_FACTOR = 0.85
MIN_CONTRAST = 0.2  # wanted luminance difference between an item's tint and what lies under it
MIN_COLOUR_DIST = 0.5  # wanted RGB distance between an item's tint and what lies under it
COLOUR_TRIES = 12
OPACITY_GAIN = 1.6  # blending alpha = min(1, intensity * OPACITY_GAIN)
SHADE_MIN = 0.55  # tint shading: colour * (SHADE_MIN + (1 - SHADE_MIN) * intensity)


def item_pools(num_items: int) -> dict[str, np.ndarray]:
    """Disjoint train/val pools of item indices in ``range(num_items)`` (fixed, seeded)."""
    if num_items < 2:
        raise ValueError(f"need at least 2 Fashion-MNIST items to split train/val, got {num_items}")
    perm = np.random.default_rng(POOL_SEED).permutation(num_items)
    n_val = max(1, int(round(num_items * VAL_FRACTION)))
    return {"train": perm[:-n_val].copy(), "val": perm[-n_val:].copy()}


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return SPLITS[split]


@functools.lru_cache(maxsize=32)
def _interp_matrix(size: int, k: int) -> np.ndarray:
    """(size, k) matrix that upsamples k control points linearly to size pixels."""
    pos = np.linspace(0.0, k - 1.0, size)
    left = np.minimum(np.floor(pos).astype(np.int64), k - 2)
    frac = (pos - left).astype(np.float32)
    w = np.zeros((size, k), np.float32)
    w[np.arange(size), left] = 1.0 - frac
    w[np.arange(size), left + 1] = frac
    return w


@functools.lru_cache(maxsize=8)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float32)
    return c[None, :].repeat(size, 0), c[:, None].repeat(size, 1)  # xx, yy in pixels


STYLES = ("textured", "uniform", "plain", "photo")

def make_styled_background(rng: np.random.Generator, size: int, style: str) -> np.ndarray:
    """The background of a scene of ``style``: ``textured`` (gradient, blobs, texture, noise),
    ``uniform`` (one random colour plus mild noise), ``plain`` (black) or ``photo`` (a crop of a
    natural photograph, see PHOTOS)."""
    if style == "textured":
        return make_background(rng, size)
    if style == "photo":
        return make_photo_background(rng, size)
    if style == "uniform":
        bg = np.empty((size, size, 3), np.float32)
        bg[:] = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        bg += 0.015 * rng.standard_normal((size, size, 1), dtype=np.float32)
        return np.clip(bg, 0.0, 1.0, out=bg)
    if style == "plain":
        return np.zeros((size, size, 3), np.float32)
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def make_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A varied float32 (size, size, 3) background in [0, 1]."""
    xx, yy = _coords(size)
    c0 = rng.uniform(0.0, 1.0, 3).astype(np.float32)
    c0 += (c0.mean() - c0) * np.float32(rng.uniform(0.0, 0.6))  # vary the saturation
    c1 = np.clip(c0 + rng.normal(0.0, 0.35, 3), 0.0, 1.0).astype(np.float32)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    t = xx * np.float32(np.cos(theta)) + yy * np.float32(np.sin(theta))
    t -= t.min()
    t /= max(float(t.max()), 1e-6)
    bg = c0 + (c1 - c0) * t[..., None]
    k = int(rng.integers(2, 6))
    w = _interp_matrix(size, k)
    blobs = rng.normal(0.0, 0.1, (k, k, 3)).astype(np.float32)
    bg += np.einsum("ik,klc,jl->ijc", w, blobs, w, optimize=True)
    texture = int(rng.integers(4))
    if texture == 1:  # stripes
        f = rng.uniform(3.0, 10.0) / size
        phi = rng.uniform(0.0, np.pi)
        ph = rng.uniform(0.0, 2.0 * np.pi)
        s = np.sin(2 * np.pi * f * (xx * np.cos(phi) + yy * np.sin(phi)) + ph)
        bg += (rng.uniform(0.03, 0.07) * s).astype(np.float32)[..., None]
    elif texture == 2:  # checks
        cell = int(rng.integers(max(2, size // 16), max(3, size // 5)))
        chk = ((xx // cell + yy // cell) % 2) * 2.0 - 1.0
        bg += (rng.uniform(0.02, 0.05) * chk).astype(np.float32)[..., None]
    sigma = 0.04 if texture == 3 else 0.015  # grain, or mild noise
    bg += sigma * rng.standard_normal((size, size, 1), dtype=np.float32)
    return np.clip(bg, 0.0, 1.0, out=bg)


_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _pick_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random RGB tint that stands out from the mean colour of ``under``.

    Candidates are drawn uniformly; the first whose RGB distance to the mean is at least
    ``MIN_COLOUR_DIST`` and whose luminance differs by at least ``MIN_CONTRAST`` is taken,
    else the best of ``COLOUR_TRIES`` candidates.
    """
    mean = under.reshape(-1, 3).mean(0)
    lum_under = float(mean @ _LUMA)
    best, best_c = -1.0, None
    for _ in range(COLOUR_TRIES):
        c = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        shaded = c * np.float32(0.85)  # typical shading of an item's interior
        score = min(
            float(np.linalg.norm(shaded - mean)) / MIN_COLOUR_DIST,
            abs(float(shaded @ _LUMA) - lum_under) / MIN_CONTRAST,
        )
        if score >= 1.0:
            return c
        if score > best:
            best, best_c = score, c
    return best_c


def _box_of(mask: np.ndarray) -> list[int]:
    """xyxy box of a non-empty bool mask; x2, y2 exclusive."""
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


class _FashionCanvas(Dataset):
    """Shared parts: Fashion-MNIST source, item pools, resizing and tinting."""

    _kind = 0  # stream tag, so scenes and single items never share random numbers

    def __init__(self, split: str, num: int, size: int, seed: int, root, style: str = "textured") -> None:
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        self.style = style
        self.split_id = _check_split(split)
        self.split = split
        if int(num) < 0:
            raise ValueError(f"number of samples must be >= 0, got {num}")
        if int(size) < 8:
            raise ValueError(f"size must be >= 8 pixels, got {size}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num = int(num)
        self.size = int(size)
        self.seed = int(seed)
        self.root = None if root is None else os.fspath(root)
        data = load_fashion_mnist(self.root)
        self._data: FashionMNIST | None = data
        self.source = data.source
        self.pool = item_pools(len(data))[split]

    # -- pickling: workers reload the arrays from the module cache, not from a pickle
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_data"] = None
        return state

    @property
    def data(self) -> FashionMNIST:
        if self._data is None:
            data = load_fashion_mnist(self.root)
            if data.source != self.source:
                raise RuntimeError(
                    f"Fashion-MNIST source changed from {self.source} to {data.source} "
                    "between the dataset's creation and its use in a worker"
                )
            self._data = data
        return self._data

    def __len__(self) -> int:
        return self.num

    def _index(self, i) -> int:
        i = operator.index(i)
        if i < 0:
            i += self.num
        if not 0 <= i < self.num:
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {self.num}")
        return i

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.split_id, i, self._kind])

    def _colour(self, rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
        """The item's tint: one that stands out from ``under``, or white in the plain style."""
        if self.style == "plain":
            return np.ones(3, np.float32)
        return _pick_colour(rng, under)

    def _alpha(self, item: int, side: int) -> np.ndarray:
        """Item intensity resized (bilinear) to side x side, float32 in [0, 1]."""
        img = Image.fromarray(self.data.images[item]).resize((side, side), Image.BILINEAR)
        return np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)

    @staticmethod
    def _paste(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, y: int, x: int) -> None:
        """Blend the tinted item onto the canvas with its intensity as alpha.

        The alpha is the intensity stretched by ``OPACITY_GAIN`` (so items occlude what lies
        behind them instead of looking translucent) and the tint is shaded by the intensity
        (so the item's own texture stays visible).
        """
        s = alpha.shape[0]
        a = alpha[..., None]
        opacity = np.minimum(a * OPACITY_GAIN, 1.0)
        region = canvas[y : y + s, x : x + s]
        region *= 1.0 - opacity
        region += opacity * (colour * (SHADE_MIN + (1.0 - SHADE_MIN) * a))

    @staticmethod
    def _to_image(canvas: np.ndarray) -> torch.Tensor:
        img = np.clip(canvas * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


class FashionScenes(_FashionCanvas):
    """Multi-object scenes of Fashion-MNIST items with boxes, masks and a semantic map.

    ``__getitem__(i)`` returns a dict: ``image`` uint8 (3,H,W); ``labels`` float32 (10,)
    multi-hot; ``boxes`` float32 (n,4) xyxy pixels of the visible masks (x2, y2 exclusive);
    ``classes`` int64 (n,); ``item_ids`` int64 (n,) Fashion-MNIST indices; and, with
    ``with_masks``, ``masks`` bool (n,H,W) visible instance masks and ``semantic`` int64 (H,W)
    (0 background, class + 1 on visible item pixels). Items are listed in paste order
    (back to front).
    """

    _kind = 0

    def __init__(
        self,
        split: str = "train",
        num_scenes: int = 10000,
        size: int = 64,
        min_items: int = 1,
        max_items: int = 4,
        seed: int = 0,
        root: str | os.PathLike | None = None,
        with_masks: bool = True,
        *,
        item_scale: tuple[float, float] = (0.35, 0.6),
        min_visible: float = 0.5,
        style: str = "textured",
    ) -> None:
        super().__init__(split, num_scenes, size, seed, root, style)
        if not 1 <= int(min_items) <= int(max_items):
            raise ValueError(
                f"need 1 <= min_items <= max_items, got min_items={min_items}, max_items={max_items}"
            )
        lo, hi = float(item_scale[0]), float(item_scale[1])
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"item_scale must satisfy 0 < lo <= hi <= 1, got {item_scale}")
        if not 0.0 <= min_visible <= 1.0:
            raise ValueError(f"min_visible must lie in [0, 1], got {min_visible}")
        self.min_items = int(min_items)
        self.max_items = int(max_items)
        self.with_masks = bool(with_masks)
        self.item_scale = (lo, hi)
        self.min_visible = float(min_visible)

    def generate(self, i: int) -> dict[str, np.ndarray]:
        """Scene ``i`` as numpy arrays: ``image`` (H,W,3) uint8, ``masks`` (n,H,W) visible
        masks, ``full_masks`` (n,H,W) masks as pasted (before later items covered them),
        ``classes`` and ``item_ids`` (n,)."""
        i = self._index(i)
        rng = self._rng(i)
        S = self.size
        canvas = make_styled_background(rng, S, self.style)
        min_side = max(4, int(round(0.2 * S)))
        vis: list[np.ndarray] = []  # visible masks, full canvas
        full: list[np.ndarray] = []  # masks as pasted, before later items covered them
        vis_counts: list[int] = []
        full_counts: list[int] = []
        ids: list[int] = []
        n = int(rng.integers(self.min_items, self.max_items + 1))
        for _ in range(2 * n):  # a dropped item is replaced by a fresh one, up to n times
            if len(ids) == n:
                break
            item = int(self.pool[rng.integers(len(self.pool))])
            side = int(round(rng.uniform(*self.item_scale) * S))
            side = min(max(side, min_side), S)
            alpha = self._alpha(item, side)
            mask = alpha > MASK_THRESHOLD
            placed = None
            for attempt in range(MAX_TRIES):
                if attempt and attempt % SHRINK_EVERY == 0 and side > min_side:
                    side = max(min_side, int(side * SHRINK_FACTOR))
                    alpha = self._alpha(item, side)
                    mask = alpha > MASK_THRESHOLD
                y = int(rng.integers(0, S - side + 1))
                x = int(rng.integers(0, S - side + 1))
                overlaps = [
                    int(np.count_nonzero(v[y : y + side, x : x + side] & mask)) for v in vis
                ]
                if all(  # every earlier item keeps >= min_visible of its pixels, and at least one
                    c - o >= max(1.0, self.min_visible * f)
                    for c, o, f in zip(vis_counts, overlaps, full_counts)
                ):
                    placed = (y, x, overlaps)
                    break
            count = int(np.count_nonzero(mask))
            if placed is None or count == 0:
                continue  # dropped: no placement keeps the earlier items visible enough
            y, x, overlaps = placed
            for k, v in enumerate(vis):
                v[y : y + side, x : x + side] &= ~mask
                vis_counts[k] -= overlaps[k]
            m = np.zeros((S, S), bool)
            m[y : y + side, x : x + side] = mask
            vis.append(m)
            full.append(m.copy())
            vis_counts.append(count)
            full_counts.append(count)
            ids.append(item)
            colour = self._colour(rng, canvas[y : y + side, x : x + side])
            self._paste(canvas, alpha, colour, y, x)
        image = np.clip(canvas * 255.0 + 0.5, 0, 255).astype(np.uint8)
        ids_arr = np.asarray(ids, np.int64)
        return {
            "image": image,
            "masks": np.stack(vis) if vis else np.zeros((0, S, S), bool),
            "full_masks": np.stack(full) if full else np.zeros((0, S, S), bool),
            "classes": self.data.labels[ids_arr].astype(np.int64),
            "item_ids": ids_arr,
        }

    def __getitem__(self, i) -> dict[str, torch.Tensor]:
        g = self.generate(i)
        masks, classes = g["masks"], g["classes"]
        boxes = np.asarray([_box_of(m) for m in masks], np.float32).reshape(-1, 4)
        labels = np.zeros(NUM_CLASSES, np.float32)
        labels[classes] = 1.0
        out = {
            "image": torch.from_numpy(np.ascontiguousarray(g["image"].transpose(2, 0, 1))),
            "labels": torch.from_numpy(labels),
            "boxes": torch.from_numpy(boxes),
            "classes": torch.from_numpy(classes),
            "item_ids": torch.from_numpy(g["item_ids"]),
        }
        if self.with_masks:
            semantic = np.zeros((self.size, self.size), np.int64)
            for m, c in zip(masks, classes):
                semantic[m] = c + 1
            out["masks"] = torch.from_numpy(masks)
            out["semantic"] = torch.from_numpy(semantic)
        return out

    def __repr__(self) -> str:
        return (
            f"FashionScenes(split={self.split!r}, num_scenes={self.num}, size={self.size}, "
            f"items={self.min_items}..{self.max_items}, seed={self.seed}, source={self.source!r})"
        )


class FashionItems(_FashionCanvas):
    """One Fashion-MNIST item per image, on the same backgrounds as :class:`FashionScenes`.

    For single-label kNN and linear probes. Sample ``i`` shows item ``pool[i % len(pool)]`` of
    the split's pool (the same disjoint train/val pools as FashionScenes), so by default
    (``num_samples=None``) every item of the pool appears exactly once. Returns
    ``{"image": uint8 (3,H,W), "label": int64 scalar}``.
    """

    _kind = 1

    def __init__(
        self,
        split: str = "train",
        num_samples: int | None = None,
        size: int = 64,
        seed: int = 0,
        root: str | os.PathLike | None = None,
        *,
        item_scale: tuple[float, float] = (0.6, 0.85),
        jitter: float = 0.1,
        style: str = "textured",
    ) -> None:
        super().__init__(split, 0 if num_samples is None else num_samples, size, seed, root, style)
        if num_samples is None:
            self.num = len(self.pool)
        lo, hi = float(item_scale[0]), float(item_scale[1])
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"item_scale must satisfy 0 < lo <= hi <= 1, got {item_scale}")
        self.item_scale = (lo, hi)
        self.jitter = float(jitter)

    def item_id(self, i) -> int:
        return int(self.pool[self._index(i) % len(self.pool)])

    def __getitem__(self, i) -> dict[str, torch.Tensor]:
        i = self._index(i)
        item = int(self.pool[i % len(self.pool)])
        rng = self._rng(i)
        S = self.size
        canvas = make_styled_background(rng, S, self.style)
        side = min(S, max(4, int(round(rng.uniform(*self.item_scale) * S))))
        free = S - side
        jit = self.jitter * S
        y = int(np.clip(round(free / 2 + rng.uniform(-jit, jit)), 0, free))
        x = int(np.clip(round(free / 2 + rng.uniform(-jit, jit)), 0, free))
        alpha = self._alpha(item, side)
        colour = self._colour(rng, canvas[y : y + side, x : x + side])
        self._paste(canvas, alpha, colour, y, x)
        return {
            "image": self._to_image(canvas),
            "label": torch.tensor(int(self.data.labels[item]), dtype=torch.int64),
        }

    def __repr__(self) -> str:
        return (
            f"FashionItems(split={self.split!r}, num_samples={self.num}, size={self.size}, "
            f"seed={self.seed}, source={self.source!r})"
        )
