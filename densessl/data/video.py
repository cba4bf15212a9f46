"""Video data for the optical-flow PixPro variant: video sources and frame-pair views.

A *video source* is a dataset of videos with this interface:
    len(source); source.num_frames(i); source.video_key(i) (a name for the flow cache);
    source.read_clip(i, frame_ids) -> {"frames": uint8 (T, 3, H, W), ...}
and, where the source knows the true motion, "flow_fw" / "flow_bw" (T-1, 2, H, W) in the clip
(frame k -> k+1 and k+1 -> k; conventions of densessl.data.flow).

Sources:
- `VideoFrames(root)`: `root/<video>/<frame>.jpg|png|...` (frames in natural sort order:
  frame2 before frame10), and optionally video files `root/<video>.mp4|avi|mov|mkv|webm`
  decoded with OpenCV. Empty or unreadable input raises an error naming the folder or file.
- `MovingScenes` (densessl.data.moving_scenes): the built-in Fashion-Scenes whose items move
  (each item with its own smoothly varying velocity), on a static or slowly panning background, with the exact
  flow per frame pair (forward and backward), visibility masks and per-frame semantic maps,
  deterministic from (seed, split, index).

`FramePairViews` wraps a source as the trainer's view dataset, keyed by (epoch, index) like
ViewDataset: each epoch draws a start frame t per video and reads `nframes` frames spaced by
`stride`; view 1 is a crop of frame t (view group 0), view 2 a crop of the last frame (view
group 1). It adds the chained forward flow (first -> last frame) and the chained backward flow
(last -> first frame), from the ground truth, from a FlowModel (cached on disk), or zero
("none": frames without flow). `collate_frame_pairs` batches them: the ViewDataset batch
plus "flow" (B, 2, h, w), "flow_back" (B, 2, h, w) and "source_size" (B, 2) = (W, H).
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from densessl.config import require_extra
from densessl.data import flow as flowlib
from densessl.data.image_io import DecodeError, decode_rgb
from densessl.data.moving_scenes import MovingScenes
from densessl.data.views import ViewSampler, collate_views, expand_slots

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
FLOW_SOURCES = ("gt", "none", "dis", "dis-fast", "dis-ultrafast", "farneback", "raft_small", "raft_large")


class VideoReadError(ValueError):
    """A frame or video file could not be read."""


def natural_key(name: str):
    """Sort key that orders embedded numbers by value: frame2 < frame10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


# ------------------------------------------------------------------------ folders of frames


class VideoFrames(Dataset):
    """Videos under `root`: folders of frames, and optionally video files.

    - `root/<video>/<frame>.<ext>`: a video per sub-folder; its frames are the images directly
      inside (extensions FRAME_EXTENSIONS, case-insensitive, hidden files ignored), in natural
      order. A sub-folder without frames is an error naming it.
    - `root/<video>.<ext>` with ext in VIDEO_EXTENSIONS: decoded with OpenCV's VideoCapture
      (whatever codecs the installed OpenCV has). The frame count is the container's
      (CAP_PROP_FRAME_COUNT); a clip is read by seeking to its first frame and decoding on.
    Videos are sorted by name. `size`: the shorter side of every frame is resized to `size`
    (bilinear, antialiased; aspect kept); None keeps the frames as they are.
    `items_per_video`: dataset items per video (item i shows video i // items_per_video), so a
    few long videos still fill batches; each item draws its own clip.
    `min_frames`: videos with fewer frames are left out, counted in `self.skipped` and
    reported in one warning (0: keep all).
    """

    has_gt_flow = False

    def __init__(self, root: str | os.PathLike, size: Optional[int] = None, items_per_video: int = 1,
                 min_frames: int = 0, video_files: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder {str(self.root)!r} does not exist or is not a directory")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive int or None, got {size!r}")
        if items_per_video < 1:
            raise ValueError(f"items_per_video must be >= 1, got {items_per_video}")
        self.size, self.items_per_video = size, int(items_per_video)
        self.videos: list[tuple[str, Union[list[Path], Path]]] = []  # (name, frames | video file)
        self.skipped: list[str] = []
        counts = []
        for entry in sorted(self.root.iterdir(), key=lambda p: natural_key(p.name)):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                frames = sorted((p for p in entry.iterdir() if p.is_file() and not p.name.startswith(".")
                                 and p.suffix.lower() in FRAME_EXTENSIONS), key=lambda p: natural_key(p.name))
                if not frames:
                    raise FileNotFoundError(f"video folder {str(entry)!r} holds no frames (expected images "
                                            f"{', '.join(FRAME_EXTENSIONS)} directly inside it)")
                n, item = len(frames), frames
            elif video_files and entry.suffix.lower() in VIDEO_EXTENSIONS:
                n, item = _video_file_length(entry), entry
            else:
                continue
            if n < min_frames:
                self.skipped.append(str(entry))
                continue
            self.videos.append((entry.name, item))
            counts.append(n)
        if self.skipped:
            warnings.warn(f"{len(self.skipped)} videos under {self.root} have fewer than {min_frames} frames and "
                          f"were left out (first: {self.skipped[0]})")
        if not self.videos:
            kinds = "sub-folders of frames" + (f" or video files ({', '.join(VIDEO_EXTENSIONS)})" if video_files else "")
            raise FileNotFoundError(f"no videos under {str(self.root)!r}: expected {kinds}")
        self.counts = counts

    def __len__(self) -> int:
        return len(self.videos) * self.items_per_video

    def _video(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        return i // self.items_per_video

    def num_frames(self, i: int) -> int:
        return self.counts[self._video(i)]

    def video_key(self, i: int) -> str:
        name = self.videos[self._video(i)][0]
        return name if self.size is None else f"{name}@{self.size}"

    def video_name(self, i: int) -> str:
        return self.videos[self._video(i)][0]

    def _resize(self, frame: torch.Tensor) -> torch.Tensor:
        if self.size is None:
            return frame
        h, w = frame.shape[-2:]
        s = self.size / min(h, w)
        return TF.resize(frame, [max(1, round(h * s)), max(1, round(w * s))], antialias=True)

    def read_clip(self, i: int, frame_ids: Sequence[int]) -> dict:
        name, item = self.videos[self._video(i)]
        ids = [int(k) for k in frame_ids]
        n = self.num_frames(i)
        if any(k < 0 or k >= n for k in ids):
            raise IndexError(f"frames {ids} out of range for video {name!r} of {n} frames")
        if isinstance(item, list):
            frames = [_read_frame(item[k]) for k in ids]
        else:
            frames = _read_video_frames(item, ids)
        shapes = {tuple(f.shape) for f in frames}
        if len(shapes) > 1:
            raise VideoReadError(f"frames of video {name!r} differ in size: {sorted(shapes)}")
        return {"frames": torch.stack([self._resize(f) for f in frames])}

    def __getitem__(self, i: int) -> dict:
        """The first two frames (or one) of the item's video; for inspection."""
        return self.read_clip(i, list(range(min(2, self.num_frames(i)))))

    def __repr__(self) -> str:
        return f"VideoFrames({str(self.root)!r}, videos={len(self.videos)}, size={self.size})"


def _read_frame(path: Path) -> torch.Tensor:
    try:
        return decode_rgb(path)
    except (OSError, DecodeError) as e:
        raise VideoReadError(f"cannot read frame {str(path)!r}: {e.cause if isinstance(e, DecodeError) else e}") from None


def _video_file_length(path: Path) -> int:
    cv2 = require_extra("cv2", "video", "reading video files")

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoReadError(f"cannot open video file {str(path)!r} with OpenCV")
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        cap.release()
    if n <= 0:
        raise VideoReadError(f"video file {str(path)!r} reports no frames")
    return n


def _read_video_frames(path: Path, ids: list[int]) -> list[torch.Tensor]:
    cv2 = require_extra("cv2", "video", "reading video files")

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoReadError(f"cannot open video file {str(path)!r} with OpenCV")
        first, last = min(ids), max(ids)
        if first:
            cap.set(cv2.CAP_PROP_POS_FRAMES, first)
        got = {}
        for k in range(first, last + 1):
            ok, bgr = cap.read()
            if not ok:
                raise VideoReadError(f"cannot decode frame {k} of video file {str(path)!r}")
            if k in ids:
                got[k] = torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1)))
    finally:
        cap.release()
    return [got[k] for k in ids]


# ------------------------------------------------------------------------ frame-pair views


class FramePairViews(Dataset):
    """The trainer's view dataset for video sources, indexed by (epoch, index) pairs.

    For item (epoch, i), all randomness comes from default_rng([seed, epoch, i]): the start
    frame t (uniform over the starts that fit), then the crops as ViewSampler draws them.
    Frames t, t + stride, ..., t + (nframes - 1) stride are read; view 1 = view group 0 on
    frame t, view 2 = view group 1 on the last frame (nframes = 1: both on frame t, plain
    PixPro on single frames).

    flow: "gt" (the source's exact flow; MovingScenes), "none" (zero flow: frames without
    correspondence by motion), or a FlowModel (estimated, cached in `cache` when given).
    Pairwise flows are chained (first -> last frame and last -> first frame). `flow_size`
    (None: the frame size) bounds the longer side of the flows: estimated flows are resized
    before they are cached and chained (a small cache, like the fork's 1/8-resolution files);
    exact flows are chained at frame size, then resized.
    Sample: {"views", "geometry", "index", "flow" (2, h, w), "flow_back" (2, h, w),
    "source_size" (2,) = (W, H), "labels" when the source has them}.
    """

    def __init__(self, source, groups, seed: int, nframes: int = 2, stride: int = 1,
                 flow: Union[str, "flowlib.FlowModel"] = "gt", cache: Optional[flowlib.FlowCache] = None,
                 flow_size: Optional[int] = None):
        if nframes < 1 or stride < 1:
            raise ValueError(f"nframes and stride must be >= 1, got nframes={nframes}, stride={stride}")
        slots = expand_slots(list(groups))
        if len(slots) != 2 or any(g.grid > 0 for g in groups):
            raise ValueError(f"frame pairs take exactly 2 plain view slots (one crop of the first frame, one of the "
                             f"last); the recipe's views give {len(slots)} slots")
        if isinstance(flow, str) and flow not in ("gt", "none"):
            raise ValueError(f"flow must be 'gt', 'none' or a FlowModel, got {flow!r}")
        if flow == "gt" and nframes > 1 and not getattr(source, "has_gt_flow", False):
            raise ValueError(f"flow='gt' needs a source with ground-truth flow (MovingScenes); {type(source).__name__} "
                             f"has none: estimate it (dis, farneback, or a learned model)")
        self.source, self.seed, self.nframes, self.stride = source, int(seed), int(nframes), int(stride)
        self.flow, self.cache, self.flow_size = flow, cache, flow_size
        self.samplers = [ViewSampler([slots[0]]), ViewSampler([slots[1]])]
        span = self.span
        short = [i for i in range(len(source)) if source.num_frames(i) < span]
        if short:
            name = getattr(source, "video_name", source.video_key)(short[0])
            raise ValueError(f"{len(short)} videos have fewer than nframes={nframes} frames at stride={stride} "
                             f"({span} frames needed), e.g. {name!r}; pass min_frames={span} to VideoFrames to "
                             f"leave them out, or lower nframes/stride")

    @property
    def span(self) -> int:
        return (self.nframes - 1) * self.stride + 1

    def __len__(self):
        return len(self.source)

    def frame_ids(self, rng: np.random.Generator, i: int) -> list[int]:
        start = int(rng.integers(0, self.source.num_frames(i) - self.span + 1))
        return [start + k * self.stride for k in range(self.nframes)]

    def _flows(self, clip: dict, ids: list[int], i: int) -> tuple[torch.Tensor, torch.Tensor]:
        frames = clip["frames"]
        H, W = frames.shape[-2:]
        if self.nframes == 1 or self.flow == "none":
            zero = torch.zeros(2, 1, 1)
            return zero, zero.clone()
        size = flowlib.flow_size_for(H, W, self.flow_size)
        if self.flow == "gt":
            fw, bw = list(clip["flow_fw"]), list(clip["flow_bw"])
            f, b = flowlib.chain_flows(fw), flowlib.chain_flows(bw[::-1])  # exact flows: chained at frame size
            return flowlib.resize_flow(f, size), flowlib.resize_flow(b, size)
        fw, bw = flowlib.pairwise_flows(frames, ids, self.source.video_key(i), self.flow, self.cache, size)
        return flowlib.chain_flows(fw), flowlib.chain_flows(bw[::-1])  # last -> ... -> first

    def __getitem__(self, key):
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        ids = self.frame_ids(rng, i)
        clip = self.source.read_clip(i, ids)
        frames = clip["frames"]
        v1, g1 = self.samplers[0](frames[0], rng)
        v2, g2 = self.samplers[1](frames[-1], rng)
        fw, bw = self._flows(clip, ids, i)
        H, W = frames.shape[-2:]
        out = {"views": v1 + v2, "geometry": g1 + g2, "index": i, "flow": fw, "flow_back": bw,
               "source_size": torch.tensor([float(W), float(H)])}
        if "labels" in clip:
            out["labels"] = clip["labels"]
        return out


def collate_frame_pairs(samples: list[dict]) -> dict:
    """collate_views plus flow (B,2,h,w), flow_back (B,2,h,w) and source_size (B,2)."""
    batch = collate_views(samples)
    for k in ("flow", "flow_back", "source_size"):
        batch[k] = torch.stack([s[k] for s in samples])
    return batch


# ------------------------------------------------------------------------ building from a config


def build_video_source(data_cfg, video_cfg, split: str = "train"):
    """A video source from the config's `data:` section and the method's `video:` section.

    data.dataset: moving_scenes (data.num_scenes videos of data.size px, data.seed, data.root =
    the Fashion-MNIST folder) or video_frames (data.root = the folder of videos, data.size =
    shorter side or null).
    """
    if data_cfg.dataset == "moving_scenes":
        return MovingScenes(split=split, num_videos=data_cfg.num_scenes, size=data_cfg.size or 64,
                            num_frames=video_cfg.length, seed=data_cfg.seed, root=data_cfg.root,
                            max_speed=video_cfg.max_speed, pan_speed=video_cfg.pan_speed)
    if data_cfg.dataset == "video_frames":
        if not data_cfg.root:
            raise ValueError("data.dataset=video_frames needs data.root=<folder of videos (frame folders or files)>")
        return VideoFrames(data_cfg.root, size=data_cfg.size, items_per_video=video_cfg.items_per_video,
                           min_frames=video_cfg.min_frames)
    raise ValueError(f"data.dataset={data_cfg.dataset!r} is not a video dataset; expected moving_scenes or video_frames")


def build_frame_pairs(source, groups, seed: int, video_cfg) -> FramePairViews:
    """FramePairViews with the flow source named by the method's `video:` section."""
    flow = video_cfg.flow
    model = flow if flow in ("gt", "none") else flowlib.build_flow_model(flow, video_cfg.flow_weights)
    cache = flowlib.FlowCache(video_cfg.flow_cache) if video_cfg.flow_cache and model not in ("gt", "none") else None
    return FramePairViews(source, groups, seed, nframes=video_cfg.nframes, stride=video_cfg.stride, flow=model,
                          cache=cache, flow_size=video_cfg.flow_size)


# ------------------------------------------------------------------------ offline flow


def precompute_flows(source, model: "flowlib.FlowModel", cache: "flowlib.FlowCache", stride: int = 1,
                     flow_size: Optional[int] = None, shard: tuple[int, int] = (0, 1), chunk: int = 16,
                     log=print) -> int:
    """Fill `cache` with the forward and backward flows of every frame pair (k, k + stride)
    of every video of `source` (as FramePairViews with the same model, stride and flow_size
    will ask for them). `shard` = (k, n): only videos v with v % n == k (for parallel jobs).
    Frames are read `chunk` at a time. Returns the number of flows computed or found.
    """
    k_shard, n_shard = shard
    per_video = getattr(source, "items_per_video", 1)
    n_videos = len(source) // per_video
    done = 0
    for v in range(k_shard, n_videos, n_shard):
        i = v * per_video
        n = source.num_frames(i)
        key = source.video_key(i)
        for phase in range(min(stride, max(n - stride, 0))):  # frames phase, phase + stride, ... form one chain
            ids = list(range(phase, n, stride))
            for s in range(0, len(ids) - 1, chunk - 1):
                part = ids[s:s + chunk]
                frames = source.read_clip(i, part)["frames"]
                size = flowlib.flow_size_for(*frames.shape[-2:], flow_size)
                fw, bw = flowlib.pairwise_flows(frames, part, key, model, cache, size)
                done += len(fw) + len(bw)
        if log is not None:
            log(f"video {v + 1}/{n_videos} {key}: {n} frames")
    return done


def main(argv=None) -> int:
    """python -m densessl.data.video precompute-flows ROOT --cache DIR [--flow dis] ..."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m densessl.data.video",
                                description="precompute optical flow for a folder of videos into a flow cache")
    p.add_argument("command", choices=["precompute-flows"])
    p.add_argument("root", help="folder of videos (frame folders or video files)")
    p.add_argument("--cache", required=True, help="the flow cache folder (method.video.flow_cache)")
    p.add_argument("--flow", default="dis", help="dis | dis-fast | dis-ultrafast | farneback | raft_small | raft_large")
    p.add_argument("--weights", default=None, help="raft_*: the weights file")
    p.add_argument("--stride", type=int, default=1, help="method.video.stride")
    p.add_argument("--flow-size", type=int, default=None, help="method.video.flow_size")
    p.add_argument("--size", type=int, default=None, help="data.size (frames' shorter side), as in training")
    p.add_argument("--shard", default="0/1", help="k/n: this job's share of the videos")
    p.add_argument("--float16", action="store_true", help="store flows as float16")
    args = p.parse_args(argv)
    k, n = (int(x) for x in args.shard.split("/"))
    source = VideoFrames(args.root, size=args.size)
    model = flowlib.build_flow_model(args.flow, args.weights)
    cache = flowlib.FlowCache(args.cache, "float16" if args.float16 else "float32")
    total = precompute_flows(source, model, cache, args.stride, args.flow_size, (k, n))
    print(f"{total} flows in {args.cache}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
