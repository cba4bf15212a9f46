import pytest
import torch

from densessl.eval.linear import train_linear_probe


def _separable(n, d=64, c=4, seed=0, scale=1.0):
    """Gaussian clusters around well-separated class means; `scale` mimics a backbone's feature scale."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, d, generator=torch.Generator().manual_seed(123)) * 2
    y = torch.randint(0, c, (n,), generator=g)
    return (means[y] + torch.randn(n, d, generator=g)) * scale + 5 * scale, y


@pytest.mark.parametrize("scale", [1e-3, 1.0, 100.0])
def test_separable_single_label(scale):
    x, y = _separable(600, seed=0, scale=scale)
    xt, yt = _separable(400, seed=1, scale=scale)
    r = train_linear_probe(x, y, xt, yt, multilabel=False, epochs=30)
    assert r["top1"] >= 0.95
    assert r["settings"]["lr"] == 0.01 and r["settings"]["metric"] == "last-epoch"
    assert r["weight"].shape == (4, 64)


def test_separable_multilabel():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(5, 64, generator=g) * 2

    def make(n):
        y = (torch.rand(n, 5, generator=g) < 0.4).float()
        return y @ means + 0.5 * torch.randn(n, 64, generator=g), y

    (x, y), (xt, yt) = make(600), make(400)
    r = train_linear_probe(x, y, xt, yt, multilabel=True, epochs=30)
    assert r["mAP"] >= 0.95 and r["skipped_classes"] == 0 and len(r["ap_per_class"]) == 5


def test_deterministic_given_seed():
    x, y = _separable(300, seed=0)
    xt, yt = _separable(100, seed=1)
    a = train_linear_probe(x, y, xt, yt, multilabel=False, epochs=5, batch_size=32, seed=3)
    b = train_linear_probe(x, y, xt, yt, multilabel=False, epochs=5, batch_size=32, seed=3)
    c = train_linear_probe(x, y, xt, yt, multilabel=False, epochs=5, batch_size=32, seed=4)
    assert torch.equal(a["weight"], b["weight"]) and torch.equal(a["bias"], b["bias"])
    assert a["top1"] == b["top1"] and a["train_loss_last"] == b["train_loss_last"]
    assert not torch.equal(a["weight"], c["weight"])


def test_random_labels_give_chance_accuracy():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(1000, 64, generator=g), torch.randn(2000, 64, generator=g)
    y, yt = torch.randint(0, 2, (1000,), generator=g), torch.randint(0, 2, (2000,), generator=g)
    r = train_linear_probe(x, y, xt, yt, multilabel=False, epochs=20)
    assert abs(r["top1"] - 0.5) < 0.05  # 2000 test samples: std of chance accuracy ~0.011


def test_accepts_inference_mode_features_and_validates():
    x, y = _separable(100, seed=0)
    with torch.inference_mode():
        xi = x.clone()
    r = train_linear_probe(xi, y, xi, y, multilabel=False, epochs=2)
    assert 0.0 <= r["top1"] <= 1.0
    with pytest.raises(ValueError, match="multi-hot"):
        train_linear_probe(x, y, x, y, multilabel=True)
    with pytest.raises(ValueError, match="integer class indices"):
        train_linear_probe(x, y.float(), x, y, multilabel=False)
    with pytest.raises(ValueError, match="NaN"):
        train_linear_probe(x * float("nan"), y, x, y, multilabel=False)
