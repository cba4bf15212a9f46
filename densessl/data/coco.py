"""COCO instances readers (via pycocotools): multi-label, detection and segmentation items.

``COCODataset(ann_file, image_dir)`` reads an ``instances_*.json`` file (the COCO layout, or
one written by ``densessl.data.export.export_coco``). The file is validated before use:
a missing top-level key (``images``, ``annotations``, ``categories``), an annotation that
names an unknown image or category id, a bbox that is not four numbers, a duplicate id ...
raises :class:`~densessl.data.voc.AnnotationError` naming the file and the field.

Conventions:
- category ids are mapped to contiguous indices 0..C-1 in increasing id order
  (``self.cat_ids[k]`` is the COCO id of index k, ``self.classes[k]`` its name);
- images are ordered by increasing image id;
- boxes: COCO ``[x, y, w, h]`` -> xyxy ``[x, y, x + w, y + h]`` (float pixels, x2 exclusive);
- multi-label target: a class is positive when the image has at least one annotation of it
  (crowd annotations included, as SS-PRL's loader does); an image without annotations is
  all-negative;
- masks (``with_masks=True``): ``COCO.annToMask`` per annotation (polygons, RLE or compressed
  RLE), bool (n,H,W); ``semantic`` int64 (H,W): 0 background, class + 1 painted in annotation
  order, crowd regions 255 (ignore).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from densessl.data.voc import IGNORE_INDEX, AnnotationError, read_image


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_coco_json(path: str | os.PathLike) -> dict:
    """Read and validate a COCO instances file; returns the parsed dict."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: COCO annotation file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: not valid JSON ({e})") from None
    validate_coco(data, path)
    return data


def validate_coco(data, path) -> None:
    """Raise AnnotationError (naming ``path`` and the field) unless ``data`` is a usable COCO dict."""
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            hint = " (an image-info file without labels, e.g. test-dev?)" if key == "annotations" else ""
            raise AnnotationError(f"{path}: missing {key!r} key{hint}")
        if not isinstance(data[key], list):
            raise AnnotationError(f"{path}: {key!r} must be a list, got {type(data[key]).__name__}")
    image_ids = set()
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise AnnotationError(f"{path}: images[{k}] must be an object")
        for field in ("id", "file_name"):
            if field not in img:
                raise AnnotationError(f"{path}: images[{k}] has no {field!r}")
        if img["id"] in image_ids:
            raise AnnotationError(f"{path}: images[{k}]: duplicate image id {img['id']!r}")
        for field in ("width", "height"):
            if field in img and not (_is_number(img[field]) and img[field] > 0):
                raise AnnotationError(f"{path}: images[{k}] (id {img['id']!r}): {field!r} must be a positive "
                                      f"number, got {img[field]!r}")
        image_ids.add(img["id"])
    cat_ids = set()
    for k, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise AnnotationError(f"{path}: categories[{k}] has no 'id'")
        if cat["id"] in cat_ids:
            raise AnnotationError(f"{path}: categories[{k}]: duplicate category id {cat['id']!r}")
        cat_ids.add(cat["id"])
    if not cat_ids:
        raise AnnotationError(f"{path}: 'categories' is empty")
    ann_ids = set()
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise AnnotationError(f"{path}: annotations[{k}] must be an object")
        where = f"annotations[{k}]" + (f" (id {ann['id']!r})" if "id" in ann else "")
        for field in ("id", "image_id", "category_id", "bbox"):
            if field not in ann:
                raise AnnotationError(f"{path}: {where} has no {field!r}")
        if ann["id"] in ann_ids:
            raise AnnotationError(f"{path}: {where}: duplicate annotation id")
        ann_ids.add(ann["id"])
        if ann["image_id"] not in image_ids:
            raise AnnotationError(f"{path}: {where}: unknown image id {ann['image_id']!r}")
        if ann["category_id"] not in cat_ids:
            raise AnnotationError(f"{path}: {where}: unknown category id {ann['category_id']!r} "
                                  f"(known: {sorted(cat_ids)})")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise AnnotationError(f"{path}: {where}: 'bbox' must be [x, y, w, h], got {bbox!r}")
        if not all(_is_number(v) for v in bbox):
            raise AnnotationError(f"{path}: {where}: 'bbox' has a non-numeric value: {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise AnnotationError(f"{path}: {where}: 'bbox' has a negative width or height: {bbox!r}")
        if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
            raise AnnotationError(f"{path}: {where}: 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")


def coco_from_dict(data: dict):
    """A pycocotools COCO object built from an (already validated) dict, without printing."""
    from densessl.config import require_extra

    COCO = require_extra("pycocotools.coco", "coco", "reading COCO annotations").COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class COCODataset(Dataset):
    """COCO images with their instances.

    ``__getitem__(i)`` returns ``{"image": uint8 (3,H,W), "labels": float32 (C,) multi-hot,
    "boxes": float32 (n,4) xyxy, "classes": int64 (n,) contiguous indices, "iscrowd": bool (n,),
    "image_id": int}`` plus, with ``with_masks``, ``"masks"`` bool (n,H,W) and ``"semantic"``
    int64 (H,W).
    """

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike, with_masks: bool = False,
                 load_images: bool = True):
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        data = load_coco_json(self.ann_file)
        self.coco = coco_from_dict(data)
        self.cat_ids = sorted(self.coco.cats)
        self.cat_to_idx = {c: k for k, c in enumerate(self.cat_ids)}
        self.classes = tuple(str(self.coco.cats[c].get("name", c)) for c in self.cat_ids)
        self.image_ids = sorted(self.coco.imgs)
        self.with_masks = with_masks
        self.load_images = load_images
        if with_masks:
            for img_id in self.image_ids:
                img = self.coco.imgs[img_id]
                if "width" not in img or "height" not in img:
                    raise AnnotationError(f"{self.ann_file}: image id {img_id!r} has no width/height, needed "
                                          "to decode masks")
                for ann in self.coco.imgToAnns[img_id]:
                    if "segmentation" not in ann:
                        raise AnnotationError(f"{self.ann_file}: annotation id {ann['id']!r} has no "
                                              "'segmentation' (with_masks=True needs one)")

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.coco.imgs[self.image_ids[i]]["file_name"]

    def __getitem__(self, i: int) -> dict:
        img_id = self.image_ids[i]
        anns = self.coco.imgToAnns[img_id]
        boxes = np.asarray([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                            for a in anns], np.float32).reshape(-1, 4)
        classes = np.asarray([self.cat_to_idx[a["category_id"]] for a in anns], np.int64)
        crowd = np.asarray([bool(a.get("iscrowd", 0)) for a in anns], bool)
        labels = np.zeros(self.num_classes, np.float32)
        labels[classes] = 1.0
        item = {
            "labels": torch.from_numpy(labels),
            "boxes": torch.from_numpy(boxes),
            "classes": torch.from_numpy(classes),
            "iscrowd": torch.from_numpy(crowd),
            "image_id": int(img_id) if isinstance(img_id, (int, np.integer)) else img_id,
        }
        if self.load_images:
            item["image"] = read_image(self.image_path(i))
        if self.with_masks:
            img = self.coco.imgs[img_id]
            h, w = int(img["height"]), int(img["width"])
            masks = np.zeros((len(anns), h, w), bool)
            semantic = np.zeros((h, w), np.int64)
            for k, a in enumerate(anns):
                try:
                    m = self.coco.annToMask(a).astype(bool)
                except Exception as e:  # malformed polygons / RLE
                    raise AnnotationError(f"{self.ann_file}: annotation id {a['id']!r}: cannot decode "
                                          f"'segmentation' ({type(e).__name__}: {e})") from e
                masks[k] = m
                semantic[m] = IGNORE_INDEX if crowd[k] else classes[k] + 1
            item["masks"] = torch.from_numpy(masks)
            item["semantic"] = torch.from_numpy(semantic)
        return item

    def __repr__(self) -> str:
        return (f"COCODataset(ann_file={str(self.ann_file)!r}, images={len(self)}, classes={self.num_classes}, "
                f"with_masks={self.with_masks})")


def coco_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of ``split`` under a COCO root.

    Annotation: ``root/annotations/instances_<split>.json``. Images: ``root/images/<split>``
    (densessl exports) or ``root/<split>`` (the COCO download layout), whichever exists.
    """
    root = Path(root)
    ann = root / "annotations" / f"instances_{split}.json"
    for images in (root / "images" / split, root / split):
        if images.is_dir():
            return ann, images
    raise AnnotationError(f"{root}: no image folder for split {split!r} (looked for {root / 'images' / split} "
                          f"and {root / split})")
