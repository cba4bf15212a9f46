import copy
import pickle
import re

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from densessl.eval.backbone import load_backbone_file, load_checkpoint_backbone
from densessl.interop import (LAYOUTS, InteropError, detectron2_key, export_backbone, import_official,
                              read_file, save_imported, torchvision_key_from_detectron2)
from densessl.models.backbones import build_backbone

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.num_batches_tracked.fill_(7)
    return module.eval()


class _Backbones(dict):
    """densessl backbones with random weights and BN statistics, built on first use."""

    def __missing__(self, name):
        torch.manual_seed(0)
        self[name] = _randomize_bn(build_backbone(name, 8 if name.endswith("_small") else None))
        return self[name]


@pytest.fixture(scope="module")
def backbones():
    return _Backbones()


def _features(backbone, x):
    with torch.no_grad():
        return backbone.eval()(x)


def _same_features(a, b, size=64):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    fa, fb = _features(a, x), _features(b, x)
    return all(torch.equal(fa[k], fb[k]) for k in fa)


# ---------------------------------------------------------------- exports into the real consumers


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_export_loads_strictly(backbones, tmp_path, arch):
    b = backbones[arch]
    path = export_backbone(b, "torchvision", tmp_path / f"{arch}.pth")
    state = torch.load(path, weights_only=True)
    net = getattr(torchvision.models, arch)()
    net.fc = nn.Identity()
    net.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = b.pool(x)  # densessl computes 2x2-map convs as GEMMs: same weights, fp32 rounding apart
        assert torch.allclose(net.eval()(x), ref, rtol=1e-5, atol=1e-6 * ref.abs().max())
    fresh = getattr(torchvision.models, arch)()  # with a fresh classifier: exactly fc.* missing
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_timm_export_loads_strictly(backbones, tmp_path, arch):
    timm = pytest.importorskip("timm")
    b = backbones[arch]
    path = export_backbone(b, "timm", tmp_path / f"{arch}.pth")
    net = timm.create_model(arch, pretrained=False, num_classes=0)
    net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = b(x, stages=("c5",))["c5"]
        assert torch.allclose(net.eval().forward_features(x), ref, rtol=1e-5, atol=1e-6 * ref.abs().max())


def _detectron2_expected(arch: str) -> dict[str, tuple]:
    """Key -> shape of detectron2's ResNet backbone (FrozenBN), written from its architecture:
    stem conv 7x7 -> 64; res2..res5 with blocks [3,4,6,3] (R-50 bottleneck, 64*2^i bottleneck
    channels, 4x expansion) or [2,2,2,2] (R-18 basic); a shortcut when the channels change."""
    keys = {}

    def conv(name, cout, cin, k):
        keys[f"{name}.weight"] = (cout, cin, k, k)
        for p in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.norm.{p}"] = (cout,)

    conv("stem.conv1", 64, 3, 7)
    cin = 64
    for s, n in zip(range(2, 6), [3, 4, 6, 3] if arch == "resnet50" else [2, 2, 2, 2]):
        mid = 64 * 2 ** (s - 2)
        cout = 4 * mid if arch == "resnet50" else mid
        for i in range(n):
            name = f"res{s}.{i}"
            if i == 0 and cin != cout:
                conv(f"{name}.shortcut", cout, cin, 1)
            if arch == "resnet50":
                conv(f"{name}.conv1", mid, cin, 1)
                conv(f"{name}.conv2", mid, mid, 3)
                conv(f"{name}.conv3", cout, mid, 1)
            else:
                conv(f"{name}.conv1", mid, cin, 3)
                conv(f"{name}.conv2", mid, mid, 3)
            cin = cout
    return keys


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_detectron2_pickle_has_exactly_detectron2_keys(backbones, tmp_path, arch):
    path = export_backbone(backbones[arch], "detectron2", tmp_path / f"{arch}.pkl")
    with open(path, "rb") as f:
        obj = pickle.load(f)  # what detectron2's checkpointer does
    assert obj["__author__"] == "densessl" and obj["matching_heuristics"] is True
    expected = _detectron2_expected(arch)
    got = {k: v.shape for k, v in obj["model"].items()}
    assert got == expected
    assert all(isinstance(v, np.ndarray) for v in obj["model"].values())
    assert "res2.0.conv1.norm.weight" in got and "stem.conv1.norm.running_mean" in got
    if arch == "resnet50":
        assert "res2.0.shortcut.weight" in got and "res5.2.conv3.norm.running_var" in got
    sd = backbones[arch].state_dict()
    assert np.array_equal(obj["model"]["res3.0.shortcut.norm.running_mean"], sd["layer2.0.downsample.1.running_mean"].numpy())


def test_detectron2_renaming_rules():
    assert detectron2_key("conv1.weight") == "stem.conv1.weight"
    assert detectron2_key("bn1.running_var") == "stem.conv1.norm.running_var"
    assert detectron2_key("layer1.0.bn3.bias") == "res2.0.conv3.norm.bias"
    assert detectron2_key("layer4.0.downsample.0.weight") == "res5.0.shortcut.weight"
    assert detectron2_key("layer4.0.downsample.1.weight") == "res5.0.shortcut.norm.weight"
    assert detectron2_key("layer2.1.bn1.num_batches_tracked") is None
    for k in torchvision.models.resnet50().state_dict():
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked"):
            assert torchvision_key_from_detectron2(detectron2_key(k)) == k


@pytest.mark.parametrize("fmt", ["torchvision", "timm", "detectron2"])
def test_small_backbone_is_refused_for_torchvision_formats(backbones, tmp_path, fmt):
    with pytest.raises(InteropError, match=r"cannot export backbone 'resnet18_small' to .*not a torchvision "
                                           r"architecture.*safetensors"):
        export_backbone(backbones["resnet18_small"], fmt, tmp_path / "x.pth")


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch, fmt, layout", [
    ("resnet18_small", "safetensors", "densessl"), ("resnet18", "safetensors", "densessl"),
    ("resnet18", "torchvision", "torchvision"),
    ("resnet50", "torchvision", "torchvision"),
    ("resnet18", "detectron2", "detectron2"),
])
def test_export_import_gives_identical_features(backbones, tmp_path, arch, fmt, layout):
    ext = {"safetensors": "safetensors", "torchvision": "pth", "detectron2": "pkl"}[fmt]
    path = export_backbone(backbones[arch], fmt, tmp_path / f"b.{ext}")
    back, report = import_official(path, layout)
    assert back.name == arch and _same_features(back, backbones[arch])
    if fmt == "detectron2":  # num_batches_tracked is not exported: tolerated, reported
        assert report.filled and "num_batches_tracked" in report.summary()


def test_imported_checkpoint_is_a_densessl_checkpoint(backbones, tmp_path):
    path = save_imported(backbones["resnet18_small"], tmp_path / "imp.pt", source="test")
    back, cfg = load_checkpoint_backbone(path)
    assert cfg.model.backbone == "resnet18_small" and cfg.model.width == 8
    assert _same_features(back, backbones["resnet18_small"])
    assert _same_features(load_backbone_file(path), back)


# ---------------------------------------------------------------- official layouts (synthetic)


_TV_CACHE = {}


def _tv(arch="resnet18", seed=1):
    """A torchvision ResNet with random weights and BN statistics (built once per arch/seed)."""
    if (arch, seed) not in _TV_CACHE:
        torch.manual_seed(seed)
        _TV_CACHE[arch, seed] = _randomize_bn(getattr(torchvision.models, arch)(), seed)
    return copy.deepcopy(_TV_CACHE[arch, seed])


def _momentum_copy(sd):
    """Stand-in for a momentum encoder: the same keys, tiny tensors (they are never read)."""
    return {k: torch.zeros(1) for k in sd}


def _prefixed(state, prefix, skip_fc=True):
    return {prefix + k: v for k, v in state.items() if not (skip_fc and k.startswith("fc."))}


def _mlp(prefix, dims=(8, 4)):
    return {f"{prefix}0.weight": torch.randn(dims[0], dims[1]), f"{prefix}0.bias": torch.randn(dims[0]),
            f"{prefix}2.weight": torch.randn(dims[1], dims[0])}


def _scrl_state(net):
    idx = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    out = {}
    for k, v in net.state_dict().items():
        first, _, rest = k.partition(".")
        if first in idx:
            out[f"backbone.encoder.{idx[first]}.{rest}"] = v
    return out


def _official(layout, net):
    """A checkpoint in the official key layout of `layout`, built from torchvision `net`."""
    sd = net.state_dict()
    other = _momentum_copy(sd)
    if layout == "moco":
        return {"epoch": 200, "arch": "resnet50", "state_dict": {
            **_prefixed(sd, "module.encoder_q."), **_mlp("module.encoder_q.fc."),
            **_prefixed(other, "module.encoder_k."), "module.queue": torch.randn(4, 16),
            "module.queue_ptr": torch.zeros(1, dtype=torch.long)}, "optimizer": {"state": {}, "param_groups": []}}
    if layout == "densecl":
        return {"meta": {"epoch": 200}, "state_dict": {
            **_prefixed(sd, "encoder_q.0."), **_mlp("encoder_q.1.mlp."), **_prefixed(sd, "backbone."),
            **_prefixed(other, "encoder_k.0."), "queue": torch.randn(4, 16), "queue2": torch.randn(4, 16),
            "queue_ptr": torch.zeros(1, dtype=torch.long)}}
    if layout == "pixpro":
        import argparse
        return {"opt": argparse.Namespace(arch="resnet50", pixpro_p=2.0), "epoch": 100, "model": {
            **_prefixed(sd, "module.encoder."), **_prefixed(other, "module.encoder_k."),
            **_mlp("module.projector.net."), **_mlp("module.projector_k.net."),
            "module.value_transform.weight": torch.randn(4, 4, 1, 1)}}
    if layout == "cgh":
        return {"epoch": 200, "net": {
            **_prefixed(sd, "module.encoder_q."), **_mlp("module.encoder_q.fc."),
            **_prefixed(other, "module.encoder_k."), "module.queue": torch.randn(4, 8),
            "module.queue_hyper": torch.randn(4, 8), **_mlp("module.distiller_q.mlp.")}}
    if layout == "swav":
        return {"epoch": 800, "state_dict": {
            **_prefixed(sd, "module."), **_mlp("module.projection_head."),
            "module.prototypes.weight": torch.randn(30, 4)}, "amp": {"loss_scaler0": {"loss_scale": 1.0}}}
    if layout == "ssprl":
        return {"epoch": 200, "state_dict": {
            **_prefixed(sd, "module."), **_mlp("module.projection_head."), "module.ptypes.weight": torch.randn(30, 4),
            **_mlp("module.l_pro_head1."), **_mlp("module.l_pro_head2."),
            "module.local_ptypes1.weight": torch.randn(15, 4), "module.local_ptypes2.weight": torch.randn(15, 4),
            "module.l2g_ptypes1.weight": torch.randn(30, 15), "module.l2g_ptypes2.weight": torch.randn(30, 15)}}
    if layout == "gaelle":
        return {"epoch": 400, "state_dict": {
            **_prefixed(sd, "module."), **_mlp("module.projection_head."), "module.prototypes.weight": torch.randn(30, 4),
            **_mlp("module.local_projection_head."), "module.local_prototypes.weight": torch.randn(30, 4),
            "module.l2g_prototypes.weight": torch.randn(30, 4)}}
    if layout in ("scrl", "byol"):
        online = {**_scrl_state(net), **_mlp("projector.net.")}
        target = {k: torch.zeros(1) for k in _scrl_state(net)}
        return {"tag": "x", "epoch": 200, "max_eval_score": 0.5, "max_eval_epoch": 200,
                "online_network_state_dict": online, "target_network_state_dict": target,
                "predictor_state_dict": _mlp("net."), "evaluator_state_dict": {"weight": torch.randn(10, 512)}}
    raise AssertionError(layout)


OFFICIAL = ["moco", "densecl", "pixpro", "cgh", "swav", "ssprl", "gaelle", "scrl", "byol"]


@pytest.mark.parametrize("layout", OFFICIAL)
def test_official_layout_imports_the_online_backbone(tmp_path, layout):
    net = _tv()
    path = tmp_path / "official.pth"
    torch.save(_official(layout, net), path)
    backbone, report = import_official(path, layout)
    assert backbone.name == "resnet18" and report.arch == "resnet18"
    ours = {k: v for k, v in backbone.state_dict().items()}
    theirs = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    net.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), backbone.eval().pool(x), atol=1e-6)
    report.summary()


def test_cgh_without_ddp_prefix_and_swav_plain_release(tmp_path):
    net = _tv()
    sd = net.state_dict()
    torch.save({"net": {**_prefixed(sd, "encoder_q."), **_prefixed(_momentum_copy(sd), "encoder_k.")}},
               tmp_path / "cgh.pth")
    assert import_official(tmp_path / "cgh.pth", "cgh")[1].prefix == "encoder_q."
    torch.save({**_prefixed(sd, "module."), "module.prototypes.weight": torch.randn(3, 4)}, tmp_path / "swav.pth")
    backbone, report = import_official(tmp_path / "swav.pth", "swav")
    assert report.container is None and report.dropped == ["prototypes.weight"]


def test_resnet50_is_detected(tmp_path):
    net = _tv("resnet50")
    torch.save(_official("moco", net), tmp_path / "m.pth")
    assert import_official(tmp_path / "m.pth", "moco")[0].name == "resnet50"


def test_unknown_key_is_refused_and_listed(tmp_path):
    ckpt = _official("moco", _tv())
    ckpt["state_dict"]["module.encoder_q.extra.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "m.pth")
    with pytest.raises(InteropError, match=r"1 unexpected: extra\.weight"):
        import_official(tmp_path / "m.pth", "moco")


def test_missing_key_is_refused_and_listed(tmp_path):
    ckpt = _official("swav", _tv())
    del ckpt["state_dict"]["module.layer4.1.bn2.weight"]
    torch.save(ckpt, tmp_path / "s.pth")
    with pytest.raises(InteropError, match=r"1 missing: layer4\.1\.bn2\.weight"):
        import_official(tmp_path / "s.pth", "swav")


def test_unknown_head_needs_explicit_drop(tmp_path):
    ckpt = _official("gaelle", _tv())
    ckpt["state_dict"]["module.newhead.0.weight"] = torch.zeros(2, 2)
    torch.save(ckpt, tmp_path / "g.pth")
    with pytest.raises(InteropError, match=r"unexpected: newhead\.0\.weight"):
        import_official(tmp_path / "g.pth", "gaelle")
    _, report = import_official(tmp_path / "g.pth", "gaelle", drop=(r"newhead\.",))
    assert "newhead.0.weight" in report.dropped


def test_wrong_layout_names_the_expected_and_found_keys(tmp_path):
    torch.save(_official("pixpro", _tv()), tmp_path / "p.pth")
    with pytest.raises(InteropError, match=r"layout 'moco' expects 'state_dict'; the file's top-level keys are: "
                                           r"opt, epoch, model"):
        import_official(tmp_path / "p.pth", "moco")
    torch.save(_official("swav", _tv()), tmp_path / "s.pth")
    with pytest.raises(InteropError, match=r"no key starts with 'module.encoder_q.' or 'encoder_q.'"):
        import_official(tmp_path / "s.pth", "moco")


def test_missing_num_batches_tracked_is_tolerated_and_reported(tmp_path):
    ckpt = _official("moco", _tv())
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if "num_batches_tracked" not in k}
    torch.save(ckpt, tmp_path / "m.pth")
    _, report = import_official(tmp_path / "m.pth", "moco")
    assert len(report.filled) == 20 and "num_batches_tracked absent" in report.summary()


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_foreign_code_never_runs(tmp_path, capsys):
    torch.save({"state_dict": {"x": Evil()}}, tmp_path / "evil.pth")
    with pytest.raises(InteropError, match=r"weights_only"):
        import_official(tmp_path / "evil.pth", "moco")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"x": Evil()}}, f)
    with pytest.raises(InteropError, match=r"refusing to unpickle builtins.print"):
        read_file(tmp_path / "evil.pkl")
    assert "code ran" not in capsys.readouterr().out


def test_every_layout_is_documented():
    assert set(OFFICIAL) | {"torchvision", "densessl", "detectron2"} == set(LAYOUTS)
    assert all(LAYOUTS[k].description for k in LAYOUTS)


# ---------------------------------------------------------------- CLI


def test_cli_export_and_import(backbones, tmp_path, capsys):
    from densessl.cli import main

    ckpt = save_imported(backbones["resnet18"], tmp_path / "run" / "last.pt")
    assert main(["export", str(ckpt), "--to", "torchvision", "--out", str(tmp_path / "tv.pth")]) == 0
    assert main(["export", str(ckpt), "--out", str(tmp_path / "b.safetensors")]) == 0
    assert main(["import", "torchvision", str(tmp_path / "tv.pth"), "--out", str(tmp_path / "imp.pt")]) == 0
    assert _same_features(load_backbone_file(tmp_path / "imp.pt"), backbones["resnet18"])
    assert _same_features(load_backbone_file(tmp_path / "b.safetensors"), backbones["resnet18"])
    small = save_imported(backbones["resnet18_small"], tmp_path / "small.pt")
    assert main(["export", str(small), "--to", "detectron2", "--out", str(tmp_path / "s.pkl")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"densessl: error: cannot export backbone 'resnet18_small' to detectron2", err)
