"""Sharded datasets: many images in a few large files (litdata chunks), read by index.

`write_shards` (``densessl data shard SRC OUT``) copies the encoded image files of an
ImageFolder, a Pascal VOC folder, a COCO folder or a folder of video frames, unchanged (no
re-encoding, so decoding gives the same pixels), into litdata chunks of `shard_size` samples,
with the labels the source reader gives (ImageFolder: label, path; VOC: boxes, classes,
difficult, labels, labels_difficult, id; COCO: labels, boxes, classes, iscrowd, image_id; video
frames: video, frame). Beside litdata's index.json it writes ``densessl-shards.json``: the
source, its kind and classes, the write order, and the number of samples of every shard --
O(number of shards), the only index the reader and the sampler hold.

Order: by default the samples are shuffled once at write time (seed `seed`), so a shard holds a
sample of every class, not one class of a sorted ImageFolder; the sampler then shuffles shards
and samples within a shard (ResumableBatchSampler with shard_sizes, data/views.py). `order=
"source"` keeps the source reader's order (sample i of the shards is sample i of the source).
Video frames keep their order within a video (videos are shuffled as wholes).

`ShardDataset(root)` is the map-style dataset of ``data.dataset=shards``: item i is the source
item that was written at position i, with "image" decoded by densessl.data.image_io (uint8
(3, H, W), resized and centre-cropped to `size` as ImageFolder does) and the labels as tensors.
Each DataLoader worker opens its own litdata reader on first use; only the chunk being read is
mapped, so memory does not grow with the dataset.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from densessl.config import ConfigError, require_extra

META = "densessl-shards.json"
FORMAT = "densessl-shards"
KINDS = ("imagefolder", "voc", "coco", "video_frames")
_REQUIRE = ("litdata", "shards", "sharded data (densessl data shard, data.dataset=shards)")


def _litdata():
    return require_extra(*_REQUIRE)


# The only litdata serialisers shard folders use, so reading one never unpickles (litdata falls
# back to pickle for other types). "str" is replaced: litdata's own stores a string naming an
# existing image file as that image (ImageFolder's "path" would become pixels).
SAFE_FORMATS = ("str", "int", "bool", "float", "bytes", "tensor", "no_header_tensor")


def _unsafe(formats) -> list[str]:
    """The data formats of a litdata index that are not SAFE_FORMATS ("no_header_tensor:18" is
    the no_header_tensor serialiser with a dtype code)."""
    return sorted(f for f in formats if str(f).split(":")[0] not in SAFE_FORMATS)


def _serializers() -> dict:
    from litdata.streaming import serializers as ls

    class PlainString(ls.StringSerializer):
        def can_serialize(self, data) -> bool:
            return isinstance(data, str)

    return {"str": PlainString(), "int": ls.IntegerSerializer(), "bool": ls.BooleanSerializer(),
            "float": ls.FloatSerializer(), "bytes": ls.BytesSerializer(), "tensor": ls.TensorSerializer(),
            "no_header_tensor": ls.NoHeaderTensorSerializer()}


# ------------------------------------------------------------------ sources


def detect_kind(src: Path) -> str:
    """voc (Annotations/ and JPEGImages/), coco (annotations/instances_*.json), else imagefolder.
    A folder of video frames looks like an ImageFolder (sub-folders of images): name it."""
    if (src / "Annotations").is_dir() and (src / "JPEGImages").is_dir():
        return "voc"
    if list((src / "annotations").glob("instances_*.json")):
        return "coco"
    return "imagefolder"


def open_source(src: str | os.PathLike, kind: str = "auto", split: str | None = None, on_error: str = "raise"):
    """(source reader, kind, split, image path of item i, classes) for `write_shards`."""
    src = Path(src)
    if not src.is_dir():
        raise ConfigError(f"{src}: no such folder; expected an image folder, a VOC or COCO folder, or a folder of "
                          f"video frames")
    if kind == "auto":
        kind = detect_kind(src)
    if kind == "imagefolder":
        from densessl.data.imagefolder import ImageFolder

        try:
            ds = ImageFolder(src, on_error=on_error)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{src}: {e}") from None
        return ds, kind, None, lambda i: ds.samples[i][0], list(ds.classes)
    if kind == "voc":
        from densessl.data.voc import VOCDetection

        split = split or "trainval"
        ds = VOCDetection(src, split=split)
        return ds, kind, split, ds.image_path, list(ds.classes)
    if kind == "coco":
        from densessl.data.coco import COCODataset, coco_paths

        if split is None:
            found = sorted(p.name[len("instances_"):-len(".json")] for p in (src / "annotations").glob("instances_*.json"))
            if len(found) != 1:
                raise ConfigError(f"{src}/annotations: {len(found)} instances_<split>.json files "
                                  f"({', '.join(found) or 'none'}); name one with --split")
            split = found[0]
        ann, images = coco_paths(src, split)
        ds = COCODataset(ann, images)
        return ds, kind, split, ds.image_path, list(ds.classes)
    if kind == "video_frames":
        from densessl.data.video import VideoFrames

        try:
            ds = VideoFrames(src, video_files=False)
        except FileNotFoundError as e:
            raise ConfigError(f"{src}: {e}") from None
        return _FrameList(ds), kind, None, None, []
    raise ConfigError(f"--kind {kind}: expected auto, {', '.join(KINDS)}")


class _FrameList:
    """Every frame of a VideoFrames folder as one item {"image", "video", "frame"}, video by video."""

    def __init__(self, videos):
        self.frames = [(name, k, path) for name, paths in videos.videos for k, path in enumerate(paths)]
        self.video_sizes = [len(paths) for _, paths in videos.videos]

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        from densessl.data.video import _read_frame

        name, k, path = self.frames[i]
        return {"image": _read_frame(path), "video": name, "frame": k}

    def path(self, i):
        return self.frames[i][2]


def _video_table(frames: "_FrameList", positions) -> list[list]:
    """[video name, position of its first frame, frame count] in written order (write_order keeps a
    video's frames contiguous and in order; checked here, as the reader relies on it)."""
    table = []
    for pos, i in enumerate(positions):
        name, k, _ = frames.frames[int(i)]
        if k == 0:
            table.append([name, pos, 0])
        if not table or table[-1][0] != name or table[-1][1] + k != pos:
            raise RuntimeError(f"video {name!r} frame {k} written at {pos}: frames must be contiguous and in order")
        table[-1][2] += 1
    return table


def _fields(record: dict) -> dict:
    """A stored record's fields beside its image, as tensors the loader can batch."""
    out = {}
    for k, v in record.items():
        if k == "label":
            v = torch.tensor(v, dtype=torch.int64)
        elif isinstance(v, torch.Tensor):
            v = v.clone()  # litdata's tensors view its read-only chunk buffer
        out[k] = v
    return out


def write_order(source, kind: str, order: str, seed: int) -> np.ndarray:
    """The source indices in the order they are written (see the module notes)."""
    n = len(source)
    if order == "source":
        return np.arange(n)
    if order != "shuffled":
        raise ConfigError(f"--order {order}: expected shuffled or source")
    rng = np.random.default_rng([seed, 11])
    if kind != "video_frames":
        return rng.permutation(n)
    starts = np.concatenate([[0], np.cumsum(source.video_sizes)[:-1]]).astype(np.int64)
    return np.concatenate([np.arange(starts[v], starts[v] + source.video_sizes[v])
                           for v in rng.permutation(len(source.video_sizes))])


def _record(item: dict) -> dict:
    """A reader's item without its decoded image, in types litdata serialises (tensors stay
    tensors with their dtype and shape; Python ints and strings stay themselves)."""
    out = {}
    for k, v in item.items():
        if k == "image":
            continue
        if isinstance(v, torch.Tensor) and k == "label" and v.ndim == 0:
            v = int(v)  # ImageFolder's class index
        elif isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
        elif isinstance(v, Path):
            v = str(v)
        out[k] = v
    return out


def write_shards(src, out, shard_size: int = 1000, shard_bytes: str | None = None, kind: str = "auto",
                 split: str | None = None, order: str = "shuffled", seed: int = 0, on_error: str = "raise",
                 log=None) -> dict:
    """Write the shards of `src` into the new folder `out`; returns what was written (see the
    module notes). Every image is decoded once (by the source reader, which checks it) before
    its file's bytes are stored."""
    litdata = _litdata()
    from litdata.streaming.writer import BinaryWriter

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty folder; shards go into a new folder")
    source, kind, split, path_of, classes = open_source(src, kind, split, on_error)
    if path_of is None:
        path_of = source.path
    positions = write_order(source, kind, order, seed)
    out.mkdir(parents=True, exist_ok=True)
    try:
        writer = BinaryWriter(str(out), chunk_size=None if shard_bytes else shard_size, chunk_bytes=shard_bytes,
                              serializers=_serializers())
        for pos, i in enumerate(positions):
            i = int(i)
            item = source[i]  # decodes: a broken file fails here, named by the reader's error
            path = Path(path_of(i))
            record = _record(item)
            record["image"] = path.read_bytes()
            record["source_index"] = i
            writer[pos] = record
            if log is not None and (pos + 1) % 10000 == 0:
                log(f"{pos + 1}/{len(positions)} samples")
        writer.done()
        writer.merge()
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # never leave half a shard folder that looks whole
        raise
    index = json.loads((out / "index.json").read_text())
    chunks = index["chunks"]
    unsafe = _unsafe(index["config"]["data_format"])
    if unsafe:  # a field type the reader would refuse: fail now, not at training time
        shutil.rmtree(out, ignore_errors=True)
        raise ConfigError(f"{src}: its items hold values litdata stores as {unsafe}; expected only {SAFE_FORMATS}")
    sizes = [int(c["chunk_size"]) for c in chunks]
    videos = _video_table(source, positions) if kind == "video_frames" else None
    meta = {"format": FORMAT, "version": 1, "litdata": litdata.__version__, "source": str(Path(src).resolve()),
            "kind": kind, "split": split, "classes": classes, "order": order, "seed": seed if order == "shuffled" else None,
            "count": int(sum(sizes)), "shard_sizes": sizes,
            "shard_files": [c["filename"] for c in chunks]}
    if videos is not None:  # [name, first position, frames] per video: what ShardVideoFrames reads clips by
        meta["videos"] = videos
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")
    return {"out": str(out), "kind": kind, "split": split, "count": meta["count"], "shards": len(sizes),
            "bytes": sum((out / f).stat().st_size for f in meta["shard_files"]), "classes": len(classes),
            "min_shard": min(sizes), "max_shard": max(sizes)}


# ------------------------------------------------------------------ reading


def read_meta(root: str | os.PathLike) -> dict:
    """The shard folder's densessl-shards.json, checked; ConfigError names the folder otherwise."""
    root = Path(root)
    path = root / META
    if not path.is_file():
        what = "no such folder" if not root.is_dir() else f"no {META} in it"
        raise ConfigError(f"data.root={root}: {what}; expected a folder written by `densessl data shard SRC OUT`")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != 1:
        raise ConfigError(f"{path}: not a densessl shard index (format {FORMAT}, version 1)")
    try:
        formats = json.loads((root / "index.json").read_text())["config"]["data_format"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{root / 'index.json'}: litdata's index is missing or unreadable ({e}); rewrite the "
                          f"shards") from None
    if _unsafe(formats):  # e.g. pickle: reading would run code from the file
        raise ConfigError(f"{root / 'index.json'}: data formats {_unsafe(formats)} are not "
                          f"read by densessl (only {', '.join(SAFE_FORMATS)})")
    return meta


class ShardDataset(Dataset):
    """The samples of a shard folder by index; see the module notes.

    `shard_sizes` (int64 array, one entry per shard) is what ResumableBatchSampler needs for its
    shard-aware order; `classes` comes from the source (ImageFolder, VOC, COCO), else empty.
    `size` and `min_side` act as ImageFolder's (data.size, data.min_side).
    """

    def __init__(self, root: str | os.PathLike, size: int | None = None, min_side: int = 1):
        self.root = Path(root)
        self.meta = read_meta(self.root)
        self.kind, self.classes = self.meta["kind"], list(self.meta["classes"])
        self.labelled = self.kind == "imagefolder" and bool(self.classes)
        self.shard_sizes = np.asarray(self.meta["shard_sizes"], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]]).astype(np.int64)
        self.size, self.min_side = size, min_side
        self._reader = None  # opened lazily, once per process (each DataLoader worker has its own)
        _litdata()

    def __len__(self) -> int:
        return int(self.shard_sizes.sum())

    def _read(self, i: int) -> dict:
        if self._reader is None:
            import litdata

            # batch_decode=0: one sample deserialised per read (the default decodes a window of
            # rows, which costs 20x on the shuffled reads of the sampler: docs/performance.md).
            self._reader = litdata.StreamingDataset(str(self.root), batch_decode=0, serializers=_serializers())
        from litdata.streaming.sampler import ChunkedIndex

        # The shard from our own table (a binary search), not litdata's linear scan of chunks.
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self._reader[ChunkedIndex(index=i, chunk_index=shard)]

    def __getitem__(self, index: int) -> dict:
        from densessl.data.imagefolder import ImageReadError
        from densessl.data.image_io import DecodeError, decode_rgb, fit_square

        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        record = self._read(i)
        where = f"sample {i} of {self.root} (source item {record.get('source_index')})"
        try:
            image = decode_rgb(bytes(record.pop("image")))
        except DecodeError as e:
            raise ImageReadError(f"could not decode image of {where} ({e})") from e
        if min(image.shape[1:]) < self.min_side:
            raise ImageReadError(f"image of {where} is {image.shape[2]}x{image.shape[1]} px, its shorter side "
                                 f"below data.min_side={self.min_side} px; lower data.min_side")
        if self.size is not None:
            image = fit_square(image, self.size)
        return {"image": image, **_fields(record)}

    def encoded(self, index: int) -> dict:
        """The sample's stored bytes, undecoded, with the size of the image its views are cut from
        (data.decode_on=device: densessl/data/device_decode.py)."""
        from densessl.data.image_io import decode_rgb, encoded_hw

        i = int(index)
        record = self._read(i)
        data = bytes(record.pop("image"))
        hw = encoded_hw(data)
        if hw is None or min(hw) < self.min_side:
            self[i]  # the decode or shorter-side error, worded once (__getitem__ raises it)
            hw = tuple(decode_rgb(data).shape[-2:])  # a header PIL could not read, decodable after all
        where = f"the image of sample {i} of {self.root} (source item {record.get('source_index')})"
        return {"data": data, "hw": hw if self.size is None else (self.size, self.size), "where": where,
                "fit": self.size, **_fields(record)}

    def __getstate__(self):  # DataLoader workers open their own reader
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    def __repr__(self) -> str:
        return (f"ShardDataset({str(self.root)!r}, kind={self.kind}, samples={len(self)}, "
                f"shards={len(self.shard_sizes)})")


class ShardVideoFrames(Dataset):
    """The videos of a video-frames shard folder, with VideoFrames' interface (num_frames,
    video_key, read_clip ...), so that the optical-flow variant pretrains on shards
    (``data.dataset=shards`` with ``method.name=pixpro_video``). `read_clip` reads and decodes
    exactly the frames asked for, from the shards that hold them (a video's frames are contiguous,
    `meta["videos"]`). `size`, `items_per_video`, `min_frames` act as VideoFrames' do."""

    has_gt_flow = False

    def __init__(self, root: str | os.PathLike, size: int | None = None, items_per_video: int = 1,
                 min_frames: int = 0):
        self.frames = ShardDataset(root)  # its records; decoded here, frame by frame
        meta = self.frames.meta
        if meta["kind"] != "video_frames" or "videos" not in meta:
            what = f"holds {meta['kind']} samples" if meta["kind"] != "video_frames" else \
                "was written before shards kept their video table"
            raise ConfigError(f"data.root={root}: {what}; a video method reads shards of video frames written by "
                              f"`densessl data shard FRAMES_FOLDER OUT --kind video_frames`")
        if items_per_video < 1:
            raise ValueError(f"items_per_video must be >= 1, got {items_per_video}")
        self.size, self.items_per_video = size, int(items_per_video)
        self.videos = [(name, int(start), int(n)) for name, start, n in meta["videos"] if n >= min_frames]
        self.skipped = [name for name, _, n in meta["videos"] if n < min_frames]
        if self.skipped:
            import warnings

            warnings.warn(f"{len(self.skipped)} videos in {root} have fewer than {min_frames} frames and were left "
                          f"out (first: {self.skipped[0]})")
        if not self.videos:
            raise ConfigError(f"data.root={root}: no video with at least method.video.min_frames={min_frames} frames")
        self.counts = [n for _, _, n in self.videos]

    def __len__(self) -> int:
        return len(self.videos) * self.items_per_video

    def _video(self, i: int) -> tuple[str, int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        return self.videos[i // self.items_per_video]

    def num_frames(self, i: int) -> int:
        return self._video(i)[2]

    def video_name(self, i: int) -> str:
        return self._video(i)[0]

    def video_key(self, i: int) -> str:
        name = self._video(i)[0]
        return name if self.size is None else f"{name}@{self.size}"

    def read_clip(self, i: int, frame_ids) -> dict:
        from densessl.data.image_io import DecodeError, decode_rgb
        from densessl.data.video import VideoReadError, resize_shorter

        name, start, n = self._video(i)
        ids = [int(k) for k in frame_ids]
        if any(k < 0 or k >= n for k in ids):
            raise IndexError(f"frames {ids} out of range for video {name!r} of {n} frames")
        frames = []
        for k in ids:
            record = self.frames._read(start + k)
            if record.get("video") != name or int(record.get("frame", -1)) != k:
                raise VideoReadError(f"shard sample {start + k} of {self.frames.root} is frame {record.get('frame')} "
                                     f"of {record.get('video')!r}, not frame {k} of {name!r}: the shard index "
                                     f"and its samples disagree; rewrite the shards")
            try:
                frames.append(decode_rgb(bytes(record["image"])))
            except DecodeError as e:
                raise VideoReadError(f"could not decode frame {k} of video {name!r} in {self.frames.root} ({e})") from e
        shapes = {tuple(f.shape) for f in frames}
        if len(shapes) > 1:  # before resizing, as VideoFrames checks
            raise VideoReadError(f"frames of video {name!r} differ in size: {sorted(shapes)}")
        return {"frames": torch.stack([resize_shorter(f, self.size) for f in frames])}

    def __getitem__(self, i: int) -> dict:
        return self.read_clip(i, list(range(min(2, self.num_frames(i)))))

    def __repr__(self) -> str:
        return f"ShardVideoFrames({str(self.frames.root)!r}, videos={len(self.videos)}, size={self.size})"
