import json

import pytest
import torch

from densessl.eval.detection import (FPNBackbone, _train_target, apply_freeze_at, coco_box_ap, detection_config,
                                     run_detection)
from densessl.models.backbones import build_backbone

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TINY = ["model.width=8", "data.num_train=8", "data.num_val=8", "data.size=32", "min_size=[32]", "max_size=32",
        "iterations=3", "batch_size=4", "log_every=0", "fpn_channels=16", "representation_size=32",
        "warmup_iters=2", "steps=[2]", "eval_batch_size=8"]


def _gt(boxes, ignore=None):
    ignore = ignore or [0] * len(boxes)
    return {"images": [{"id": 1, "width": 64, "height": 64}],
            "annotations": [{"id": k + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3],
                             "iscrowd": ig} for k, ((c, b), ig) in enumerate(zip(boxes, ignore))],
            "categories": [{"id": 1}, {"id": 2}]}


def test_coco_ap_perfect_empty_and_ignored():
    boxes = [(1, [2, 2, 20, 20]), (2, [30, 30, 20, 25])]
    perfect = [{"image_id": 1, "category_id": c, "bbox": b, "score": 0.9} for c, b in boxes]
    r = coco_box_ap(_gt(boxes), perfect)
    assert r["AP"] == pytest.approx(100.0) and r["AP50"] == pytest.approx(100.0) and r["AP75"] == pytest.approx(100.0)
    assert coco_box_ap(_gt(boxes), [])["AP"] == 0.0
    # an ignored (difficult / crowd) object that is never detected does not lower AP
    boxes3 = boxes + [(1, [40, 2, 10, 10])]
    assert coco_box_ap(_gt(boxes3, [0, 0, 1]), perfect)["AP"] == pytest.approx(100.0)
    assert coco_box_ap(_gt(boxes3), perfect)["AP"] < 100.0
    # a box shifted by half its width: IoU 1/3, below AP50
    shifted = [{"image_id": 1, "category_id": 1, "bbox": [12, 2, 20, 20], "score": 0.9}, perfect[1]]
    assert coco_box_ap(_gt(boxes), shifted)["AP50"] == pytest.approx(50.0)


def test_train_target_flip_and_filters():
    item = {"image": torch.zeros(3, 10, 20, dtype=torch.uint8),
            "boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0], [3.0, 3.0, 3.0, 8.0], [0.0, 0.0, 20.0, 10.0]]),
            "classes": torch.tensor([0, 1, 2]), "train_keep": torch.tensor([True, True, False]),
            "eval_ignore": torch.zeros(3, dtype=torch.bool)}
    image, t = _train_target(item, flip=True)
    assert image.shape == (3, 10, 20) and image.dtype == torch.float32
    # box 1 is degenerate (zero width), box 2 not kept; box 0 mirrored in x: [20-5, 2, 20-1, 6]
    assert t["boxes"].tolist() == [[15.0, 2.0, 19.0, 6.0]] and t["labels"].tolist() == [1]


def test_fpn_backbone_levels_and_freeze_at():
    from torchvision.ops.misc import FrozenBatchNorm2d

    b = build_backbone("resnet18_small", 8)
    out = FPNBackbone(b, 16)(torch.randn(2, 3, 32, 32))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [v.shape[-1] for v in out.values()] == [16, 8, 4, 2, 1] and all(v.shape[1] == 16 for v in out.values())
    apply_freeze_at(b, 2)
    trainable = {n.split(".")[0] for n, p in b.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}  # frozen BN keeps its affine as buffers
    assert isinstance(b.bn1, FrozenBatchNorm2d) and isinstance(b.layer1[0].bn1, FrozenBatchNorm2d)
    assert all(p.requires_grad for p in b.layer2.parameters())


@pytest.mark.parametrize("extra", [[], ["box_head=4conv1fc", "norm=frozen", "freeze_at=1"]])
def test_tiny_end_to_end_on_scenes(extra):
    r = run_detection("random", detection_config(TINY + extra), log=lambda *a: None)["detection"]
    for k in ("AP", "AP50", "AP75"):
        assert 0.0 <= r[k] <= 100.0
    assert r["AP50"] >= r["AP75"] and r["settings"]["num_classes"] == 10
    assert r["settings"]["metric"].startswith("COCO bbox AP")


@pytest.mark.parametrize("fmt", ["voc", "coco"])
def test_exported_folders_and_cli(tmp_path, fmt):
    from densessl.cli import main
    from densessl.data.export import export_coco, export_voc
    from densessl.data.scenes import FashionScenes

    root = tmp_path / fmt
    write = export_voc if fmt == "voc" else export_coco
    write(FashionScenes("train", num_scenes=6, size=32, seed=2), root, "train", image_ext="png")
    write(FashionScenes("val", num_scenes=4, size=32, seed=2), root, "val", image_ext="png")
    out = tmp_path / "det.json"
    assert main(["eval", "detection", "random", *TINY, f"data.dataset={fmt}", f"data.root={root}",
                 f"out={out}"]) == 0
    r = json.loads(out.read_text())["detection"]
    assert r["settings"]["train_images"] == 6 and r["settings"]["val_images"] == 4
    assert 0.0 <= r["AP"] <= 100.0


def test_presets():
    cfg = detection_config(["preset=coco-1x"])
    assert cfg.iterations == 90000 and cfg.steps == [60000, 80000] and cfg.box_head == "4conv1fc"
    assert cfg.data.dataset == "coco" and cfg.model.backbone == "resnet50"
    cfg = detection_config(["preset=voc0712", "data.root=/x/VOC2007", "data.extra_roots=[/x/VOC2012]"])
    assert cfg.steps == [18000, 22000] and cfg.data.extra_roots == ["/x/VOC2012"] and cfg.data.val_split == "test"


def test_checkpoint_spec_writes_next_to_the_run(tmp_path):
    from densessl.cli import main
    from densessl.interop import save_imported

    torch.manual_seed(0)
    ckpt = save_imported(build_backbone("resnet18_small", 8), tmp_path / "run" / "checkpoints" / "last.pt")
    args = [a for a in TINY if not a.startswith("model.")]
    assert main(["eval", "detection", str(ckpt), *args, "data.num_workers=1"]) == 0
    r = json.loads((tmp_path / "run" / "eval" / "detection.json").read_text())
    assert r["backbone"] == str(ckpt) and r["detection"]["settings"]["model"] == {
        "backbone": "resnet18_small", "width": 8, "zero_init_residual": False}
