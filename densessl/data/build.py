"""Datasets by name, from the `data:` section of a config."""
from __future__ import annotations


def build_dataset(data_cfg, split: str = "train", with_masks: bool = False, single_item: bool = False, num=None):
    """fashion_scenes (built in) or imagefolder (data.root). `num` overrides data.num_scenes."""
    if data_cfg.dataset == "fashion_scenes":
        from densessl.data.scenes import FashionItems, FashionScenes

        n = num if num is not None else data_cfg.num_scenes
        if single_item:
            return FashionItems(split=split, num_samples=n, size=data_cfg.size, seed=data_cfg.seed, root=data_cfg.root)
        return FashionScenes(split=split, num_scenes=n, size=data_cfg.size, seed=data_cfg.seed,
                             root=data_cfg.root, with_masks=with_masks)
    if data_cfg.dataset == "imagefolder":
        from densessl.data.imagefolder import ImageFolder

        if not data_cfg.root:
            raise ValueError("data.dataset=imagefolder needs data.root=<folder of images>")
        return ImageFolder(data_cfg.root, on_error=data_cfg.on_error, size=data_cfg.size)
    raise ValueError(f"data.dataset={data_cfg.dataset!r}; expected fashion_scenes or imagefolder")
