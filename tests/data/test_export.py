import argparse
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from densessl.data.commands import add_data_commands
from densessl.data.export import export_coco, export_voc, preview, preview_size, voc_colormap
from densessl.data.fashion_mnist import CLASSES
from densessl.data.scenes import FashionItems, FashionScenes

NUM = 8

# pycocotools' decode trips a numpy 2 deprecation inside pycocotools itself
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def ds():
    return FashionScenes("val", num_scenes=20, seed=4)


def test_voc_colormap():
    cmap = voc_colormap()
    assert cmap.shape == (256, 3)
    assert cmap[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert cmap[255].tolist() == [224, 224, 192]


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_export_voc(ds, tmp_path, ext):
    out = tmp_path / "voc"
    info = export_voc(ds, out, split_name="val", num=NUM, image_ext=ext)
    assert info["images"] == NUM
    ids = (out / "ImageSets/Main/val.txt").read_text().split()
    assert ids == (out / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(ids) == NUM
    assert (out / "labels.txt").read_text().splitlines() == list(CLASSES)
    objects = 0
    for i, sid in enumerate(ids):
        s = ds[i]
        root = ET.parse(out / "Annotations" / f"{sid}.xml").getroot()
        assert root.findtext("filename") == f"{sid}.{ext}"
        assert int(root.findtext("size/width")) == 64 and int(root.findtext("size/height")) == 64
        assert int(root.findtext("size/depth")) == 3
        objs = root.findall("object")
        assert [o.findtext("name") for o in objs] == [CLASSES[c] for c in s["classes"].tolist()]
        for o, box in zip(objs, s["boxes"].tolist()):
            assert o.findtext("difficult") == "0" and o.findtext("truncated") == "0"
            xyxy = [int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            x1, y1, x2, y2 = box
            assert xyxy == [x1 + 1, y1 + 1, x2, y2]  # VOC: 1-based, inclusive
        objects += len(objs)
        seg = Image.open(out / "SegmentationClass" / f"{sid}.png")
        assert seg.mode == "P"
        assert np.array_equal(np.array(seg), s["semantic"].numpy())
        pal = np.array(seg.getpalette()[:9]).reshape(3, 3)
        assert pal.tolist() == voc_colormap()[:3].tolist()
        inst = np.array(Image.open(out / "SegmentationObject" / f"{sid}.png"))
        for k, m in enumerate(s["masks"].numpy()):
            assert np.array_equal(inst == k + 1, m)
        assert ((inst > 0) == (s["semantic"].numpy() > 0)).all()
        img = np.array(Image.open(out / "JPEGImages" / f"{sid}.{ext}").convert("RGB"))
        ref = s["image"].numpy().transpose(1, 2, 0)
        diff = np.abs(img.astype(int) - ref.astype(int))
        if ext == "png":
            assert diff.max() == 0
        else:
            assert diff.mean() < 3
    assert info["objects"] == objects


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_export_coco(ds, tmp_path, ext):
    from pycocotools.coco import COCO

    info = export_coco(ds, tmp_path / "coco", split_name="val", num=NUM, image_ext=ext)
    coco = COCO(str(tmp_path / "coco" / "annotations" / "instances_val.json"))
    assert sorted(coco.getCatIds()) == list(range(1, 11))
    assert [coco.loadCats(k)[0]["name"] for k in range(1, 11)] == list(CLASSES)
    img_ids = sorted(coco.getImgIds())
    assert len(img_ids) == NUM
    total = 0
    for i, img_id in enumerate(img_ids):
        s = ds[i]
        meta = coco.loadImgs(img_id)[0]
        assert (meta["width"], meta["height"]) == (64, 64)
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=img_id)), key=lambda a: a["id"])
        assert [a["category_id"] - 1 for a in anns] == s["classes"].tolist()
        for a, box, m in zip(anns, s["boxes"].tolist(), s["masks"].numpy()):
            x1, y1, x2, y2 = box
            assert a["bbox"] == [x1, y1, x2 - x1, y2 - y1]
            assert a["iscrowd"] == 0 and a["area"] == m.sum()
            assert np.array_equal(coco.annToMask(a).astype(bool), m)
        total += len(anns)
        path = tmp_path / "coco" / "images" / "val" / meta["file_name"]
        img = np.array(Image.open(path).convert("RGB")).astype(int)
        diff = np.abs(img - s["image"].numpy().transpose(1, 2, 0).astype(int))
        assert diff.max() == 0 if ext == "png" else diff.mean() < 3
    assert info["objects"] == total


class NoSemantic:
    """A dataset whose samples lack "semantic": exports rebuild it from masks and classes."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        s = dict(self.ds[i])
        del s["semantic"]
        return s


def test_export_voc_rebuilds_semantic(ds, tmp_path):
    export_voc(NoSemantic(ds), tmp_path / "voc", num=4, image_ext="png")
    for i in range(4):
        seg = np.array(Image.open(tmp_path / "voc" / "SegmentationClass" / f"train_{i:06d}.png"))
        assert np.array_equal(seg, ds[i]["semantic"].numpy())


def test_export_needs_masks(tmp_path):
    fast = FashionScenes("val", num_scenes=3, with_masks=False)
    with pytest.raises(ValueError, match="with_masks=True"):
        export_voc(fast, tmp_path / "voc")
    with pytest.raises(ValueError, match="image_ext"):
        export_coco(FashionScenes("val", num_scenes=3), tmp_path / "c", image_ext="gif")
    with pytest.raises(ValueError, match="num"):
        export_coco(FashionScenes("val", num_scenes=3), tmp_path / "c", num=4)


def test_preview(ds, tmp_path):
    path = tmp_path / "p.png"
    size = preview(ds, path, n=6, cols=4)
    assert size == preview_size(6, 4) == (1600, 400)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        arr = np.array(im.convert("RGB"))
    assert arr.std() > 20  # not blank
    size = preview(FashionItems("val", num_samples=3), tmp_path / "items.png", n=3, cols=3)
    with Image.open(tmp_path / "items.png") as im:
        assert im.size == size == (1200, 200)


def make_parser():
    parser = argparse.ArgumentParser(prog="densessl")
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data")
    add_data_commands(data.add_subparsers(dest="data_command", required=True))
    return parser


def test_commands(tmp_path, capsys):
    parser = make_parser()
    args = parser.parse_args(["data", "preview", "--num", "4", "--out", str(tmp_path / "p.png")])
    assert (args.split, args.size, args.seed) == ("train", 64, 0)
    assert args.func(args) == 0
    assert Image.open(tmp_path / "p.png").size == preview_size(4, 4)
    assert "p.png" in capsys.readouterr().out

    args = parser.parse_args(["data", "export-voc", str(tmp_path / "voc"), "--num", "3",
                              "--split", "val", "--size", "48", "--seed", "2"])
    assert args.func(args) == 0
    ids = (tmp_path / "voc/ImageSets/Main/val.txt").read_text().split()
    assert len(ids) == 3
    assert Image.open(tmp_path / "voc/JPEGImages" / f"{ids[0]}.jpg").size == (48, 48)

    args = parser.parse_args(["data", "export-coco", str(tmp_path / "coco"), "--num", "2"])
    assert args.num == 2 and args.func(args) == 0
    assert (tmp_path / "coco/annotations/instances_train.json").is_file()
    assert "instances_train.json" in capsys.readouterr().out

    assert parser.parse_args(["data", "export-voc", "x"]).num == 500
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "preview", "--split", "test"])
