"""`densessl bench views`: view generation from JPEG files, densessl's uint8 sampler + batched device
augmentation beside a seed-style per-image PIL/torchvision pipeline (densessl/bench.py: the runner)."""
from __future__ import annotations

import torch

from densessl.bench import Result, interleaved

MULTICROP = [(224, 2, (0.14, 1.0)), (96, 6, (0.05, 0.14))]  # SwAV's 2x224 + 6x96
BYOL_VIEWS = [(224, 2, (0.08, 1.0))]
# SS-PRL's script: SwAV's crops, then per level one RandomResizedCrop region (314 / 383 px, scale
# (0.6, 1)) cut into a 2x2 / 3x3 grid, two views of every cell as 112 / 96 px patches: 34 per image
# (size, count, scale, grid, region_size)
PYRAMID = [(112, 2, (0.6, 1.0), 2, 314), (96, 2, (0.6, 1.0), 3, 383)]


def write_jpegs(folder, n: int = 64, size: int = 256) -> list:
    """n synthetic-content JPEGs (Fashion-Scenes upscaled) to decode in the benchmark."""
    from pathlib import Path

    from PIL import Image

    from densessl.data.scenes import FashionScenes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ds = FashionScenes(num_scenes=n, size=size, with_masks=False)
    paths = []
    for i in range(n):
        p = folder / f"{i:04d}.jpg"
        if not p.exists():
            Image.fromarray(ds[i]["image"].permute(1, 2, 0).numpy()).save(p, quality=90)
        paths.append(p)
    return paths


def seed_style_views(paths, crops, pyramid=()):
    """Per image, per view: PIL decode, RandomResizedCrop, flip, ColorJitter, grayscale, blur,
    solarize, ToTensor, Normalize: what the seed repositories do in their datasets. `pyramid`
    levels follow SS-PRL's dataset: one region per level, cut into cells, every cell's patch
    augmented on its own."""
    from PIL import Image
    from torchvision import transforms as T

    def pipeline(size, scale):
        return T.Compose([
            T.RandomResizedCrop(size, scale=scale), T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(max(3, round(23 / 224 * size) | 1), (0.1, 2.0))], p=0.5),
            T.RandomSolarize(128, p=0.2),
            T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def patch_pipeline(size):  # inside a cell: RandomCrop, flip, colour, blur (the official order)
        return T.Compose([
            T.RandomCrop(size), T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(max(3, round(23 / 224 * size) | 1), (0.1, 2.0))], p=0.5),
            T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    pipes = [(pipeline(s, sc), c) for s, c, sc in crops]
    levels = [(T.RandomResizedCrop(region, scale=sc), patch_pipeline(size), count, grid)
              for size, count, sc, grid, region in pyramid]
    n_slots = sum(c for _, c in pipes) + sum(c * g * g for _, _, c, g in levels)

    def run():
        out = [[] for _ in range(n_slots)]
        for p in paths:
            img = Image.open(p).convert("RGB")
            k = 0
            for pipe, count in pipes:
                for _ in range(count):
                    out[k].append(pipe(img))
                    k += 1
            for region_crop, patch, count, grid in levels:
                region = region_crop(img)
                cell = region.width // grid
                cells = [region.crop((c * cell, r * cell, (c + 1) * cell, (r + 1) * cell))
                         for c in range(grid) for r in range(grid)]
                for _ in range(count):
                    for c in cells:
                        out[k].append(patch(c))
                        k += 1
        return [torch.stack(v) for v in out]

    return run


def densessl_views(paths, crops, pyramid=()):
    """densessl: decode to uint8, crop+resize uint8 per image, then batched augmentation."""
    import numpy as np
    from torchvision.io import decode_jpeg, read_file

    from densessl.config import ViewConfig
    from densessl.data.augment import augment_batch
    from densessl.data.views import ViewSampler

    groups = [ViewConfig(size=s, count=c, scale=sc, blur_p=0.5, solarize_p=0.2, blur_kernel_frac=23 / 224)
              for s, c, sc in crops]
    groups += [ViewConfig(size=s, count=c, scale=sc, grid=g, region_size=r, blur_p=0.5, solarize_p=0.0,
                          blur_kernel_frac=23 / 224) for s, c, sc, g, r in pyramid]
    sampler = ViewSampler(groups)
    step = [0]

    def run():
        rng = np.random.default_rng(step[0])
        per_image = [sampler(decode_jpeg(read_file(str(p))), rng)[0] for p in paths]
        slots = [torch.stack([views[k] for views in per_image]) for k in range(len(per_image[0]))]
        out = augment_batch(slots, groups, seed=0, step=step[0], device="cpu", channels_last=False)
        step[0] += 1
        return out

    return run


def bench_views(folder, n=64, rounds=5) -> dict[str, list[Result]]:
    paths = write_jpegs(folder, n)
    results = {}
    for label, crops, pyramid in (("BYOL 2x224", BYOL_VIEWS, ()), ("multi-crop 2x224+6x96", MULTICROP, ()),
                                  ("SS-PRL pyramid (34 tensors)", MULTICROP, PYRAMID)):
        results[label] = interleaved({"seed-style PIL per image": seed_style_views(paths, crops, pyramid),
                                      "densessl": densessl_views(paths, crops, pyramid)}, rounds, n, warmup=1)
    return results
