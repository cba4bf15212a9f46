"""Labelled images for the dense probes: Fashion-Scenes, Pascal VOC or COCO, one item layout.

Items: ``{"image": uint8 (3, S, S), "label": uint8 (S, S) (0 background, c = class c - 1 of
the dataset, 255 ignore), "boxes": float32 (n, 4) xyxy pixels of the resized image,
"classes": int64 (n,) 0..C-1}``.

- fashion_scenes: the scenes of ``densessl.data.build`` (``semantic`` map, visible-mask boxes),
  already ``data.size`` square.
- voc: ``VOCSegmentation`` of ``data.train_split`` / ``data.val_split``; boxes and classes from
  ``Annotations/<id>.xml`` when the file exists (VOC's own objects, difficult ones included),
  none otherwise (the region probe then reports that it has no boxes).
- coco: ``COCODataset(with_masks=True)``; crowd regions are ignore (255) in the label and
  their boxes are left out.
- moving_scenes: frames of the synthetic videos the optical-flow variant pretrains on (two
  frames per video, ``densessl.data.moving_scenes.moving_scenes_segmentation``); no boxes, so
  the region probe reports that it has none.

VOC/COCO images are resized to ``data.size`` x ``data.size`` (bilinear with antialiasing),
labels with nearest neighbour, boxes scaled by the same factors (aspect ratio not kept, as
Leopart's and Hummingbird's square resizes). The first ``num`` items of a split are used.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from densessl.config import ConfigError

IGNORE_INDEX = 255


class DenseItems(Dataset):
    """A source dataset mapped to the dense item layout (see the module docstring)."""

    def __init__(self, source, num: int | None, size: int, kind: str, voc_boxes=None):
        self.source, self.size, self.kind, self.voc_boxes = source, int(size), kind, voc_boxes
        self.num = len(source) if num is None else min(int(num), len(source))

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> dict:
        s = self.source[i]
        image = s["image"]
        label = s["mask"] if "mask" in s else s["semantic"]
        boxes, classes = s.get("boxes"), s.get("classes")
        if boxes is None:  # a source without boxes (moving scenes)
            boxes, classes = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
        if self.kind == "coco":
            keep = ~s["iscrowd"]
            boxes, classes = boxes[keep], classes[keep]
        elif self.kind == "voc":
            boxes, classes = self.voc_boxes(s["id"])
        boxes = boxes.float().reshape(-1, 4)
        h, w = image.shape[-2:]
        if (h, w) != (self.size, self.size):
            image = F.interpolate(image[None].float(), size=(self.size, self.size), mode="bilinear",
                                  align_corners=False, antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
            label = F.interpolate(label[None, None].float(), size=(self.size, self.size), mode="nearest")[0, 0]
            boxes = boxes * torch.tensor([self.size / w, self.size / h] * 2)
        label = label.long()
        if label.numel() and (label.min() < 0 or ((label > 254) & (label != IGNORE_INDEX)).any()):
            raise ConfigError(f"{self.kind} item {i}: label values must lie in 0..254 or be {IGNORE_INDEX}")
        return {"image": image, "label": label.to(torch.uint8), "boxes": boxes, "classes": classes.long().reshape(-1)}


class _VOCBoxes:
    """Boxes and classes of a VOC id from Annotations/<id>.xml (empty when the file is absent)."""

    def __init__(self, root: Path, classes: tuple[str, ...]):
        self.root, self.class_to_idx = root, {c: k for k, c in enumerate(classes)}
        self.missing = 0

    def __call__(self, sid: str):
        from densessl.data.voc import parse_voc_xml

        path = self.root / "Annotations" / f"{sid}.xml"
        if not path.is_file():
            self.missing += 1
            return torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
        a = parse_voc_xml(path, self.class_to_idx)
        return torch.from_numpy(a["boxes"].copy()), torch.from_numpy(a["classes"].copy())


def dense_dataset(cfg, split: str) -> tuple[Dataset, tuple[str, ...]]:
    """(DenseItems, class names with "background" first) of ``split`` ("train" or "val")."""
    data = cfg.data
    num = cfg.num_train if split == "train" else cfg.num_test
    name = data.train_split if split == "train" else data.val_split
    if data.dataset == "fashion_scenes":
        from densessl.data.build import build_dataset
        from densessl.data.fashion_mnist import CLASSES

        src = build_dataset(data, split=name, with_masks=True, num=data.num_scenes if num is None else num)
        return DenseItems(src, None, data.size, "scenes"), ("background",) + tuple(CLASSES)
    if data.dataset == "moving_scenes":
        from densessl.data.moving_scenes import moving_scenes_segmentation

        items, classes = moving_scenes_segmentation(name, data.num_scenes if num is None else num, data.size,
                                                    data.seed, data.root)
        return DenseItems(items, None, data.size, "moving_scenes"), classes
    if not data.root:
        raise ConfigError(f"data.dataset={data.dataset} needs data.root=<the {data.dataset.upper()} folder>")
    if data.dataset == "voc":
        from densessl.data.voc import VOCSegmentation

        src = VOCSegmentation(data.root, name)
        items = DenseItems(src, num, data.size, "voc", _VOCBoxes(Path(data.root), src.classes))
        classes = src.classes
    elif data.dataset == "coco":
        from densessl.data.coco import COCODataset, coco_paths

        ann, images = coco_paths(data.root, name)
        src = COCODataset(ann, images, with_masks=True)
        items, classes = DenseItems(src, num, data.size, "coco"), src.classes
    else:
        raise ConfigError(f"data.dataset={data.dataset!r}; the dense probes read fashion_scenes, moving_scenes, voc or coco")
    if len(items) == 0:
        raise ConfigError(f"{data.dataset} split {name!r} under {data.root} is empty")
    if len(classes) + 1 > IGNORE_INDEX:
        raise ConfigError(f"{data.dataset}: {len(classes)} classes; the dense probes hold at most 254")
    return items, ("background",) + tuple(classes)


def collate_dense(items: list[dict]):
    """(images uint8 (B,3,S,S), {"label": uint8 (B,S,S), "boxes": [...], "classes": [...]})."""
    return torch.stack([it["image"] for it in items]), {
        "label": torch.stack([it["label"] for it in items]),
        "boxes": [it["boxes"] for it in items], "classes": [it["classes"] for it in items]}
