"""Pascal VOC readers: multi-label / detection items and segmentation items as torch Datasets.

Layout under ``root`` (a ``VOCdevkit/VOC2007``-style folder, or one written by
``densessl.data.export.export_voc``)::

    JPEGImages/<id>.jpg (or .png)
    Annotations/<id>.xml                  objects: <name>, <difficult>, <bndbox> 1-based inclusive
    ImageSets/Main/<split>.txt            ids for classification and detection
    ImageSets/Segmentation/<split>.txt    ids for segmentation
    SegmentationClass/<id>.png            palette PNG: index = class (0 background), 255 = ignore
    labels.txt                            (optional) class names, one per line

Class names (label order), the first that applies:

1. ``classes=[...]`` given (the CLI's ``data.classes=[...]``); an object with another name is an
   error naming the XML file and the name;
2. ``labels.txt`` in the folder (densessl exports write it);
3. detection / multi-label only: the names in ``Annotations/*.xml`` (every file, so all splits
   agree): the 20 Pascal VOC classes in their usual order when every name is one of them,
   else the names found, sorted (a folder written by LabelImg or CVAT with its own classes);
4. the 20 Pascal VOC classes.

Segmentation does not infer names from the XML files: its PNG indices follow the labelling
tool's own order, which the names in the annotations do not tell.

Boxes: VOC stores 1-based inclusive pixel corners; items hold 0-based xyxy boxes with x2, y2
exclusive (the box covers pixels x1..x2-1), i.e. ``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax,
y2 = ymax`` -- the convention of Fashion-Scenes and of torchvision's detection models.

Multi-label targets follow the VOC per-class image-set files (and SS-PRL's loader): a class is
positive (1) when the image has at least one non-difficult object of it, "difficult" when all
its objects are difficult (VOC's 0; ignored by the metric and, in SS-PRL, by the loss), and
negative otherwise.

A malformed file raises :class:`AnnotationError` naming the file and the field.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from densessl.common.errors import AnnotationError  # noqa: F401  (raised here; importers take it from here too)
from densessl.data.image_io import DecodeError, decode_rgb

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
IGNORE_INDEX = 255
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """uint8 RGB (3, H, W) tensor of an image file; AnnotationError names the file on failure."""
    try:
        return decode_rgb(path)
    except FileNotFoundError:
        raise AnnotationError(f"{path}: image file not found") from None
    except (OSError, DecodeError) as e:
        raise AnnotationError(f"{path}: cannot decode image ({e if isinstance(e, DecodeError) else DecodeError(e)})") from e


def resolve_classes(root: str | os.PathLike, classes=None, infer: bool = True) -> tuple[str, ...]:
    """Class names: the given ones, else ``root/labels.txt``, else (``infer``) those of the
    annotations, else the 20 VOC classes (see the module notes)."""
    return resolve_classes_and_source(root, classes, infer)[0]


def resolve_classes_and_source(root: str | os.PathLike, classes=None, infer: bool = True
                               ) -> tuple[tuple[str, ...], str]:
    """(class names, where they came from, in words) -- see :func:`resolve_classes`."""
    labels = Path(root) / "labels.txt"
    if classes is not None:
        classes, source = tuple(str(c).strip() for c in classes), "data.classes"
        if not classes or not all(classes):
            raise AnnotationError(f"data.classes={list(classes)}: expected a non-empty list of class names")
    elif labels.is_file():
        classes, source = tuple(line.strip() for line in labels.read_text().splitlines() if line.strip()), str(labels)
        if not classes:
            raise AnnotationError(f"{labels}: no class names (one per line expected)")
    elif infer and (found := annotation_class_names(root)):
        names, n_files = found
        if set(names) <= set(VOC_CLASSES):
            classes, source = VOC_CLASSES, f"Pascal VOC's 20 classes (every name in {n_files} annotation files is one)"
        else:
            classes, source = names, f"the names in {n_files} annotation files of {Path(root) / 'Annotations'}, sorted"
    else:
        classes, source = VOC_CLASSES, "Pascal VOC's 20 classes (no labels.txt)"
    if len(set(classes)) != len(classes):
        raise AnnotationError(f"class names from {source} are not unique: {list(classes)}")
    return classes, source


def annotation_class_names(root: str | os.PathLike) -> tuple[tuple[str, ...], int] | None:
    """(sorted object names in ``root/Annotations/*.xml``, number of files), or None when there
    are no annotation files or they name no object."""
    files = sorted((Path(root) / "Annotations").glob("*.xml"))
    names: set[str] = set()
    for path in files:
        try:
            tree = ET.parse(path)
        except ET.ParseError as e:
            raise AnnotationError(f"{path}: not valid XML ({e})") from None
        found = (obj.findtext("name") for obj in tree.getroot().iter("object"))
        names.update(n.strip() for n in found if n and n.strip())
    return (tuple(sorted(names)), len(files)) if names else None


def read_split(root: str | os.PathLike, split: str, kind: str = "Main") -> list[str]:
    """Image ids listed in ``ImageSets/<kind>/<split>.txt`` (first token of each non-empty line)."""
    path = Path(root) / "ImageSets" / kind / f"{split}.txt"
    if not path.is_file():
        folder = path.parent
        known = sorted(p.stem for p in folder.glob("*.txt") if "_" not in p.stem) if folder.is_dir() else []
        raise AnnotationError(f"{path}: split file not found (splits in {folder}: {known or 'none'})")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise AnnotationError(f"{path}: lists no image ids")
    return ids


def _number(text: str | None, path, where: str) -> float:
    if text is None or not text.strip():
        raise AnnotationError(f"{path}: {where} is empty")
    try:
        return float(text)
    except ValueError:
        raise AnnotationError(f"{path}: {where} is not a number: {text.strip()!r}") from None


def parse_voc_xml(path: str | os.PathLike, class_to_idx: dict[str, int], classes_source: str = "") -> dict:
    """Objects of one VOC annotation file (``classes_source``: where ``class_to_idx`` came from,
    named in the error for an unknown class name).

    Returns ``{"boxes": float32 (n,4) 0-based xyxy (x2, y2 exclusive), "classes": int64 (n,),
    "difficult": bool (n,), "filename": str or None, "size": (width, height) or None}``.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise AnnotationError(f"{path}: not valid XML ({e})") from None
    if root.tag != "annotation":
        raise AnnotationError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    boxes, classes, difficult = [], [], []
    for k, obj in enumerate(root.findall("object")):
        name = obj.findtext("name")
        if name is None or not name.strip():
            raise AnnotationError(f"{path}: object {k} has no <name>")
        name = name.strip()
        if name not in class_to_idx:
            fix = ""
            if classes_source == "data.classes":
                fix = "; add it to data.classes, or leave data.classes out to infer the classes from the annotations"
            elif classes_source.endswith("labels.txt"):
                fix = f"; add it to {classes_source}, or give all the names with data.classes=[...]"
            elif classes_source:
                fix = f" from {classes_source}; give all the names with data.classes=[...]"
            raise AnnotationError(f"{path}: object {k}: unknown class name {name!r} "
                                  f"(known: {', '.join(class_to_idx)}){fix}")
        what = f"object {k} ({name!r})"
        d = obj.findtext("difficult")
        if d is None or not d.strip():
            diff = False
        else:
            value = _number(d, path, f"{what}: <difficult>")
            if value not in (0.0, 1.0):
                raise AnnotationError(f"{path}: {what}: <difficult> must be 0 or 1, got {d.strip()!r}")
            diff = value == 1.0
        bb = obj.find("bndbox")
        if bb is None:
            raise AnnotationError(f"{path}: {what} has no <bndbox>")
        coords = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            el = bb.find(tag)
            if el is None:
                raise AnnotationError(f"{path}: {what}: <bndbox> lacks <{tag}>")
            coords.append(_number(el.text, path, f"{what}: <bndbox>/<{tag}>"))
        xmin, ymin, xmax, ymax = coords
        if xmax < xmin or ymax < ymin:
            raise AnnotationError(f"{path}: {what}: empty <bndbox> (xmin {xmin:g}, ymin {ymin:g}, "
                                  f"xmax {xmax:g}, ymax {ymax:g})")
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
        classes.append(class_to_idx[name])
        difficult.append(diff)
    size = None
    if root.find("size") is not None:
        w, h = root.findtext("size/width"), root.findtext("size/height")
        if w is not None and h is not None:
            size = (int(_number(w, path, "<size>/<width>")), int(_number(h, path, "<size>/<height>")))
    return {
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "classes": np.asarray(classes, np.int64),
        "difficult": np.asarray(difficult, bool),
        "filename": root.findtext("filename"),
        "size": size,
    }


def multilabel_targets(classes: np.ndarray, difficult: np.ndarray, num_classes: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels float (C,), difficult bool (C,)): positive where a non-difficult object exists,
    difficult where every object of the class is difficult."""
    labels = np.zeros(num_classes, np.float32)
    labels[classes[~difficult]] = 1.0
    any_obj = np.zeros(num_classes, bool)
    any_obj[classes] = True
    return torch.from_numpy(labels), torch.from_numpy(any_obj & (labels == 0))


def _image_path(root: Path, sid: str, filename: str | None) -> Path:
    folder = root / "JPEGImages"
    if filename:
        p = folder / filename
        if p.is_file():
            return p
    for ext in IMAGE_EXTS:
        p = folder / f"{sid}{ext}"
        if p.is_file():
            return p
    raise AnnotationError(f"{folder}: no image for id {sid!r} (tried {filename or ''} "
                          f"{' '.join(sid + e for e in IMAGE_EXTS)})")


class VOCDetection(Dataset):
    """Pascal VOC images with their objects (detection and multi-label classification).

    ``__getitem__(i)`` returns ``{"image": uint8 (3,H,W), "boxes": float32 (n,4) 0-based xyxy,
    "classes": int64 (n,), "difficult": bool (n,), "labels": float32 (C,) multi-hot (non-difficult
    objects), "labels_difficult": bool (C,) classes present only as difficult objects, "id": str}``.
    Annotations are parsed once, at construction, so a malformed file fails early.
    """

    def __init__(self, root: str | os.PathLike, split: str = "trainval", classes=None,
                 load_images: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise AnnotationError(f"{self.root}: VOC root folder not found")
        self.split = split
        self.classes, self.classes_source = resolve_classes_and_source(self.root, classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.ids = read_split(self.root, split, "Main")
        self.load_images = load_images
        self.annotations = [parse_voc_xml(self.root / "Annotations" / f"{sid}.xml", self.class_to_idx,
                                          self.classes_source) for sid in self.ids]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        return _image_path(self.root, self.ids[i], self.annotations[i]["filename"])

    def __getitem__(self, i: int) -> dict:
        a = self.annotations[i]
        labels, labels_difficult = multilabel_targets(a["classes"], a["difficult"], self.num_classes)
        item = {
            "boxes": torch.from_numpy(a["boxes"].copy()),
            "classes": torch.from_numpy(a["classes"].copy()),
            "difficult": torch.from_numpy(a["difficult"].copy()),
            "labels": labels,
            "labels_difficult": labels_difficult,
            "id": self.ids[i],
        }
        if self.load_images:
            item["image"] = read_image(self.image_path(i))
        return item

    def __repr__(self) -> str:
        return f"VOCDetection(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, classes={self.num_classes})"


VOCMultiLabel = VOCDetection  # the same items; multi-label protocols read "labels" and "labels_difficult"


def read_segmentation_png(path: str | os.PathLike, num_classes: int | None = None) -> np.ndarray:
    """Class-index map int64 (H, W) of a VOC SegmentationClass PNG (255 = ignore).

    Palette ("P") and grayscale ("L") PNGs hold the indices directly; an RGB PNG is mapped back
    through the VOC colour map (an unknown colour is an error). With ``num_classes``, any index
    other than 0..num_classes-1 and 255 is an error.
    """
    from densessl.data.export import voc_colormap

    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: segmentation PNG not found")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise AnnotationError(f"{path}: cannot decode segmentation PNG ({type(e).__name__}: {e})") from e
    if mode in ("P", "L"):
        mask = arr.astype(np.int64)
    elif mode in ("RGB", "RGBA"):
        rgb = arr[..., :3].astype(np.int64)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        cmap = voc_colormap().astype(np.int64)
        keys = (cmap[:, 0] << 16) | (cmap[:, 1] << 8) | cmap[:, 2]
        lookup = {int(k): i for i, k in enumerate(keys)}
        uniq, inverse = np.unique(code, return_inverse=True)
        bad = [int(u) for u in uniq if int(u) not in lookup]
        if bad:
            b = bad[0]
            raise AnnotationError(f"{path}: RGB colour {(b >> 16, (b >> 8) & 255, b & 255)} is not in the "
                                  "VOC colour map")
        mask = np.asarray([lookup[int(u)] for u in uniq], np.int64)[inverse].reshape(code.shape)
    else:
        raise AnnotationError(f"{path}: segmentation PNG has mode {mode!r}; expected P (palette), L or RGB")
    if num_classes is not None:
        bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
        if bad.any():
            raise AnnotationError(f"{path}: class index {int(mask[bad][0])} out of range for {num_classes} "
                                  f"classes (0..{num_classes - 1}, {IGNORE_INDEX} = ignore); name the classes in "
                                  f"labels.txt or with data.classes=[...] (background not included)")
    return mask


class VOCSegmentation(Dataset):
    """Pascal VOC semantic segmentation: ``{"image": uint8 (3,H,W), "mask": int64 (H,W), "id"}``.

    The mask holds 0 = background, k = class k-1 of ``classes`` (1..20 for VOC), 255 = ignore
    (VOC's object borders). ``num_classes`` counts the background: ``len(classes) + 1``.
    Ids come from ``ImageSets/Segmentation/<split>.txt``.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", classes=None, mask_dir: str = "SegmentationClass"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise AnnotationError(f"{self.root}: VOC root folder not found")
        self.split = split
        self.classes, self.classes_source = resolve_classes_and_source(self.root, classes, infer=False)
        self.ids = read_split(self.root, split, "Segmentation")
        self.mask_dir = self.root / mask_dir
        if not self.mask_dir.is_dir():
            raise AnnotationError(f"{self.mask_dir}: segmentation mask folder not found")

    @property
    def num_classes(self) -> int:
        return len(self.classes) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        sid = self.ids[i]
        image = read_image(_image_path(self.root, sid, None))
        mask = read_segmentation_png(self.mask_dir / f"{sid}.png", self.num_classes)
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise AnnotationError(f"{self.mask_dir / (sid + '.png')}: mask is {mask.shape[1]}x{mask.shape[0]} "
                                  f"but the image is {image.shape[2]}x{image.shape[1]}")
        return {"image": image, "mask": torch.from_numpy(mask), "id": sid}

    def __repr__(self) -> str:
        return f"VOCSegmentation(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, classes={self.num_classes})"
