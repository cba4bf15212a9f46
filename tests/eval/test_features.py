import pytest
import torch

from densessl.data.augment import normalize
from densessl.eval.features import extract_features
from densessl.eval.linear import train_linear_probe
from densessl.models.backbones import build_backbone


class _Toy(torch.utils.data.Dataset):
    """Items with a target and extra variable-shape keys that the collate must drop."""

    def __init__(self, n=10, multilabel=True):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        self.multilabel = multilabel

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        item = {"image": self.images[i], "boxes": torch.zeros(i % 3 + 1, 4), "path": f"img{i}.png"}
        if self.multilabel:
            item["labels"] = torch.tensor([i % 2, 1 - i % 2, 1], dtype=torch.float32)
        else:
            item["label"] = torch.tensor(i % 4)
        return item


def _backbone():
    torch.manual_seed(0)
    return build_backbone("resnet18_small", width=8)


def test_matches_direct_forward_and_restores_mode():
    bb, ds = _backbone(), _Toy(10)
    bb.train()
    feats, targets = extract_features(bb, ds, batch_size=4)
    assert bb.training  # previous mode restored
    assert feats.shape == (10, bb.out_dim) and feats.dtype == torch.float32
    assert targets.shape == (10, 3) and targets[1].tolist() == [1.0, 0.0, 1.0]
    bb.eval()
    with torch.no_grad():
        expected = bb.pool(normalize(ds.images))
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-5)
    # Eval mode: BN running statistics are used and not updated by extraction.
    assert torch.equal(bb.bn1.running_mean, torch.zeros_like(bb.bn1.running_mean))


def test_int_labels_autocast_and_usable_for_training():
    bb, ds = _backbone(), _Toy(8, multilabel=False)
    bb.eval()
    feats, labels = extract_features(bb, ds, batch_size=3, target_key="label", autocast_dtype=torch.bfloat16)
    assert not bb.training
    assert feats.dtype == torch.float32 and labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3] * 2
    ref, _ = extract_features(bb, ds, batch_size=8, target_key="label")
    torch.testing.assert_close(feats, ref, rtol=0.1, atol=0.1)
    # Features and targets are ordinary tensors (not inference tensors): usable with autograd.
    assert not feats.is_inference() and not labels.is_inference()
    r = train_linear_probe(feats, labels, feats, labels, multilabel=False, epochs=1, standardize=False)
    assert "top1" in r


def test_missing_target_key_is_a_clear_error():
    with pytest.raises(KeyError, match="no 'labels' key"):
        extract_features(_backbone(), _Toy(4, multilabel=False), batch_size=2)
    feats, targets = extract_features(_backbone(), _Toy(4, multilabel=False), batch_size=2, target_key=None)
    assert feats.shape[0] == 4 and targets is None


def test_recompute_bn_stats_gives_the_data_statistics_and_keeps_weights():
    from densessl.data.augment import normalize
    from densessl.eval.features import recompute_bn_stats
    from densessl.models.backbones import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("resnet18_small", 8).eval()
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    dataset = [{"image": im} for im in images]
    weights = {k: v.clone() for k, v in backbone.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert torch.equal(backbone.bn1.running_mean, torch.zeros(8))  # as initialised: un-normalised

    recompute_bn_stats(backbone, dataset, batch_size=6)  # one batch: the statistics are exact
    with torch.no_grad():
        x = backbone.conv1(normalize(images))
    torch.testing.assert_close(backbone.bn1.running_mean, x.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(backbone.bn1.running_var, x.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    assert not backbone.training and backbone.bn1.momentum == 0.1  # mode and momentum restored
    for k, v in weights.items():
        assert torch.equal(backbone.state_dict()[k], v), k
