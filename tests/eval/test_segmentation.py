import json
import math

import pytest
import torch
import torchvision

from densessl.eval.segmentation import (SegmentationModel, confusion_matrix, run_segmentation, segmentation_config,
                                        segmentation_metrics, set_output_stride)
from densessl.models.backbones import build_backbone

TINY = ["model.width=8", "data.num_train=8", "data.num_val=8", "data.size=32", "crop_size=32", "iterations=3",
        "batch_size=4", "log_every=0", "eval_batch_size=8"]


def test_miou_against_a_hand_computed_confusion_matrix():
    target = torch.tensor([[0, 0, 1, 1],
                           [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 2, 2]])
    cm = confusion_matrix(pred, target, 4)
    # rows = ground truth, columns = prediction; the 255 pixel is not counted; class 3 never occurs
    assert cm.tolist() == [[1, 1, 0, 0],
                           [0, 2, 1, 0],
                           [1, 0, 1, 0],
                           [0, 0, 0, 0]]
    m = segmentation_metrics(cm)
    # IoU = TP / (TP + FP + FN): class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (3 + 3 - 2) = 1/2;
    # class 2: 1 / (2 + 2 - 1) = 1/3; class 3: no pixels in ground truth or prediction -> skipped
    assert m["iou_per_class"][:3] == pytest.approx([1 / 3, 1 / 2, 1 / 3])
    assert math.isnan(m["iou_per_class"][3]) and m["classes_scored"] == 3
    assert m["mIoU"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert m["pixel_acc"] == pytest.approx(4 / 7)
    assert m["mean_acc"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)


def test_confusion_matrix_refuses_out_of_range_targets():
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 3\) or be 255"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)


def test_perfect_prediction_gives_miou_one():
    t = torch.randint(0, 5, (3, 16, 16))
    assert segmentation_metrics(confusion_matrix(t, t, 5))["mIoU"] == 1.0


def test_output_stride_matches_torchvision_dilation():
    tv = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    b = build_backbone("resnet50")
    b.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    assert set_output_stride(b, 8) == 8
    tv.fc, tv.avgpool = torch.nn.Identity(), torch.nn.Identity()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        c5 = b.eval()(x)["c5"]
    assert c5.shape == (1, 2048, 8, 8) and torch.allclose(c5.flatten(), tv(x), atol=1e-5)
    small = build_backbone("resnet18_small", 8)
    assert set_output_stride(small, 4) == 4 and small(torch.randn(1, 3, 32, 32))["c5"].shape[-1] == 8


def test_c4_c5_model_shapes():
    m = SegmentationModel(build_backbone("resnet18_small", 8), 11, head="deeplabv3", stages=("c4", "c5"),
                          aspp_rates=(1, 2, 3))
    m.train()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 11, 32, 32)


@pytest.mark.parametrize("frozen", [False, True])
def test_tiny_end_to_end(frozen):
    cfg = segmentation_config(TINY + [f"freeze_backbone={str(frozen).lower()}"])
    r = run_segmentation("random", cfg, log=lambda *a: None)["segmentation"]
    assert 0.0 <= r["mIoU"] <= 1.0 and 0.0 <= r["pixel_acc"] <= 1.0
    assert len(r["iou_per_class"]) == 11 and r["settings"]["backbone_frozen"] is frozen
    assert sum(map(sum, r["confusion_matrix"])) == 8 * 32 * 32


def test_frozen_backbone_is_not_changed():
    from densessl.eval.transfer import TransferData, build_task_dataset

    torch.manual_seed(0)
    backbone = build_backbone("resnet18_small", 8)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = SegmentationModel(backbone, 11)
    model.freeze_backbone()
    model.train()
    assert not backbone.training and model.head.training
    ds, _ = build_task_dataset(TransferData(num_train=4, size=32), "train", "segmentation")
    x = torch.stack([ds[i]["image"] for i in range(4)]).float() / 255
    y = torch.stack([ds[i]["mask"] for i in range(4)])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


def test_voc_export_and_cli(tmp_path):
    from densessl.cli import main
    from densessl.data.export import export_voc
    from densessl.data.scenes import FashionScenes

    root = tmp_path / "voc"
    export_voc(FashionScenes("train", num_scenes=6, size=32, seed=1), root, "train", image_ext="png")
    export_voc(FashionScenes("val", num_scenes=4, size=32, seed=1), root, "val", image_ext="png")
    out = tmp_path / "seg.json"
    assert main(["eval", "segmentation", "random", *TINY, "data.dataset=voc", f"data.root={root}",
                 "eval_batch_size=3", f"out={out}"]) == 0
    r = json.loads(out.read_text())["segmentation"]
    assert r["settings"]["train_images"] == 6 and r["settings"]["val_images"] == 4
    assert list(r["iou_per_class"])[:2] == ["background", "T-shirt/top"]


def test_presets_and_unknown_keys():
    from densessl.config import ConfigError

    cfg = segmentation_config(["preset=voc-fcn", "iterations=5"])
    assert cfg.output_stride == 8 and cfg.crop_size == 512 and cfg.iterations == 5 and cfg.preset == "voc-fcn"
    assert segmentation_config(["preset=frozen-deeplabv3"]).freeze_backbone is True
    with pytest.raises(ConfigError, match="unknown preset 'voc'"):
        segmentation_config(["preset=voc"])
    with pytest.raises(ConfigError, match=r"unknown key 'iteration'; did you mean 'iterations'"):
        segmentation_config(["iteration=5"])


def test_sample_stream_does_not_depend_on_workers():
    from densessl.eval.segmentation import SegmentationTask, _stack
    from densessl.eval.transfer import SampleStream, TransferData, build_task_dataset, stream_loader

    ds, _ = build_task_dataset(TransferData(num_train=5, size=32), "train", "segmentation")
    task = SegmentationTask(segmentation_config(["crop_size=24", "scale_range=[0.8,1.2]", "flip=true"]))
    stream = SampleStream(ds, 12, 3, task.transform)
    assert sorted(stream.order[:5].tolist()) == list(range(5))  # each pass is a permutation
    a = [b for b in stream_loader(stream, 4, 0, _stack)]
    b = [b for b in stream_loader(stream, 4, 2, _stack)]
    assert len(a) == 3 and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert a[0][0].shape == (4, 3, 24, 24)
