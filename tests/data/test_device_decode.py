"""data.decode_on=device: the workers read bytes and draw crops, the training process decodes and
cuts the views. On the CPU it must give exactly the workers' views, geometry and losses (on a GPU
the decoder is nvJPEG: benchmarks/device_check.py measures it there)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densessl import cli
from densessl.common.errors import ImageReadError
from densessl.config import build_config
from densessl.data.device_decode import EncodedViews, collate_encoded, decode_views
from densessl.data.imagefolder import ImageFolder
from densessl.data.views import ViewDataset, ViewSampler, collate_views


def _top_conftest():
    spec = importlib.util.spec_from_file_location("densessl_tests_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_DATA = [o for o in _top_conftest().TINY if not o.startswith("data.num_scenes")]


def make_folder(root: Path, n=32, seed=0) -> Path:
    """Smooth random JPEGs of several sizes and one PNG (decoded by PIL on either path)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for k in range(n):
        small = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((40 + k % 3 * 6, 36 + k % 2 * 10), Image.BICUBIC)
        img.save(root / (f"{k:02d}.png" if k == 3 else f"{k:02d}.jpg"), quality=90)
    return root


def views_both_ways(dataset, groups, epoch=1, indices=(0, 3, 5, 7)):
    sampler = ViewSampler(groups)
    plain = collate_views([ViewDataset(dataset, sampler, seed=4)[(epoch, i)] for i in indices])
    enc = collate_encoded([EncodedViews(dataset, sampler, seed=4)[(epoch, i)] for i in indices])
    return plain, enc


def assert_same_batches(plain: dict, enc: dict) -> None:
    """Every key the trainer and methods read: the views bit for bit, geometry, targets."""
    views = decode_views(enc, torch.device("cpu"))
    assert len(views) == len(plain["views"])
    for a, b in zip(views, plain["views"]):
        assert a.dtype == torch.uint8 and torch.equal(a, b)  # the same pixels, bit for bit
    for key in ("box", "flip"):
        for a, b in zip(enc[key], plain[key]):
            assert torch.equal(a, b)
    keys = set(plain) - {"views", "box", "flip"}
    assert keys <= set(enc) and all(torch.equal(enc[k], plain[k]) for k in keys), keys


@pytest.mark.parametrize("size", [None, 32])
@pytest.mark.parametrize("labelled", [False, True])
def test_device_views_geometry_and_labels_equal_the_workers(tmp_path, size, labelled):
    groups = build_config("byol-scenes", ["views.0.size=24", "views.1.size=16"]).views
    root = make_folder(tmp_path / "img" / "cls") if labelled else make_folder(tmp_path / "img")
    dataset = ImageFolder(tmp_path / "img", size=size)
    plain, enc = views_both_ways(dataset, groups)
    assert ("label" in plain) is labelled and root.is_dir()
    assert [v.shape for v in plain["views"]] == [(4, 3, 24, 24), (4, 3, 16, 16)]
    assert_same_batches(plain, enc)
    if size is None:  # boxes are in the source's pixels: sizes differ per image
        assert len({tuple(s.tolist()) for s in enc["source_size"]}) > 1


def test_pretraining_with_device_decoding_logs_the_workers_losses(tmp_path):
    src = make_folder(tmp_path / "img", n=64)
    common = ["pretrain", "byol-scenes", *TINY_DATA, "data.dataset=imagefolder", f"data.root={src}"]
    assert cli.main([*common, f"run_dir={tmp_path / 'w'}"]) == 0
    assert cli.main([*common, "data.decode_on=device", "data.num_workers=2", f"run_dir={tmp_path / 'd'}"]) == 0
    from densessl.common.metrics_jsonl import read_losses

    lw, ld = ({r["step"]: r["loss"] for r in read_losses(tmp_path / r / "metrics.jsonl")} for r in ("w", "d"))
    assert sorted(lw) == list(range(1, 9)) and lw == ld


@pytest.mark.parametrize("size", [None, 32])
def test_shards_decode_on_the_device_as_on_the_workers(tmp_path, voc_export, size):
    """Shards of an image folder, and of VOC (multi-hot labels, the online probe's targets)."""
    pytest.importorskip("litdata")
    from densessl.data.shards import ShardDataset, write_shards

    write_shards(make_folder(tmp_path / "img"), tmp_path / "sh", shard_size=10, order="source")
    write_shards(voc_export[1], tmp_path / "voc", shard_size=3, split="val")
    groups = build_config("byol-scenes", ["views.0.size=24", "views.1.size=16"]).views
    for folder in ("sh", "voc"):
        plain, enc = views_both_ways(ShardDataset(tmp_path / folder, size=size), groups)
        assert ("labels" in plain) is (folder == "voc")
        assert_same_batches(plain, enc)


def test_what_device_decoding_cannot_do_is_one_line(tmp_path, capsys):
    src = make_folder(tmp_path / "img", n=16)
    base = ["pretrain", "byol-scenes", *TINY_DATA, f"run_dir={tmp_path / 'r'}"]
    cases = [
        (["data.decode_on=gpu", "data.dataset=imagefolder", f"data.root={src}"],
         "data.decode_on='gpu'; expected one of workers, device"),
        (["data.decode_on=device"], "data.dataset=fashion_scenes"),
    ]
    for extra, expected in cases:
        assert cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("densessl: error: ") and expected in err and err.count("\n") == 1, err
    grid = ["pretrain", "ssprl-scenes", "data.dataset=imagefolder", f"data.root={src}", "data.decode_on=device",
            "data.num_workers=0", "train.epochs=1", "train.batch_size=8", f"run_dir={tmp_path / 'g'}"]
    assert cli.main(grid) == 2
    err = capsys.readouterr().err
    assert "is a pyramid grid" in err and "data.decode_on=workers" in err and err.count("\n") == 1


def test_an_undecodable_body_names_the_file(tmp_path):
    src = make_folder(tmp_path / "img", n=4)
    path = src / "01.jpg"
    data = path.read_bytes()
    path.write_bytes(data[:200] + bytes(len(data) - 200))  # the header stays, the scan is garbage
    groups = build_config("byol-scenes", ["views.0.size=24", "views.1.size=16"]).views
    enc = collate_encoded([EncodedViews(ImageFolder(src), ViewSampler(groups), seed=0)[(0, i)] for i in range(4)])
    with pytest.raises(ImageReadError, match="01.jpg"):
        decode_views(enc, torch.device("cpu"))
