import torch

from densessl.eval.dense.config import DenseConfig
from densessl.eval.dense.features import DenseSplit
from densessl.eval.dense.region import roi_features, run_region, size_bin, size_thresholds


def _quadrants():
    """(1, 1, 8, 8) map, stride 4 on a 32-px image: top-left cells 1, top-right 2, bottom-left 3,
    bottom-right 4."""
    m = torch.zeros(1, 1, 8, 8)
    m[..., :4, :4], m[..., :4, 4:], m[..., 4:, :4], m[..., 4:, 4:] = 1, 2, 3, 4
    return m


def test_roi_align_pools_the_features_inside_known_boxes():
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0],    # top-left quadrant of the image
                          [16.0, 0.0, 32.0, 16.0],   # top-right
                          [4.0, 20.0, 12.0, 28.0],   # inside bottom-left
                          [20.0, 20.0, 30.0, 30.0],  # inside bottom-right
                          [8.0, 8.0, 24.0, 24.0]])   # centred: half of each quadrant
    out = roi_features(_quadrants(), [boxes], image_size=32)
    torch.testing.assert_close(out[:, 0], torch.tensor([1.0, 2.0, 3.0, 4.0, 2.5]))
    # two images, boxes per image; an image without boxes contributes none
    two = torch.cat([_quadrants(), 10 * _quadrants()])
    out = roi_features(two, [torch.zeros(0, 4), boxes[:2]], image_size=32)
    torch.testing.assert_close(out[:, 0], torch.tensor([10.0, 20.0]))


def test_size_bins_by_training_terciles_and_coco_thresholds():
    t1, t2 = size_thresholds(torch.tensor([1.0, 2, 3, 4, 5, 6, 7]), "terciles")
    assert (t1, t2) == (3.0, 5.0)
    assert size_bin(torch.tensor([2.9, 3.0, 4.9, 5.0, 100.0]), t1, t2).tolist() == [0, 1, 1, 2, 2]
    assert size_thresholds(torch.tensor([1.0]), "coco") == (1024.0, 9216.0)


def _split(n, seed):
    """32-px images with one or two boxes each; the C4 map (stride 4) holds a one-hot of the
    box's class inside each box (so every box is recognisable), zero elsewhere."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.zeros(n, 4, 8, 8)
    boxes, classes = [], []
    for i in range(n):
        b = torch.tensor([[0.0, 0.0, 12.0, 12.0], [16.0, 16.0, 32.0, 32.0]])[: 1 + i % 2]
        c = torch.randint(0, 3, (len(b),), generator=g)
        for (x1, y1, x2, y2), k in zip(b.long().tolist(), c.tolist()):
            feats[i, k, y1 // 4:y2 // 4, x1 // 4:x2 // 4] = 1.0
        boxes.append(b)
        classes.append(c)
    labels = torch.zeros(n, 32, 32, dtype=torch.uint8)
    return DenseSplit({"c4": feats, "c5": feats[..., ::2, ::2]}, labels, boxes, classes, ("background", "a", "b", "c"))


def test_region_probe_recognises_separable_boxes_overall_and_by_size():
    cfg = DenseConfig(epochs=30, k=3)
    cfg.region.stages = ["c4", "c4+c5"]
    out = run_region(_split(40, 0), _split(12, 1), cfg)
    for name in ("c4", "c4+c5"):
        assert out["acc"][name] == {"linear": 1.0, "knn": 1.0}
    r = out["results"]["c4+c5"]
    assert r["dim"] == 8 and r["linear"]["acc_by_size"]["large"] == 1.0
    s = out["settings"]
    assert s["train_boxes"] == 60 and s["val_boxes"] == 18 and sum(s["val_boxes_per_bin"].values()) == 18
    # no boxes: a reported skip, not an error
    empty = _split(4, 2)
    empty.boxes, empty.classes = [torch.zeros(0, 4)] * 4, [torch.zeros(0, dtype=torch.long)] * 4
    assert "skipped" in run_region(empty, empty, cfg)
