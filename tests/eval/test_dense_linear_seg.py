import torch

from densessl.eval.dense.config import LinearSegConfig
from densessl.eval.dense.features import DenseSplit
from densessl.eval.dense.linear_seg import linear_seg_probe

NAMES = ("background", "a", "b", "c")


def _split(n, seed, ignore=0.0, garbage_labels=False):
    """Linearly separable cells: each cell's feature is its class's fixed random direction plus a
    little noise (16 channels), labels the cells' classes upsampled 2x (blocks of 2x2 pixels);
    ``ignore`` of the pixels are 255."""
    g = torch.Generator().manual_seed(seed)
    directions = 3.0 * torch.randn(4, 16, generator=torch.Generator().manual_seed(99))
    cells = torch.randint(0, 4, (n, 4, 4), generator=g)
    feats = directions[cells].permute(0, 3, 1, 2) + 0.1 * torch.randn(n, 16, 4, 4, generator=g)
    labels = cells.repeat_interleave(2, 1).repeat_interleave(2, 2)
    if garbage_labels:
        labels = torch.randint(0, 4, labels.shape, generator=g)
    labels[torch.rand(labels.shape, generator=g) < ignore] = 255
    c5 = torch.randn(n, 8, 2, 2, generator=g)  # a second stage, coarser (upsampled to 4x4 when concatenated)
    return DenseSplit({"c4": feats, "c5": c5}, labels.to(torch.uint8), [torch.zeros(0, 4)] * n,
                      [torch.zeros(0, dtype=torch.long)] * n, NAMES)


def _cfg(**kw):
    return LinearSegConfig(**{"epochs": 15, "batch_size": 16, "lr_grid": [1e-3, 1e-1], **kw})


def test_linearly_separable_features_reach_full_miou_with_ignored_pixels():
    train, val = _split(64, 0, ignore=0.3), _split(16, 1)
    out = linear_seg_probe(train, val, ("c4",), _cfg(), seed=0, device="cpu")
    assert out["mIoU"] > 0.99 and out["fg_mIoU"] > 0.99 and out["pixel_acc"] > 0.99
    assert out["lr"] == 0.1 and set(out["holdout_mIoU"]) == {"0.001", "0.1"}
    assert out["holdout_mIoU"]["0.1"] > out["holdout_mIoU"]["0.001"]
    # several stages: c5 upsampled to C4's 4x4 and concatenated; still separable
    both = linear_seg_probe(train, val, ("c4", "c5"), _cfg(lr_grid=[1e-1]), seed=0, device="cpu")
    assert both["mIoU"] > 0.99


def test_the_lr_is_chosen_on_training_images_never_on_the_validation_split():
    train = _split(48, 0)
    good = linear_seg_probe(train, _split(16, 1), ("c4",), _cfg(epochs=3), seed=0, device="cpu")
    garbage = linear_seg_probe(train, _split(16, 1, garbage_labels=True), ("c4",), _cfg(epochs=3), seed=0,
                               device="cpu")
    assert good["lr"] == garbage["lr"] and good["holdout_mIoU"] == garbage["holdout_mIoU"]
    assert good["mIoU"] > 0.9 > garbage["mIoU"]


def test_the_per_stage_head_equals_bn_and_1x1_conv_on_the_upsampled_concatenation():
    """With the same BatchNorm statistics (eval mode), summing upsampled per-stage logits is
    exactly BN + 1x1 conv on the stages upsampled to the finest and concatenated."""
    from torch.nn import functional as F

    from densessl.eval.dense.linear_seg import BNLinearHead

    g = torch.Generator().manual_seed(0)
    c4, c5 = torch.randn(2, 6, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g)
    head = BNLinearHead([6, 5], 3, g)
    with torch.no_grad():
        for bn in head.bns:
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=g))
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            bn.weight.copy_(torch.randn(n, generator=g))
            bn.bias.copy_(torch.randn(n, generator=g))
        head.bias.copy_(torch.randn(3, generator=g))
    head.eval()
    x = torch.cat([c4, F.interpolate(c5, size=(4, 4), mode="bilinear", align_corners=False)], 1)
    mean = torch.cat([bn.running_mean for bn in head.bns])
    var = torch.cat([bn.running_var for bn in head.bns])
    gamma, beta = torch.cat([bn.weight for bn in head.bns]), torch.cat([bn.bias for bn in head.bns])
    y = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5) * gamma[:, None, None] + beta[:, None, None]
    ref = F.conv2d(y, head.weight[:, :, None, None], head.bias)
    ref = F.interpolate(ref, size=(8, 8), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(head([c4, c5], (8, 8)), ref)
