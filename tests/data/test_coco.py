import json

import pytest
import torch

from densessl.data.coco import COCODataset, coco_paths, load_coco_json
from densessl.data.fashion_mnist import CLASSES
from densessl.data.voc import AnnotationError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_export_reads_back_identically(coco_export):  # tests/conftest.py
    scenes, coco_root = coco_export
    ann, images = coco_paths(coco_root, "val")
    ds = COCODataset(ann, images, with_masks=True)
    assert ds.classes == CLASSES and ds.cat_ids == list(range(1, 11)) and len(ds) == len(scenes) == 8
    for i in range(len(scenes)):
        s, c = scenes[i], ds[i]
        assert torch.equal(c["image"], s["image"])
        assert torch.equal(c["boxes"], s["boxes"])
        assert torch.equal(c["classes"], s["classes"])
        assert torch.equal(c["labels"], s["labels"])
        assert torch.equal(c["masks"], s["masks"])
        assert torch.equal(c["semantic"], s["semantic"])
        assert not c["iscrowd"].any() and c["image_id"] == i + 1


def _base():
    return {"images": [{"id": 7, "file_name": "a.png", "width": 4, "height": 3}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 5, "bbox": [1, 0, 2, 3], "iscrowd": 0,
                             "segmentation": [[1, 0, 3, 0, 3, 3, 1, 3]]}],
            "categories": [{"id": 5, "name": "b"}, {"id": 2, "name": "a"}]}


def test_category_ids_map_to_contiguous_indices_and_xywh_to_xyxy(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (4, 3)).save(tmp_path / "img" / "a.png")
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(_base()))
    ds = COCODataset(p, tmp_path / "img", with_masks=True)
    assert ds.classes == ("a", "b") and ds.cat_ids == [2, 5]
    item = ds[0]
    assert item["boxes"].tolist() == [[1, 0, 3, 3]] and item["classes"].tolist() == [1]
    assert item["labels"].tolist() == [0, 1] and item["image"].shape == (3, 3, 4)
    assert item["masks"].shape == (1, 3, 4) and item["semantic"].max() == 2


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("annotations"), r"missing 'annotations' key"),
    (lambda d: d["annotations"][0].update(image_id=99), r"annotations\[0\] \(id 1\): unknown image id 99"),
    (lambda d: d["annotations"][0].update(category_id=3), r"unknown category id 3"),
    (lambda d: d["annotations"][0].update(bbox=[1, "x", 2, 3]), r"'bbox' has a non-numeric value"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2]), r"'bbox' must be \[x, y, w, h\]"),
    (lambda d: d["annotations"][0].pop("category_id"), r"annotations\[0\] \(id 1\) has no 'category_id'"),
    (lambda d: d["images"].append({"id": 7, "file_name": "b.png"}), r"images\[1\]: duplicate image id 7"),
    (lambda d: d["images"][0].pop("file_name"), r"images\[0\] has no 'file_name'"),
])
def test_malformed_json_names_file_and_field(tmp_path, edit, message):
    data = _base()
    edit(data)
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=message) as e:
        load_coco_json(p)
    assert str(p) in str(e.value)


def test_not_json_and_missing(tmp_path):
    p = tmp_path / "ann.json"
    p.write_text("{oops")
    with pytest.raises(AnnotationError, match="not valid JSON"):
        load_coco_json(p)
    with pytest.raises(AnnotationError, match="not found"):
        load_coco_json(tmp_path / "none.json")
