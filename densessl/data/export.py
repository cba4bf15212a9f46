"""Write Fashion-Scenes (or any dataset with the same sample dict) as Pascal VOC or COCO, and
draw a preview grid.

Samples must hold ``image`` uint8 (3,H,W), ``boxes`` float (n,4) xyxy pixels with x2, y2
exclusive, ``classes`` int (n,) and ``masks`` bool (n,H,W); ``semantic`` (H,W) is used where
present and rebuilt from the masks otherwise. Annotations are exact; images are written as
JPEG (quality 95, no chroma subsampling; this changes pixels slightly: mean absolute error about
2 levels on 64-px scenes) or, with ``image_ext="png"``, losslessly.
"""
from __future__ import annotations

import functools
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image

from densessl.data.fashion_mnist import CLASSES

IMAGE_EXTS = ("jpg", "png")
JPEG_QUALITY = 95


def voc_colormap(n: int = 256) -> np.ndarray:
    """The Pascal VOC palette: (n, 3) uint8, index 0 black, 1 (128,0,0), 2 (0,128,0), ..."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def _check_ext(image_ext: str) -> str:
    ext = image_ext.lower().lstrip(".")
    if ext == "jpeg":
        ext = "jpg"
    if ext not in IMAGE_EXTS:
        raise ValueError(f"image_ext must be one of {IMAGE_EXTS}, got {image_ext!r}")
    return ext


def _count(dataset, num: int | None) -> int:
    if num is None:
        return len(dataset)
    if not 0 <= int(num) <= len(dataset):
        raise ValueError(f"num must lie in [0, {len(dataset)}] (the dataset's length), got {num}")
    return int(num)


def _numpy_sample(sample: dict, index: int) -> dict[str, np.ndarray]:
    missing = [k for k in ("image", "boxes", "classes", "masks") if k not in sample]
    if missing:
        raise ValueError(
            f"sample {index} lacks {', '.join(missing)}; exports need image, boxes, classes and "
            "masks (build FashionScenes with with_masks=True)"
        )
    image = np.asarray(sample["image"])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"sample {index}: expected image uint8 (3,H,W), got {image.dtype} {image.shape}"
        )
    out = {
        "image": np.ascontiguousarray(image.transpose(1, 2, 0)),
        "boxes": np.asarray(sample["boxes"], np.float64).reshape(-1, 4),
        "classes": np.asarray(sample["classes"], np.int64).reshape(-1),
        "masks": np.asarray(sample["masks"], bool),
    }
    if "semantic" in sample:
        out["semantic"] = np.asarray(sample["semantic"], np.int64)
    else:
        sem = np.zeros(out["image"].shape[:2], np.int64)
        for m, c in zip(out["masks"], out["classes"]):
            sem[m] = c + 1
        out["semantic"] = sem
    return out


def _save_image(image: np.ndarray, path: Path) -> None:
    im = Image.fromarray(image)
    if path.suffix == ".jpg":
        im.save(path, quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: no chroma blur on small images
    else:
        im.save(path)


def _save_palette_png(indices: np.ndarray, path: Path, palette: np.ndarray) -> None:
    if indices.max(initial=0) > 255:
        raise ValueError(f"{path}: {int(indices.max())} labels do not fit an 8-bit palette PNG")
    im = Image.fromarray(indices.astype(np.uint8), mode="P")
    im.putpalette(palette.reshape(-1).tolist())
    im.save(path)


def _sub(parent: ET.Element, tag: str, text=None) -> ET.Element:
    e = ET.SubElement(parent, tag)
    if text is not None:
        e.text = str(text)
    return e


def _voc_xml(file_name: str, s: dict[str, np.ndarray]) -> ET.ElementTree:
    h, w = s["image"].shape[:2]
    root = ET.Element("annotation")
    _sub(root, "folder", "FashionScenes")
    _sub(root, "filename", file_name)
    src = _sub(root, "source")
    _sub(src, "database", "Fashion-Scenes (densessl)")
    size = _sub(root, "size")
    _sub(size, "width", w)
    _sub(size, "height", h)
    _sub(size, "depth", 3)
    _sub(root, "segmented", 1)
    for box, c in zip(s["boxes"], s["classes"]):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        obj = _sub(root, "object")
        _sub(obj, "name", CLASSES[int(c)])
        _sub(obj, "pose", "Unspecified")
        _sub(obj, "truncated", 0)
        _sub(obj, "difficult", 0)
        bb = _sub(obj, "bndbox")
        # VOC: 1-based, inclusive corners
        _sub(bb, "xmin", x1 + 1)
        _sub(bb, "ymin", y1 + 1)
        _sub(bb, "xmax", x2)
        _sub(bb, "ymax", y2)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def export_scenes(dataset, out_dir: str | os.PathLike, split_name: str = "train", num: int | None = None,
                  image_ext: str = "jpg", *, layout: str) -> dict:
    """Write the first ``num`` samples (all by default) of ``dataset`` under ``out_dir`` in
    ``layout``: ``voc`` (the Pascal VOC layout: :func:`_write_voc`) or ``coco`` (the COCO format:
    :func:`_write_coco`); ``export_voc`` and ``export_coco`` name the two. Images are
    ``image_ext`` files (jpg: quality 95; png: lossless). Returns what the writer reports."""
    writers = {"voc": _write_voc, "coco": _write_coco}
    if layout not in writers:
        raise ValueError(f"layout must be one of {', '.join(writers)}, got {layout!r}")
    ext = _check_ext(image_ext)
    n = _count(dataset, num)
    samples = ((i, _numpy_sample(dataset[i], i)) for i in range(n))
    return writers[layout](samples, Path(out_dir), split_name, ext)


def _write_voc(samples, out: Path, split_name: str, ext: str) -> dict:
    """The Pascal VOC layout under ``out``.

    Writes ``JPEGImages/<id>.<ext>``, ``Annotations/<id>.xml`` (1-based inclusive boxes),
    ``SegmentationClass/<id>.png`` (VOC palette; 0 background, class + 1),
    ``SegmentationObject/<id>.png`` (0 background, instance index + 1, in sample order),
    ``ImageSets/Main/<split_name>.txt``, ``ImageSets/Segmentation/<split_name>.txt`` and
    ``labels.txt`` (class names, one per line). Ids are ``<split_name>_<index:06d>``.
    Returns ``{"out_dir", "images", "objects"}``.
    """
    dirs = {
        k: out / k
        for k in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject",
                  "ImageSets/Main", "ImageSets/Segmentation")
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    palette = voc_colormap()
    ids, objects = [], 0
    for i, s in samples:
        sid = f"{split_name}_{i:06d}"
        file_name = f"{sid}.{ext}"
        _save_image(s["image"], dirs["JPEGImages"] / file_name)
        _voc_xml(file_name, s).write(dirs["Annotations"] / f"{sid}.xml", encoding="utf-8",
                                     xml_declaration=False)
        _save_palette_png(s["semantic"], dirs["SegmentationClass"] / f"{sid}.png", palette)
        inst = np.zeros(s["semantic"].shape, np.int64)
        for k, m in enumerate(s["masks"]):
            inst[m] = k + 1
        _save_palette_png(inst, dirs["SegmentationObject"] / f"{sid}.png", palette)
        ids.append(sid)
        objects += len(s["classes"])
    listing = "".join(f"{sid}\n" for sid in ids)
    (dirs["ImageSets/Main"] / f"{split_name}.txt").write_text(listing)
    (dirs["ImageSets/Segmentation"] / f"{split_name}.txt").write_text(listing)
    (out / "labels.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    return {"out_dir": str(out), "images": len(ids), "objects": objects}


def _write_coco(samples, out: Path, split_name: str, ext: str) -> dict:
    """The COCO format under ``out``.

    Writes ``images/<split_name>/<index:06d>.<ext>`` and
    ``annotations/instances_<split_name>.json`` with images (id from 1), categories (id 1..10 =
    class + 1), and annotations: bbox ``[x, y, w, h]`` of the visible mask, area = mask pixel
    count, ``iscrowd`` 0 and the mask as compressed RLE. Returns
    ``{"out_dir", "annotations", "images", "objects"}``.
    """
    from densessl.config import require_extra

    mask_utils = require_extra("pycocotools.mask", "coco", "COCO export (RLE masks)")

    img_dir = out / "images" / split_name
    ann_dir = out / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, s in samples:
        h, w = s["image"].shape[:2]
        file_name = f"{i:06d}.{ext}"
        _save_image(s["image"], img_dir / file_name)
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "width": int(w), "height": int(h)})
        for box, c, m in zip(s["boxes"], s["classes"], s["masks"]):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(c) + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float(np.count_nonzero(m)),
                "iscrowd": 0,
                "segmentation": {"size": [int(h), int(w)], "counts": rle["counts"]},
            })
    coco = {
        "info": {"description": f"Fashion-Scenes {split_name} (densessl)", "version": "1.0"},
        "licenses": [{"id": 1, "name": "MIT (Fashion-MNIST, Zalando SE)"}],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "fashion"} for k, name in enumerate(CLASSES)
        ],
    }
    ann_path = ann_dir / f"instances_{split_name}.json"
    tmp = ann_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(coco))
    os.replace(tmp, ann_path)
    return {"out_dir": str(out), "annotations": str(ann_path), "images": len(images),
            "objects": len(annotations)}


# The two layouts by name, with export_scenes' arguments: (dataset, out_dir, split_name, num, image_ext).
export_voc = functools.partial(export_scenes, layout="voc")
export_coco = functools.partial(export_scenes, layout="coco")


PREVIEW_PANEL_INCHES = 2.0
PREVIEW_DPI = 100


def preview_size(n: int, cols: int = 4) -> tuple[int, int]:
    """(width, height) in pixels of the PNG that :func:`preview` writes for n samples."""
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    panel = int(round(PREVIEW_PANEL_INCHES * PREVIEW_DPI))
    return 2 * cols * panel, rows * panel


def preview(dataset, path: str | os.PathLike, n: int = 16, cols: int = 4) -> tuple[int, int]:
    """Write a PNG grid of the first ``n`` samples: for each, the plain image and, beside it,
    the image with its instance masks overlaid, boxes and class names.

    Samples without boxes (e.g. FashionItems) show their class name as a title. Returns the
    (width, height) of the PNG, equal to :func:`preview_size`.
    """
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, no global state
    from matplotlib.patches import Rectangle

    n = min(int(n), len(dataset))
    if n < 1:
        raise ValueError(f"preview needs at least one sample, got n={n} (dataset length {len(dataset)})")
    cols = max(1, min(int(cols), n))
    rows = -(-n // cols)
    width, height = preview_size(n, cols)
    fig = Figure(figsize=(width / PREVIEW_DPI, height / PREVIEW_DPI), dpi=PREVIEW_DPI)
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=0.995, wspace=0.03, hspace=0.03)
    axes = fig.subplots(rows, 2 * cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    colours = np.array([
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190),
    ], np.float32) / 255.0
    for i in range(n):
        s = dataset[i]
        image = np.asarray(s["image"]).transpose(1, 2, 0)
        ax_img, ax_ann = axes[i // cols, 2 * (i % cols)], axes[i // cols, 2 * (i % cols) + 1]
        ax_img.imshow(image, interpolation="nearest")
        if "boxes" not in s:
            label = int(np.asarray(s["label"])) if "label" in s else None
            ax_ann.imshow(image, interpolation="bilinear")
            if label is not None:
                ax_ann.text(0.5, 0.5, CLASSES[label], fontsize=6, color="black", va="top",
                            ha="left", bbox=dict(facecolor="white", alpha=0.8, pad=0.6, linewidth=0))
            continue
        over = image.astype(np.float32) / 255.0
        classes = np.asarray(s["classes"]).reshape(-1)
        boxes = np.asarray(s["boxes"]).reshape(-1, 4)
        if "masks" in s:
            for k, m in enumerate(np.asarray(s["masks"])):
                over[m] = 0.5 * over[m] + 0.5 * colours[k % len(colours)]
        ax_ann.imshow(over, interpolation="nearest")
        for k, (box, c) in enumerate(zip(boxes, classes)):
            x1, y1, x2, y2 = (float(v) for v in box)
            col = colours[k % len(colours)]
            ax_ann.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False,
                                       edgecolor=col, linewidth=1.2))
            ax_ann.text(x1 - 0.5, y1 - 0.5, CLASSES[int(c)], fontsize=5.5, color="black",
                        va="top", ha="left",
                        bbox=dict(facecolor=col, alpha=0.8, pad=0.6, linewidth=0))
    fig.savefig(os.fspath(path), dpi=PREVIEW_DPI, format="png")
    return width, height
