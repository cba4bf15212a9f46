"""Shared parts of the transfer protocols (detection, segmentation, VOC/COCO multi-label).

(Backbones come from the one loader of every protocol, :func:`densessl.eval.backbone.load_backbone`.)

- :class:`TransferData`: where the data comes from (``fashion_scenes`` | ``voc`` | ``coco``)
  and :func:`build_task_dataset`, which gives items with the same keys whatever the source.
- :func:`transfer_config`: a config dataclass from ``preset=NAME`` plus ``key=value``
  overrides (the preset's values first, the user's on top), unknown keys refused. Presets are
  YAML files, ``densessl/eval/presets/<protocol>-<name>.yaml``, checked against the protocol's
  dataclass by the recipes' loader (:func:`densessl.config.from_dict`) when they are read.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from omegaconf import OmegaConf

from densessl.config import ConfigError, apply_overrides, from_dict, load_yaml_tree, to_dict

TASKS = ("detection", "segmentation", "multilabel")
PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass
class TransferData:
    dataset: str = "fashion_scenes"  # fashion_scenes | voc | coco | moving_scenes (frames, segmentation)
    root: Optional[str] = None  # voc: the VOC2007-style folder; coco: the COCO folder; scenes: Fashion-MNIST folder
    extra_roots: list[str] = field(default_factory=list)  # voc: more roots for training (VOC07+12: [VOC2012])
    train_split: str = "train"
    val_split: str = "val"
    num_train: int = 2000  # fashion_scenes only
    num_val: int = 500  # fashion_scenes only
    size: int = 64  # fashion_scenes canvas side
    seed: int = 0  # fashion_scenes scene seed
    num_workers: int = 0
    # voc: the class names in label order; null: labels.txt in data.root, else the names in its
    # Annotations/*.xml (sorted; the 20 VOC classes when all are VOC's) -- see densessl/data/voc.py
    classes: Optional[list[str]] = None


def preset_names(protocol: str) -> list[str]:
    """The presets of `protocol` (detection, segmentation, dense, multilabel) in PRESETS_DIR."""
    return sorted(p.stem[len(protocol) + 1:] for p in PRESETS_DIR.glob(f"{protocol}-*.yaml"))


def load_preset(cls, protocol: str, name: str) -> dict:
    """The keys of preset `name` of `protocol`, checked against `cls` (unknown keys and wrong
    types are refused, naming the file)."""
    path = PRESETS_DIR / f"{protocol}-{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(preset_names(protocol))} (preset=NAME)")
    tree = load_yaml_tree(path)
    try:
        from_dict(cls, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return tree


def with_preset(tree: dict, preset: dict) -> dict:
    """`tree` with the preset's keys merged over it (lists replaced whole)."""
    return OmegaConf.to_container(OmegaConf.merge(tree, preset))


def transfer_config(cls, protocol: str, overrides: list[str]):
    """``cls`` built from its defaults, then the preset ``protocol-NAME`` (if ``preset=NAME`` is
    given), then the other overrides. The chosen preset name is kept in ``cfg.preset``."""
    preset = None
    rest = []
    for o in overrides:
        key, sep, value = o.partition("=")
        if key.strip() == "preset" and sep:
            preset = value.strip()
        else:
            rest.append(o)
    tree = to_dict(cls())
    if preset is not None:
        tree = with_preset(tree, load_preset(cls, protocol, preset))
        tree["preset"] = preset
    return from_dict(cls, apply_overrides(tree, rest))


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ConfigError(f"precision={precision!r}; expected fp32, bf16 or fp16")
    return torch.autocast(device_type=device.type, dtype=dtype)


class _TaskView(Dataset):
    """Items of a source dataset mapped to the task's keys (see build_task_dataset)."""

    def __init__(self, source, task: str, kind: str):
        self.source, self.task, self.kind = source, task, kind

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        s = self.source[i]
        if self.task == "segmentation":
            return {"image": s["image"], "mask": s["mask"] if "mask" in s else s["semantic"]}
        if self.task == "multilabel":
            n = s["labels"].shape[0]
            ignore = s["labels_difficult"] if self.kind == "voc" else torch.zeros(n, dtype=torch.bool)
            return {"image": s["image"], "labels": s["labels"], "ignore": ignore}
        n = s["classes"].shape[0]
        if self.kind == "voc":  # detectron2 trains on difficult objects; the metric ignores them
            keep, ignore = torch.ones(n, dtype=torch.bool), s["difficult"]
        elif self.kind == "coco":  # crowd regions: not trained on, ignored by the metric
            keep, ignore = ~s["iscrowd"], s["iscrowd"]
        else:
            keep, ignore = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        return {"image": s["image"], "boxes": s["boxes"], "classes": s["classes"], "train_keep": keep,
                "eval_ignore": ignore}


class _InMemory(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def build_task_dataset(data: TransferData, split: str, task: str):
    """(dataset, class names) for ``task`` on ``split`` ("train" or "val" of the config).

    Items: detection ``{"image", "boxes" xyxy, "classes" 0..C-1, "train_keep", "eval_ignore"}``;
    segmentation ``{"image", "mask"}`` (0 background, k = class k-1, 255 ignore; class names
    then start with "background"); multilabel ``{"image", "labels", "ignore"}``.
    Fashion-Scenes are generated once and kept in memory.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    name = data.train_split if split == "train" else data.val_split
    if data.classes is not None and data.dataset != "voc":
        raise ConfigError(f"data.classes names the classes of a VOC folder (data.dataset=voc); {data.dataset} has "
                          f"its own (leave data.classes out)")
    if data.dataset == "fashion_scenes":
        from densessl.data.fashion_mnist import CLASSES
        from densessl.data.scenes import FashionScenes

        if split not in ("train", "val"):
            raise ConfigError(f"fashion_scenes has the splits train and val, got {split!r}")
        num = data.num_train if split == "train" else data.num_val
        src = FashionScenes(split=name, num_scenes=num, size=data.size, seed=data.seed, root=data.root,
                            with_masks=task == "segmentation")
        view = _TaskView(src, task, "scenes")
        ds = _InMemory([view[i] for i in range(len(view))])
        classes = tuple(CLASSES)
    elif data.dataset == "moving_scenes":
        from densessl.data.moving_scenes import moving_scenes_segmentation

        if task != "segmentation":
            raise ConfigError(f"moving_scenes serves the segmentation task only, not {task!r}")
        num = data.num_train if split == "train" else data.num_val
        items, classes = moving_scenes_segmentation(name, num, data.size, data.seed, data.root)
        ds = _InMemory(items)
    elif data.dataset == "voc":
        from densessl.data.voc import VOCDetection, VOCSegmentation

        if not data.root:
            raise ConfigError("data.dataset=voc needs data.root=<VOC folder with JPEGImages, Annotations, ImageSets>")
        roots = [data.root] + (list(data.extra_roots) if split == "train" else [])
        cls = VOCSegmentation if task == "segmentation" else VOCDetection
        parts = [cls(r, name, classes=data.classes) for r in roots]
        classes = parts[0].classes
        for r, p in zip(roots[1:], parts[1:]):
            if p.classes != classes:
                union = sorted(set(classes) | set(p.classes))
                raise ConfigError(f"data.extra_roots: {r} has the classes {list(p.classes)} ({p.classes_source}) but "
                                  f"{data.root} has {list(classes)} ({parts[0].classes_source}); give them all "
                                  f"with data.classes=[{','.join(union)}]")
        src = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
        ds = _TaskView(src, task, "voc")
        ds.classes_source = parts[0].classes_source
    elif data.dataset == "coco":
        from densessl.data.coco import COCODataset, coco_paths

        if not data.root:
            raise ConfigError("data.dataset=coco needs data.root=<folder with annotations/instances_<split>.json>")
        ann, images = coco_paths(data.root, name)
        src = COCODataset(ann, images, with_masks=task == "segmentation")
        classes = src.classes
        ds = _TaskView(src, task, "coco")
    else:
        raise ConfigError(f"data.dataset={data.dataset!r}; expected fashion_scenes, voc or coco")
    if task == "segmentation":
        classes = ("background",) + tuple(classes)
    if len(ds) == 0:
        raise ConfigError(f"{data.dataset} split {name!r} is empty")
    return ds, tuple(classes)


class SampleStream(Dataset):
    """The training samples of an iteration-based protocol as a dataset over sample numbers.

    Sample ``k`` (0 <= k < iterations * batch_size) is item ``order[k]`` of ``dataset``, where
    ``order`` concatenates seeded permutations (one per pass over the data), passed through
    ``transform(item, generator)`` with a generator seeded by ``(seed, k)``. The stream is
    therefore the same whatever the number of DataLoader workers.
    """

    def __init__(self, dataset, num_samples: int, seed: int, transform):
        self.dataset, self.num, self.seed, self.transform = dataset, int(num_samples), int(seed), transform
        gen = torch.Generator().manual_seed(self.seed)
        n = len(dataset)
        passes = -(-self.num // n)
        self.order = torch.cat([torch.randperm(n, generator=gen) for _ in range(passes)])[:self.num]

    def __len__(self):
        return self.num

    def __getitem__(self, k):
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + int(k)) % 2**62)
        return self.transform(self.dataset[int(self.order[k])], gen)


def stream_loader(stream: SampleStream, batch_size: int, num_workers: int, collate):
    """Batches of the stream in order (no shuffling: the order is in the stream)."""
    from torch.utils.data import DataLoader

    return DataLoader(stream, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                      persistent_workers=num_workers > 0, drop_last=False)
