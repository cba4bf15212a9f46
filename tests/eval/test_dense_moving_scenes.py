"""The dense probes read MovingScenes frames (the optical-flow variant's data): the labels are the
frames' semantic maps, and the region probe reports that there are no boxes."""
import torch

from densessl.data.moving_scenes import moving_scenes_segmentation
from densessl.eval.dense.config import dense_config
from densessl.eval.dense.data import dense_dataset
from densessl.eval.dense.run import evaluate_dense


def test_moving_scene_items_carry_the_frames_semantic_maps_and_no_boxes():
    cfg = dense_config(["data.dataset=moving_scenes", "data.size=32", "num_train=6", "num_test=4"])
    items, classes = dense_dataset(cfg, "val")
    frames, names = moving_scenes_segmentation("val", 4, 32, cfg.data.seed, None)
    assert classes == names and classes[0] == "background" and len(items) == 4
    for k in range(4):
        assert torch.equal(items[k]["image"], frames[k]["image"])
        assert torch.equal(items[k]["label"].long(), frames[k]["mask"].long())
        assert items[k]["boxes"].shape == (0, 4) and items[k]["classes"].numel() == 0
    assert any(int(items[k]["label"].max()) > 0 for k in range(4))  # items are visible in the frames


def test_the_region_probe_skips_moving_scenes_for_want_of_boxes():
    cfg = dense_config(["data.dataset=moving_scenes", "data.size=32", "num_train=6", "num_test=4", "model.width=8",
                        "data.num_workers=0", "region.stages=[c4]", "k=3", "epochs=2"])
    result = evaluate_dense("random", ["region"], cfg, log=lambda *a: None)
    assert "no ground-truth boxes" in result["region"]["skipped"]
