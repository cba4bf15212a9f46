"""CPU view sampling with geometry records, resumable data order, and collation.

Every view carries its Geometry: the crop box in the source image in normalised coordinates
(x0, y0, x1, y1 in [0, 1]), whether it was flipped, and its output size. Methods that need
correspondences (PixPro, SCRL, SS-PRL) derive them from these records only.

Randomness is a pure function of (seed, epoch, index): a view of sample i in epoch e is the
same whichever worker draws it and whether or not the run was resumed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision.transforms.v2 import functional as TF

from densessl.config import ViewConfig


@dataclass
class Geometry:
    box: tuple[float, float, float, float]  # crop in the source image, normalised x0, y0, x1, y1
    flip: bool
    size: tuple[int, int]  # output (h, w)


def sample_crop(rng: np.random.Generator, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w) in pixels; the same rule as torchvision's."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the central crop with the ratio clamped into range (as torchvision does).
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_view(image: torch.Tensor, top: int, left: int, h: int, w: int, flip: bool, size: int) -> tuple[torch.Tensor, Geometry]:
    """Crop a uint8 (3,H,W) image, resize to size x size (bilinear, antialiased), maybe flip."""
    H, W = image.shape[-2:]
    view = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    if flip:
        view = view.flip(-1)
    return view, Crop(top, left, h, w, flip, size).geometry(H, W)


@dataclass(frozen=True)
class Crop:
    """One view's crop of an H x W image, in pixels, before it is cut (data.decode_on=device)."""
    top: int
    left: int
    h: int
    w: int
    flip: bool
    size: int

    def geometry(self, H: int, W: int) -> Geometry:
        return Geometry(box=(self.left / W, self.top / H, (self.left + self.w) / W, (self.top + self.h) / H),
                        flip=self.flip, size=(self.size, self.size))


def slots_per_group(g: ViewConfig) -> int:
    """View slots a group emits: `count` crops, or count * grid**2 patches for a grid group."""
    return g.count * g.grid * g.grid if g.grid > 0 else g.count


def expand_slots(groups: list[ViewConfig]) -> list[ViewConfig]:
    """The ViewConfig of every view slot, in slot order (a grid group repeats per patch)."""
    return [g for g in groups for _ in range(slots_per_group(g))]


def check_grid_group(g: ViewConfig, where: str = "views") -> None:
    if g.grid < 0 or g.region_size < 0:
        raise ValueError(f"{where}: grid={g.grid} and region_size={g.region_size} must be >= 0")
    if g.grid > 0:
        side = g.region_size or g.grid * g.size
        if side // g.grid < g.size:
            raise ValueError(f"{where}: region_size={side} cut into {g.grid}x{g.grid} cells gives cells of "
                             f"{side // g.grid} px, smaller than the patch size {g.size}; "
                             f"use region_size >= {g.grid * g.size}")


def grid_patches(image: torch.Tensor, rng: np.random.Generator, g: ViewConfig) -> tuple[list[torch.Tensor], list[Geometry]]:
    """SS-PRL's pyramid level: one region, resized to L x L, cut into grid x grid cells of
    floor(L / grid) px (the remainder on the right and bottom is dropped); every cell gives
    `count` patches, each a random size x size crop inside the cell, flipped with flip_p.

    Slots are view-major: patch view 0 of every cell (row-major), then patch view 1, ...;
    so slot v * grid**2 + k of every view v shows cell k. Boxes are in source coordinates.
    """
    H, W = image.shape[-2:]
    top, left, h, w = sample_crop(rng, H, W, g.scale, g.ratio)
    side = g.region_size or g.grid * g.size
    region = TF.resized_crop(image, top, left, h, w, [side, side], antialias=True)
    cell, P = side // g.grid, g.size
    sx, sy = w / side, h / side  # region pixels -> source pixels
    views, geoms = [], []
    for _ in range(g.count):
        for r in range(g.grid):
            for c in range(g.grid):
                y0 = r * cell + int(rng.integers(0, cell - P + 1))
                x0 = c * cell + int(rng.integers(0, cell - P + 1))
                flip = bool(rng.random() < g.flip_p)
                patch = region[:, y0:y0 + P, x0:x0 + P]
                views.append(patch.flip(-1) if flip else patch.clone())
                box = ((left + x0 * sx) / W, (top + y0 * sy) / H, (left + (x0 + P) * sx) / W, (top + (y0 + P) * sy) / H)
                geoms.append(Geometry(box=box, flip=flip, size=(P, P)))
    return views, geoms


class ViewSampler:
    """Draws the views of one image from a list of ViewConfig groups (count crops each;
    grid groups give count * grid**2 pyramid patches, see `grid_patches`)."""

    def __init__(self, groups: list[ViewConfig]):
        self.groups = groups
        for i, g in enumerate(groups):
            check_grid_group(g, f"views[{i}]")

    def draw(self, H: int, W: int, rng: np.random.Generator) -> list[Crop]:
        """The crops `__call__` would cut from an H x W image with the same `rng` (crop groups only)."""
        crops = []
        for i, g in enumerate(self.groups):
            if g.grid > 0:
                raise ValueError(f"views[{i}] is a pyramid grid (grid={g.grid}): its patches are cut on the loader "
                                 f"workers; set data.decode_on=workers")
            for _ in range(g.count):
                top, left, h, w = sample_crop(rng, H, W, g.scale, g.ratio)
                crops.append(Crop(top, left, h, w, bool(rng.random() < g.flip_p), g.size))
        return crops

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> tuple[list[torch.Tensor], list[Geometry]]:
        H, W = image.shape[-2:]
        views, geoms = [], []
        for g in self.groups:
            if g.grid > 0:
                v, geo = grid_patches(image, rng, g)
                views += v
                geoms += geo
                continue
            for _ in range(g.count):
                top, left, h, w = sample_crop(rng, H, W, g.scale, g.ratio)
                flip = bool(rng.random() < g.flip_p)
                v, geo = crop_view(image, top, left, h, w, flip, g.size)
                views.append(v)
                geoms.append(geo)
        return views, geoms


class ViewDataset(Dataset):
    """Wraps a dataset of {"image": uint8 (3,H,W), ...}; indexed by (epoch, index) pairs."""

    def __init__(self, base: Dataset, sampler: ViewSampler, seed: int):
        self.base, self.sampler, self.seed = base, sampler, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        sample = self.base[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        views, geoms = self.sampler(sample["image"], rng)
        H, W = sample["image"].shape[-2:]
        out = {"views": views, "geometry": geoms, "index": index, "source_size": (W, H)}
        for k in ("labels", "label"):  # targets for the online probe, when the dataset has them
            if k in sample:
                out[k] = sample[k]
        return out


def collate_views(samples: list[dict]) -> dict:
    """uint8 views stacked per view slot; geometry as tensors: box (B,4), flip (B,), and the
    source images' source_size (B, 2) = (W, H)."""
    n_views = len(samples[0]["geometry"])
    batch = {
        "box": [torch.tensor([s["geometry"][v].box for s in samples], dtype=torch.float32) for v in range(n_views)],
        "flip": [torch.tensor([s["geometry"][v].flip for s in samples]) for v in range(n_views)],
        "index": torch.tensor([s["index"] for s in samples]),
    }
    if "views" in samples[0]:  # absent for data.decode_on=device: cut after decoding (data/device_decode.py)
        batch["views"] = [torch.stack([s["views"][v] for s in samples]) for v in range(n_views)]
    if "source_size" in samples[0]:  # (B, 2) = (W, H): pixel units of the boxes (PixPro's crop_coords=code)
        batch["source_size"] = torch.stack([torch.as_tensor(s["source_size"], dtype=torch.float32) for s in samples])
    for k in ("labels", "label"):
        if k in samples[0]:
            batch[k] = torch.stack([torch.as_tensor(s[k]) for s in samples])
    return batch


class ResumableBatchSampler(Sampler):
    """Global batches from a per-epoch seeded order; each rank takes its slice.

    Yields lists of (epoch, index). Starting at `start_step` skips exactly the batches a
    killed run had already consumed, so a resumed run sees the same data order.

    Without `shard_sizes` the order is a permutation of all n indices (n int64 per rank). With
    `shard_sizes` (samples per shard; shard k holds the indices after those of shards < k, as in
    ShardDataset) it is shard-aware: a permutation of the shards, and within each shard a
    permutation of its samples, each drawn from its own seed, so memory is O(number of shards +
    shard size) and a resume jumps to its position without replaying the epoch. Either way a
    pass covers every index once; steps_per_epoch beyond one pass starts a new pass (new seeds).
    """

    def __init__(self, n: int, global_batch: int, steps_per_epoch: int, seed: int, epoch: int,
                 start_step: int = 0, rank: int = 0, world_size: int = 1, shard_sizes=None):
        if global_batch % world_size:
            raise ValueError(f"train.batch_size={global_batch} must be divisible by the world size {world_size}")
        if steps_per_epoch * global_batch > n and n < global_batch:
            raise ValueError(f"dataset has {n} samples, fewer than one global batch of {global_batch}")
        self.n, self.global_batch, self.steps = n, global_batch, steps_per_epoch
        self.seed, self.epoch, self.start_step = seed, epoch, start_step
        self.rank, self.world_size = rank, world_size
        self.shard_sizes = None
        if shard_sizes is not None:
            self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
            if int(self.shard_sizes.sum()) != n or (self.shard_sizes < 1).any():
                raise ValueError(f"shard_sizes add up to {int(self.shard_sizes.sum())} samples (each >= 1 expected), "
                                 f"not the dataset's {n}")

    def __len__(self):
        return self.steps - self.start_step

    def __iter__(self):
        per_rank = self.global_batch // self.world_size
        lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank
        if self.shard_sizes is not None:
            pending, have = [], 0  # index arrays of the global batch being filled
            for part in self._shard_stream(self.start_step * self.global_batch, self.steps * self.global_batch):
                while len(part):
                    take = part[:self.global_batch - have]
                    pending.append(take)
                    have += len(take)
                    part = part[len(take):]
                    if have == self.global_batch:
                        yield [(self.epoch, int(i)) for i in np.concatenate(pending)[lo:hi]]
                        pending, have = [], 0
            return
        needed = self.steps * self.global_batch
        rng = np.random.default_rng([self.seed, self.epoch, 7])
        # Enough permutations to cover steps_per_epoch (which may exceed one pass).
        order = np.concatenate([rng.permutation(self.n) for _ in range(-(-needed // self.n))])
        for step in range(self.start_step, self.steps):
            chunk = order[step * self.global_batch:(step + 1) * self.global_batch]
            mine = chunk[lo:hi]
            yield [(self.epoch, int(i)) for i in mine]

    def _shard_stream(self, start: int, stop: int):
        """Arrays of the indices at positions start..stop-1 of the epoch's shard-aware order."""
        sizes = self.shard_sizes
        first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        pos = start
        while pos < stop:
            rnd, offset = divmod(pos, self.n)  # pass `rnd` of the epoch, `offset` into it
            shards = np.random.default_rng([self.seed, self.epoch, 7, rnd]).permutation(len(sizes))
            ends = np.cumsum(sizes[shards])
            j = int(np.searchsorted(ends, offset, side="right"))
            while j < len(shards) and pos < stop:
                s = int(shards[j])
                within = np.random.default_rng([self.seed, self.epoch, 7, rnd, s]).permutation(int(sizes[s]))
                k = offset - int(ends[j] - sizes[s])
                part = first[s] + within[k:k + (stop - pos)]
                yield part
                pos += len(part)
                offset += len(part)
                j += 1

