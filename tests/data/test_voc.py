import numpy as np
import pytest
import torch
from PIL import Image

from densessl.data.export import voc_colormap
from densessl.data.fashion_mnist import CLASSES
from densessl.data.voc import (VOC_CLASSES, AnnotationError, VOCDetection, VOCSegmentation, multilabel_targets,
                               parse_voc_xml, read_segmentation_png, resolve_classes)



def test_export_reads_back_identically(voc_export):  # tests/conftest.py
    scenes, voc_root = voc_export
    det = VOCDetection(voc_root, "val")
    seg = VOCSegmentation(voc_root, "val")
    assert det.classes == CLASSES and len(det) == len(seg) == len(scenes) == 8 and seg.num_classes == 11
    for i in range(len(scenes)):
        s, d, g = scenes[i], det[i], seg[i]
        assert torch.equal(d["image"], s["image"]) and torch.equal(g["image"], s["image"])
        assert torch.equal(d["boxes"], s["boxes"])
        assert torch.equal(d["classes"], s["classes"])
        assert torch.equal(d["labels"], s["labels"])
        assert not d["difficult"].any() and not d["labels_difficult"].any()
        assert torch.equal(g["mask"], s["semantic"])


def _write_xml(path, objects, size=(40, 30)):
    parts = [f"<annotation><filename>a.png</filename><size><width>{size[0]}</width>"
             f"<height>{size[1]}</height><depth>3</depth></size>"]
    for obj in objects:
        parts.append(f"<object>{obj}</object>")
    parts.append("</annotation>")
    path.write_text("".join(parts))


def _bb(x1, y1, x2, y2):
    return f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>"


def test_parse_converts_one_based_inclusive_boxes_and_difficult(tmp_path):
    p = tmp_path / "a.xml"
    idx = {c: i for i, c in enumerate(VOC_CLASSES)}
    _write_xml(p, [f"<name>dog</name><difficult>0</difficult>{_bb(1, 1, 10, 20)}",
                   f"<name>cat</name><difficult>1</difficult>{_bb(5.0, 6, 5, 6)}",
                   f"<name>dog</name>{_bb(3, 4, 7, 8)}"])  # no <difficult>: not difficult
    a = parse_voc_xml(p, idx)
    assert a["boxes"].tolist() == [[0, 0, 10, 20], [4, 5, 5, 6], [2, 3, 7, 8]]
    assert a["classes"].tolist() == [idx["dog"], idx["cat"], idx["dog"]]
    assert a["difficult"].tolist() == [False, True, False]
    assert a["size"] == (40, 30) and a["filename"] == "a.png"
    labels, diff = multilabel_targets(a["classes"], a["difficult"], 20)
    assert labels[idx["dog"]] == 1 and labels[idx["cat"]] == 0 and labels.sum() == 1
    assert diff[idx["cat"]] and diff.sum() == 1


def test_class_present_as_difficult_and_normal_is_positive():
    labels, diff = multilabel_targets(np.array([2, 2]), np.array([True, False]), 3)
    assert labels.tolist() == [0, 0, 1] and diff.tolist() == [False, False, False]


@pytest.mark.parametrize("obj, message", [
    ("<name>dog</name>", r"object 0 \('dog'\) has no <bndbox>"),
    (f"<name>dog</name>{_bb('ab', 1, 2, 3)}", r"<bndbox>/<xmin> is not a number: 'ab'"),
    ("<name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax></bndbox>", r"<bndbox> lacks <ymax>"),
    (f"<name>unicorn</name>{_bb(1, 1, 2, 2)}", r"unknown class name 'unicorn'"),
    (f"{_bb(1, 1, 2, 2)}", r"object 0 has no <name>"),
    (f"<name>dog</name><difficult>2</difficult>{_bb(1, 1, 2, 2)}", r"<difficult> must be 0 or 1"),
    (f"<name>dog</name>{_bb(5, 1, 2, 2)}", r"empty <bndbox>"),
])
def test_malformed_xml_names_file_and_field(tmp_path, obj, message):
    p = tmp_path / "bad.xml"
    _write_xml(p, [obj])
    with pytest.raises(AnnotationError, match=message) as e:
        parse_voc_xml(p, {c: i for i, c in enumerate(VOC_CLASSES)})
    assert str(p) in str(e.value)


def test_broken_xml_and_missing_files(tmp_path, voc_export):
    voc_root = voc_export[1]
    p = tmp_path / "broken.xml"
    p.write_text("<annotation><object>")
    with pytest.raises(AnnotationError, match="not valid XML"):
        parse_voc_xml(p, {})
    with pytest.raises(AnnotationError, match=r"split file not found \(splits in .*: \['val'\]\)"):
        VOCDetection(voc_root, "train")
    assert resolve_classes(tmp_path) == VOC_CLASSES


def test_segmentation_png_modes_and_ignore(tmp_path):
    idx = np.array([[0, 1, 255], [20, 3, 0]], np.uint8)
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette(voc_colormap().reshape(-1).tolist())
    pal.save(tmp_path / "p.png")
    Image.fromarray(voc_colormap()[idx]).save(tmp_path / "rgb.png")
    for name in ("p.png", "rgb.png"):
        assert read_segmentation_png(tmp_path / name, 21).tolist() == idx.tolist()
    with pytest.raises(AnnotationError, match=r"class index 20 out of range for 11 classes"):
        read_segmentation_png(tmp_path / "p.png", 11)
    bad = voc_colormap()[idx].copy()
    bad[0, 0] = (1, 2, 3)
    Image.fromarray(bad).save(tmp_path / "bad.png")
    with pytest.raises(AnnotationError, match=r"RGB colour \(1, 2, 3\) is not in the VOC colour map"):
        read_segmentation_png(tmp_path / "bad.png")


def _custom_voc(root, images: dict[str, list[str]], splits: dict[str, list[str]]):
    """A VOC folder as LabelImg / CVAT write it: its own class names, no labels.txt."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for sid, names in images.items():
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "JPEGImages" / f"{sid}.png")
        _write_xml(root / "Annotations" / f"{sid}.xml",
                   [f"<name>{n}</name><difficult>0</difficult>{_bb(2, 2, 20, 20)}" for n in names])
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_custom_class_names_are_inferred_from_all_annotations_sorted(tmp_path):
    root = _custom_voc(tmp_path / "cvat", {"a": ["forklift", "pallet"], "b": ["worker"], "c": ["pallet"]},
                       {"train": ["a", "c"], "val": ["b"]})
    train, val = VOCDetection(root, "train"), VOCDetection(root, "val")
    assert train.classes == val.classes == ("forklift", "pallet", "worker")  # every file: both splits agree
    assert "3 annotation files" in train.classes_source and "sorted" in train.classes_source
    assert train[0]["labels"].tolist() == [1.0, 1.0, 0.0] and val[0]["labels"].tolist() == [0.0, 0.0, 1.0]
    voc_names = _custom_voc(tmp_path / "vocnames", {"a": ["dog", "cat"]}, {"train": ["a"]})
    assert VOCDetection(voc_names, "train").classes == VOC_CLASSES  # VOC's own names keep VOC's 20 classes


def test_given_classes_override_and_an_unknown_name_names_the_file(tmp_path):
    root = _custom_voc(tmp_path / "cvat", {"a": ["pallet"], "b": ["worker", "forklift"]}, {"train": ["a", "b"]})
    ds = VOCDetection(root, "train", classes=["worker", "pallet", "forklift", "box"])
    assert ds.classes == ("worker", "pallet", "forklift", "box") and ds.classes_source == "data.classes"
    assert ds[1]["labels"].tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(AnnotationError, match=r"b.xml: object 1: unknown class name 'forklift' .*add it to "
                                              r"data.classes") as e:
        VOCDetection(root, "train", classes=["pallet", "worker"])
    assert str(root / "Annotations" / "b.xml") in str(e.value)
    (root / "labels.txt").write_text("pallet\nworker\n")
    with pytest.raises(AnnotationError, match=r"unknown class name 'forklift' .*add it to .*labels.txt"):
        VOCDetection(root, "train")
    assert VOCDetection(root, "train", classes=["forklift", "pallet", "worker"]).num_classes == 3  # given wins
