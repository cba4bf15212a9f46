"""Datasets by name, from the `data:` section of a config."""
from __future__ import annotations


def build_dataset(data_cfg, split: str = "train", with_masks: bool = False, single_item: bool = False, num=None,
                  method_cfg=None):
    """fashion_scenes (built in), imagefolder (data.root), shards (data.root), or the video sources moving_scenes /
    video_frames (their frame settings live in the method's `video:` section). `num` overrides
    data.num_scenes."""
    video_method = getattr(method_cfg, "video", None) is not None
    if data_cfg.dataset in ("moving_scenes", "video_frames") or (data_cfg.dataset == "shards" and video_method):
        from densessl.data.video import build_video_source

        video_cfg = getattr(method_cfg, "video", None)
        if video_cfg is None:
            raise ValueError(f"data.dataset={data_cfg.dataset} needs a video method (method.name=pixpro_video) "
                             f"whose `video:` section says how to sample frames")
        return build_video_source(data_cfg, video_cfg, split)
    if data_cfg.dataset == "fashion_scenes":
        from densessl.data.scenes import FashionItems, FashionScenes

        n = num if num is not None else data_cfg.num_scenes
        if single_item:
            return FashionItems(split=split, num_samples=n, size=data_cfg.size, seed=data_cfg.seed,
                                root=data_cfg.root, style=data_cfg.style)
        return FashionScenes(split=split, num_scenes=n, size=data_cfg.size, seed=data_cfg.seed,
                             root=data_cfg.root, with_masks=with_masks, style=data_cfg.style)
    if data_cfg.dataset == "imagefolder":
        from densessl.config import ConfigError
        from densessl.data.imagefolder import ImageFolder

        if not data_cfg.root:
            raise ConfigError("data.dataset=imagefolder needs data.root=<folder of images>")
        if data_cfg.on_error not in ("raise", "skip"):
            raise ConfigError(f"data.on_error={data_cfg.on_error!r}; expected raise or skip")
        if data_cfg.min_side < 1:
            raise ConfigError(f"data.min_side={data_cfg.min_side}; expected a side in px >= 1 (1: no check)")
        try:
            return ImageFolder(data_cfg.root, on_error=data_cfg.on_error, size=data_cfg.size,
                               min_side=data_cfg.min_side)
        except FileNotFoundError as e:  # no such folder, or no usable image in it
            raise ConfigError(f"data.root={data_cfg.root}: {e}") from None
    if data_cfg.dataset == "shards":  # a folder written by `densessl data shard` (densessl/data/shards.py)
        from densessl.config import ConfigError
        from densessl.data.shards import ShardDataset

        if not data_cfg.root:
            raise ConfigError("data.dataset=shards needs data.root=<folder written by densessl data shard>")
        return ShardDataset(data_cfg.root, size=data_cfg.size, min_side=data_cfg.min_side)
    raise ValueError(f"data.dataset={data_cfg.dataset!r}; expected fashion_scenes, imagefolder, shards, "
                     f"moving_scenes or video_frames")
