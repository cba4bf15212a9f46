"""Sharded data: `densessl data shard`, data.dataset=shards, and the shard-aware sampler.

What is guaranteed, and tested here: sample i of a shard folder is the source reader's item
`source_index` (the same decoded pixels and labels; with --order source, source item i); the
trainer reads shards in the shard-aware order of ResumableBatchSampler(shard_sizes=...), which
is a pure function of (seed, epoch, shard sizes), so a run on shards and a run on the source
folder read through the same sampler see the same samples in the same order and log the same
losses. That order is not the one the folder gets without shard sizes (a permutation of all
indices): the shard order differs by design, to keep memory O(shards + shard size).
"""
import json
import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densessl import cli
from densessl.data.imagefolder import ImageFolder
from densessl.data.views import ResumableBatchSampler

pytest.importorskip("litdata")

from densessl.data.shards import META, ShardDataset, write_shards  # noqa: E402

def _top_conftest():
    """tests/conftest.py (tests/data/ has its own conftest, which `from conftest import` finds)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("densessl_tests_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_conf = _top_conftest()
TINY, cli_command, subprocess_env = _conf.TINY, _conf.cli_command, _conf.subprocess_env
wait_for_marker = _conf.wait_for_marker
TINY_DATA = [o for o in TINY if not o.startswith("data.num_scenes")]


def make_folder(root: Path, classes=("ant", "bee"), per_class=32, seed=0) -> Path:
    """Smooth random JPEGs of a few sizes (and one PNG per class), in class sub-folders."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            small = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((40 + k % 3 * 4, 36 + k % 2 * 8), Image.BICUBIC)
            img.save(root / c / (f"{k:02d}.png" if k == 0 else f"{k:02d}.jpg"), quality=90)
    return root


def losses(run_dir: Path) -> dict:
    from densessl.common.metrics_jsonl import read_losses

    return {r["step"]: r["loss"] for r in read_losses(run_dir / "metrics.jsonl")}


# ------------------------------------------------------------------ writing and reading


def test_shards_hold_the_source_items_with_their_labels(tmp_path):
    src = make_folder(tmp_path / "src", classes=("ant", "bee", "cat"), per_class=7)
    info = write_shards(src, tmp_path / "sh", shard_size=5)
    ref = ImageFolder(src)
    ds = ShardDataset(tmp_path / "sh")
    assert info["count"] == len(ds) == len(ref) == 21 and info["shards"] == 5
    assert ds.shard_sizes.tolist() == [5, 5, 5, 5, 1] and ds.classes == ["ant", "bee", "cat"]
    seen = []
    for i in range(len(ds)):
        item = ds[i]
        j = ds._read(i)["source_index"]
        want = ref[j]
        assert torch.equal(item["image"], want["image"]), i  # the file's own bytes, decoded alike
        assert item["label"].dtype == torch.int64 and int(item["label"]) == int(want["label"])
        assert item["path"] == want["path"]
        seen.append(j)
    assert sorted(seen) == list(range(21)) and seen != list(range(21))  # shuffled at write time
    # --order source keeps the reader's order; data.size resizes as ImageFolder does
    write_shards(src, tmp_path / "kept", shard_size=4, order="source")
    kept, ref32 = ShardDataset(tmp_path / "kept", size=32), ImageFolder(src, size=32)
    for i in (0, 7, 20):
        assert torch.equal(kept[i]["image"], ref32[i]["image"]) and kept[i]["image"].shape == (3, 32, 32)


def test_voc_and_coco_shards_keep_boxes_and_labels(tmp_path):
    from densessl.data.coco import COCODataset, coco_paths
    from densessl.data.export import export_scenes
    from densessl.data.scenes import FashionScenes
    from densessl.data.voc import VOCDetection

    scenes = FashionScenes(split="train", num_scenes=6, size=48, seed=1, with_masks=True)
    export_scenes(scenes, tmp_path / "voc", split_name="trainval", layout="voc")
    export_scenes(scenes, tmp_path / "coco", split_name="train", layout="coco")
    for kind, ref in (("voc", VOCDetection(tmp_path / "voc", "trainval")),
                      ("coco", COCODataset(*coco_paths(tmp_path / "coco", "train")))):
        info = write_shards(tmp_path / kind, tmp_path / f"{kind}-sh", shard_size=4, order="source")
        ds = ShardDataset(tmp_path / f"{kind}-sh")
        assert info["kind"] == kind and len(ds) == len(ref) == 6 and ds.classes == list(ref.classes)
        for i in range(6):
            a, b = ds[i], ref[i]
            assert set(b) <= set(a), (kind, set(b) - set(a))
            for k, v in b.items():
                if isinstance(v, torch.Tensor):
                    assert a[k].dtype == v.dtype and torch.equal(a[k], v), (kind, k)
                else:
                    assert a[k] == v, (kind, k)


def test_video_frames_keep_their_order_within_a_video(tmp_path):
    for v, n in (("clip_a", 3), ("clip_b", 4)):
        (tmp_path / "vid" / v).mkdir(parents=True)
        for k in range(n):
            Image.new("RGB", (24, 20), (30 * k, 10 * n, 90)).save(tmp_path / "vid" / v / f"frame{k}.png")
    info = write_shards(tmp_path / "vid", tmp_path / "sh", kind="video_frames", shard_size=3)
    ds = ShardDataset(tmp_path / "sh")
    assert info["count"] == 7 and len(ds) == 7
    frames = [(ds[i]["video"], ds[i]["frame"]) for i in range(7)]
    for v, n in (("clip_a", 3), ("clip_b", 4)):
        mine = [f for f in frames if f[0] == v]
        assert mine == [(v, k) for k in range(n)]  # contiguous and in order
        start = frames.index((v, 0))
        assert frames[start:start + n] == mine
    assert ds[frames.index(("clip_b", 2))]["image"][0, 0, 0] == 60


def test_bad_input_is_one_line(tmp_path, capsys):
    src = make_folder(tmp_path / "src", per_class=2)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    (tmp_path / "broken" / "a").mkdir(parents=True)
    (tmp_path / "broken" / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xffnot a jpeg")
    cases = [
        (["data", "shard", str(tmp_path / "missing"), str(tmp_path / "o1")], f"{tmp_path / 'missing'}: no such folder"),
        (["data", "shard", str(src), str(tmp_path / "busy")], "exists and is not an empty folder"),
        (["data", "shard", str(tmp_path / "broken"), str(tmp_path / "o2")], "bad.jpg"),
        (["data", "shard", str(src), str(tmp_path / "o3"), "--kind", "voc"], "trainval.txt: split file not found"),
        (["pretrain", "byol-scenes", *TINY_DATA, "data.dataset=shards", f"data.root={src}",
          f"run_dir={tmp_path / 'run'}"], f"data.root={src}: no {META} in it"),
    ]
    for argv, expected in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("densessl: error:") and expected in lines[0], err
    assert not (tmp_path / "o2").exists()  # a failed write leaves no folder that looks whole


def test_missing_litdata_names_the_extra(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_litdata(name, *args, **kwargs):
        if name == "litdata" or name.startswith("litdata."):
            raise ImportError("No module named 'litdata'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_litdata)
    monkeypatch.delitem(sys.modules, "litdata", raising=False)
    from densessl.config import ConfigError

    with pytest.raises(ConfigError, match=r"pip install 'densessl\[shards\]'"):
        write_shards(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------ the shard-aware order


def test_shard_order_covers_every_index_resumes_and_splits_ranks():
    sizes, n, batch = [5, 7, 3, 9, 8], 32, 8
    full = list(ResumableBatchSampler(n, batch, 8, seed=3, epoch=2, shard_sizes=sizes))  # two passes
    flat = [i for b in full for _, i in b]
    assert sorted(flat[:n]) == sorted(flat[n:]) == list(range(n)) and flat[:n] != flat[n:]
    # shard-aware: each shard's samples are contiguous in a pass
    starts = np.cumsum([0] + sizes)
    shard_of = [int(np.searchsorted(starts, i, side="right")) - 1 for i in flat[:n]]
    assert sum(a != b for a, b in zip(shard_of, shard_of[1:])) == len(sizes) - 1
    for step in range(8):  # a resumed sampler yields exactly the remaining batches
        assert list(ResumableBatchSampler(n, batch, 8, 3, 2, start_step=step, shard_sizes=sizes)) == full[step:]
    ranks = [list(ResumableBatchSampler(n, batch, 8, 3, 2, rank=r, world_size=2, shard_sizes=sizes)) for r in (0, 1)]
    assert all(ranks[0][s] + ranks[1][s] == full[s] for s in range(8))
    assert full != list(ResumableBatchSampler(n, batch, 8, seed=4, epoch=2, shard_sizes=sizes))
    assert full == list(ResumableBatchSampler(n, batch, 8, seed=3, epoch=2, shard_sizes=sizes))


def test_ten_million_entries_need_memory_of_one_shard_not_of_the_dataset(tmp_path):
    """A shard folder index of 10M samples (1000 shards of 10k; the shard files themselves are
    not needed to open it) and the sampler of an epoch, started deep into the epoch: traced
    allocations stay far below one full permutation (80 MB of int64; a Python list of 10M ints
    is ~360 MB)."""
    shards, per = 1000, 10_000
    n = shards * per
    meta = {"format": "densessl-shards", "version": 1, "kind": "imagefolder", "classes": ["a", "b"],
            "count": n, "shard_sizes": [per] * shards, "shard_files": [f"chunk-0-{k}.bin" for k in range(shards)]}
    (tmp_path / META).write_text(json.dumps(meta))
    (tmp_path / "index.json").write_text(json.dumps({"config": {"data_format": ["bytes", "int"]}, "chunks": []}))
    tracemalloc.start()
    try:
        ds = ShardDataset(tmp_path)
        assert len(ds) == n
        sampler = ResumableBatchSampler(len(ds), 1024, n // 1024, seed=0, epoch=5, start_step=7000, rank=1,
                                        world_size=4, shard_sizes=ds.shard_sizes)
        batches = iter(sampler)
        got = [next(batches) for _ in range(30)]  # crosses several shards
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(got) == 30 and all(len(b) == 256 for b in got)
    assert all(0 <= i < n for b in got for _, i in b)
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # a full permutation: 76 MiB


# ------------------------------------------------------------------ training on shards


def test_pretraining_on_shards_logs_the_losses_of_the_folder_read_in_the_same_order(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "src")  # 64 images, 4 steps per epoch at batch 16
    assert cli.main(["data", "shard", str(src), str(tmp_path / "sh"), "--shard-size", "12", "--order", "source"]) == 0
    sizes = ShardDataset(tmp_path / "sh").shard_sizes.tolist()
    assert sizes == [12, 12, 12, 12, 12, 4]
    common = ["pretrain", "byol-scenes", *TINY_DATA]
    assert cli.main([*common, "data.dataset=shards", f"data.root={tmp_path / 'sh'}", f"run_dir={tmp_path / 'a'}"]) == 0
    # the folder itself, read through the same shard-aware sampler (the shard sizes are all it needs)
    monkeypatch.setattr(ImageFolder, "shard_sizes", sizes, raising=False)
    assert cli.main([*common, "data.dataset=imagefolder", f"data.root={src}", f"run_dir={tmp_path / 'b'}"]) == 0
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(la) == list(range(1, 9)) and la == lb
    # the folder's own order (a permutation of all 64 indices) is another order: other losses
    monkeypatch.delattr(ImageFolder, "shard_sizes")
    assert cli.main([*common, "data.dataset=imagefolder", f"data.root={src}", f"run_dir={tmp_path / 'c'}"]) == 0
    assert losses(tmp_path / "c")[1] != la[1]


# `densessl ...` that, once its first last.pt (step 2, mid-epoch) is whole, writes PAUSE_MARKER and
# sleeps until it is killed.
PAUSING_CLI = r'''
import os, sys, time
from pathlib import Path

from densessl import cli
from densessl.common import checkpoint as ckpt_io

real_save = ckpt_io.save_atomic


def save_then_pause(state, path, *args, **kwargs):
    real_save(state, path, *args, **kwargs)
    if Path(path).name == "last.pt":
        # tmp + rename: the test polls for the marker and must never read it empty (it did, under load)
        marker = Path(os.environ["PAUSE_MARKER"])
        marker.with_suffix(".tmp").write_text(str(state["step"]))
        os.replace(marker.with_suffix(".tmp"), marker)
        time.sleep(600)


ckpt_io.save_atomic = save_then_pause
sys.exit(cli.main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_a_run_on_shards_killed_mid_epoch_resumes_exactly(tmp_path):
    src = make_folder(tmp_path / "src")
    assert cli.main(["data", "shard", str(src), str(tmp_path / "sh"), "--shard-size", "12"]) == 0
    args = ["pretrain", "byol-scenes", *TINY_DATA, "data.dataset=shards", f"data.root={tmp_path / 'sh'}",
            "data.num_workers=2"]
    env, script, marker = subprocess_env(), tmp_path / "pausing_cli.py", tmp_path / "paused"
    script.write_text(PAUSING_CLI)
    proc = subprocess.Popen([sys.executable, str(script), *args, f"run_dir={tmp_path / 'killed'}"],
                            env={**env, "PAUSE_MARKER": str(marker)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for_marker(proc, marker, 240) and marker.read_text() == "2", \
            "the run never paused after its first checkpoint"
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its DataLoader workers
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    res = subprocess.run(cli_command(*args, f"run_dir={tmp_path / 'killed'}"), env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "at step 2/8" in res.stdout
    assert cli.main([*args, f"run_dir={tmp_path / 'ref'}"]) == 0
    ref, killed = losses(tmp_path / "ref"), losses(tmp_path / "killed")
    assert sorted(ref) == list(range(1, 9)) and ref == killed
    from densessl.common.checkpoint import load_checkpoint

    wa, wb = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt")["method"] for r in ("ref", "killed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


COVERAGE = r'''
import json, sys
import torch.distributed as dist
from densessl.config import build_config
from densessl.engine.trainer import Trainer

trainer = Trainer(build_config("byol-scenes", sys.argv[2:]))
seen = {}
for epoch in (0, 1):
    seen[epoch] = [(int(i), int(y)) for b in trainer.loader(epoch) for i, y in zip(b["index"], b["label"])]
every = [None] * dist.get_world_size()
dist.all_gather_object(every, seen)
if dist.get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(every, f)
'''


@pytest.mark.slow
def test_two_gloo_ranks_with_two_workers_each_read_every_sample_once_per_epoch(tmp_path):
    src = make_folder(tmp_path / "src")
    assert cli.main(["data", "shard", str(src), str(tmp_path / "sh"), "--shard-size", "10"]) == 0
    ds = ShardDataset(tmp_path / "sh")
    script, out = tmp_path / "coverage.py", tmp_path / "seen.json"
    script.write_text(COVERAGE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
           str(out), *TINY_DATA, "data.dataset=shards", f"data.root={tmp_path / 'sh'}", "data.num_workers=2",
           f"run_dir={tmp_path / 'run'}"]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    every = json.loads(out.read_text())
    labels = {i: int(ds[i]["label"]) for i in range(len(ds))}
    for epoch in ("0", "1"):
        per_rank = [[i for i, _ in rank[epoch]] for rank in every]
        assert all(len(r) == 32 for r in per_rank)  # 4 steps x 8 per rank
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(64))
        assert all(labels[i] == y for rank in every for i, y in rank[epoch])  # each index, its own sample
    assert every[0]["0"] != every[0]["1"]
