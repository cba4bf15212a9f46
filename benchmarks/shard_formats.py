"""Sharded-data formats side by side: litdata, mosaicml-streaming and webdataset.

Each library writes the same JPEGs (with an int label) into shards of the same size, then reads
them back. Measured per library: write time, bytes on disk, sequential read throughput (the
library's own iteration, no decoding: the format, not the JPEG decoder), random access by index
(whether it exists, and its throughput in the order densessl's shard sampler reads: shards in a
random order, each shard's samples in a random order), a seeded shuffle read twice (deterministic
order?), and exact mid-epoch resume (the library's dataloader state_dict: stop after k batches,
restore into a new loader, compare the remaining samples with an uninterrupted pass). The install
cost is counted from the environment the script runs in: distributions beyond densessl's own
(names listed in --baseline) and their size on disk.

Each library runs in its own scratch environment (mosaicml-streaming pins numpy 2.1 and pulls
in transformers, so none of them goes into the project's):

    .venv/bin/pip list --format=freeze | cut -d= -f1 > /tmp/densessl-dists.txt
    for lib in litdata mosaicml-streaming webdataset; do
        python3 -m venv /tmp/sb/$lib && /tmp/sb/$lib/bin/pip install -q $lib pillow
        /tmp/sb/$lib/bin/python benchmarks/shard_formats.py --lib $lib --baseline /tmp/densessl-dists.txt
    done

The script needs only numpy, Pillow and the library under test (not densessl).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from importlib import metadata

import numpy as np
from PIL import Image


def make_jpegs(n: int, side: int, seed: int = 0) -> list[bytes]:
    """n smooth random colour images (JPEG quality 90, about 2-4 KB each at 64 px)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side, side), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def shard_order(n: int, shard: int, seed: int) -> list[int]:
    """densessl's access pattern: a random shard order, a random order inside each shard."""
    rng = np.random.default_rng(seed)
    order = []
    for s in rng.permutation(-(-n // shard)):
        lo, hi = s * shard, min(n, (s + 1) * shard)
        order += (lo + rng.permutation(hi - lo)).tolist()
    return order


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def install_cost(baseline: set[str]) -> tuple[int, float, list[str]]:
    """(distributions not in the baseline, their MB on disk, their names)."""
    extra, size = [], 0
    for dist in metadata.distributions():
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name in baseline or name in ("pip", "setuptools", "pillow", "numpy"):
            continue
        extra.append(name)
        for f in dist.files or []:
            p = dist.locate_file(f)
            if os.path.isfile(p):
                size += os.path.getsize(p)
    return len(extra), size / 2**20, sorted(extra)


# ------------------------------------------------------------------ one adapter per library
# write(out_dir, jpegs, shard) ; sequential(out_dir) -> [(bytes, label)] ; getitem(out_dir) ->
# callable(i) or None ; shuffled(out_dir, seed) -> [label] ; resume(out_dir) -> bool or None


def labels_only(samples):  # JPEGs differ in length: the default collate cannot stack them
    return {"label": [s["label"] for s in samples]}


def resumes_exactly(loader_cls, dataset, batch: int, stop: int, drop_first: bool = False) -> bool:
    """Whether a loader (loader_cls over a fresh dataset(), 2 workers, labels_only batches)
    stopped after `stop` batches and restored from its state_dict into a new one yields, with the
    batches before the stop, exactly the labels of an uninterrupted pass. drop_first: drop the
    stopped loader before building the second (the mosaicml-streaming run does; litdata's keeps it)."""

    def loader():
        return loader_cls(dataset(), batch_size=batch, num_workers=2, collate_fn=labels_only)

    full = [int(x) for b in loader() for x in b["label"]]
    first = loader()
    seen = []
    for k, b in enumerate(first):
        seen += [int(x) for x in b["label"]]
        if k + 1 == stop:
            state = first.state_dict()
            break
    if drop_first:
        del first
    second = loader()
    second.load_state_dict(state)
    rest = [int(x) for b in second for x in b["label"]]
    return seen + rest == full


def lit_write(out, jpegs, shard):
    from litdata.streaming.writer import BinaryWriter

    w = BinaryWriter(out, chunk_size=shard)
    for i, b in enumerate(jpegs):
        w[i] = {"jpg": b, "label": i}
    w.done()
    w.merge()


def lit_dataset(out, **kw):
    import litdata

    return litdata.StreamingDataset(out, **kw)


def lit_sequential(out):
    return [(s["jpg"], s["label"]) for s in lit_dataset(out)]


def lit_getitem(out, batch_decode=0):
    # batch_decode=0: one item deserialised per read. litdata's default ("auto") deserialises a
    # window of rows around the one asked for, which pays off only when reads are sequential.
    ds = lit_dataset(out, batch_decode=batch_decode)
    return lambda i: ds[i]["jpg"]


def lit_shuffled(out, seed):
    return [int(s["label"]) for s in lit_dataset(out, shuffle=True, seed=seed)]


def lit_resume(out, n, batch=32, stop=5):
    import litdata

    return resumes_exactly(litdata.StreamingDataLoader, lambda: lit_dataset(out, shuffle=True, seed=3), batch, stop)


def mds_write(out, jpegs, shard):
    from streaming import MDSWriter

    with MDSWriter(out=out, columns={"jpg": "bytes", "label": "int"}, size_limit=shard * (len(jpegs[0]) + 64)) as w:
        for i, b in enumerate(jpegs):
            w.write({"jpg": b, "label": i})


def mds_dataset(out, **kw):
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    return StreamingDataset(local=out, batch_size=32, **kw)


def mds_sequential(out):
    return [(s["jpg"], s["label"]) for s in mds_dataset(out, shuffle=False)]


def mds_getitem(out):
    ds = mds_dataset(out, shuffle=False)
    return lambda i: ds[i]["jpg"]


def mds_shuffled(out, seed):
    return [int(s["label"]) for s in mds_dataset(out, shuffle=True, shuffle_seed=seed)]


def mds_resume(out, n, batch=32, stop=5):
    from streaming import StreamingDataLoader

    return resumes_exactly(StreamingDataLoader, lambda: mds_dataset(out, shuffle=True, shuffle_seed=3), batch, stop,
                           drop_first=True)


def wds_write(out, jpegs, shard):
    import webdataset as wds

    with wds.ShardWriter(os.path.join(out, "shard-%06d.tar"), maxcount=shard, verbose=0) as w:
        for i, b in enumerate(jpegs):
            w.write({"__key__": f"{i:08d}", "jpg": b, "cls": i})


def wds_urls(out):
    return sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".tar"))


def wds_sequential(out):
    import webdataset as wds

    return [(s["jpg"], int(s["cls"])) for s in wds.WebDataset(wds_urls(out), shardshuffle=False)]


def wds_shuffled(out, seed):
    import webdataset as wds

    ds = wds.WebDataset(wds_urls(out), shardshuffle=len(wds_urls(out)), seed=seed).shuffle(1000, seed=seed)
    return [int(s["cls"]) for s in ds]


LIBS = {
    "litdata": ("litdata", lit_write, lit_sequential, lit_getitem, lit_shuffled, lit_resume),
    "mosaicml-streaming": ("mosaicml-streaming", mds_write, mds_sequential, mds_getitem, mds_shuffled, mds_resume),
    # webdataset 1.x reads tar shards as a stream (IterableDataset); it has no index and no
    # loader state (its wids module, with indexed access, left the package after 0.2).
    "webdataset": ("webdataset", wds_write, wds_sequential, None, wds_shuffled, None),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lib", choices=sorted(LIBS), required=True)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--shard", type=int, default=500, help="samples per shard")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", default=None, help="file of distribution names densessl already installs")
    args = p.parse_args(argv)
    dist, write, sequential, getitem, shuffled, resume = LIBS[args.lib]
    jpegs = make_jpegs(args.images, args.side)
    raw = sum(len(b) for b in jpegs)
    tmp = tempfile.mkdtemp(prefix="shard-bench-")
    row = {"lib": f"{args.lib} {metadata.version(dist)}", "images": args.images, "jpeg_bytes": raw}
    try:
        out = os.path.join(tmp, "w")
        writes, seqs, rnds, rnds_default = [], [], [], []
        for r in range(args.rounds):
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            t = time.perf_counter()
            write(out, jpegs, args.shard)
            writes.append(time.perf_counter() - t)
            t = time.perf_counter()
            got = sequential(out)
            seqs.append(time.perf_counter() - t)
            assert [bytes(b) for b, _ in got] == jpegs and [int(y) for _, y in got] == list(range(args.images))
            if getitem is not None:
                get = getitem(out)
                order = shard_order(args.images, args.shard, r)
                t = time.perf_counter()
                for i in order:
                    b = get(i)
                rnds.append(time.perf_counter() - t)
                if args.lib == "litdata":
                    get = getitem(out, batch_decode="auto")
                    t = time.perf_counter()
                    for i in order:
                        get(i)
                    rnds_default.append(time.perf_counter() - t)
                assert bytes(get(order[-1])) == jpegs[order[-1]] and bytes(b) == jpegs[order[-1]]
        row["bytes_on_disk"] = du(out)
        row["shards"] = len([f for f in os.listdir(out) if not f.endswith(".json")])
        row["write_images_s"] = args.images / float(np.median(writes))
        row["sequential_images_s"] = args.images / float(np.median(seqs))
        row["random_access"] = getitem is not None
        row["random_images_s"] = args.images / float(np.median(rnds)) if rnds else None
        a, b, c = shuffled(out, 5), shuffled(out, 5), shuffled(out, 6)
        if rnds_default:
            row["random_images_s_litdata_default_window"] = args.images / float(np.median(rnds_default))
        row["deterministic_shuffle"] = a == b and a != c and sorted(a) == list(range(args.images))
        row["exact_resume"] = resume(out, args.images) if resume is not None else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.baseline:
        with open(args.baseline) as f:
            base = {line.strip().lower().replace("_", "-") for line in f if line.strip()}
        row["new_dists"], row["new_mb"], row["new_names"] = install_cost(base)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
