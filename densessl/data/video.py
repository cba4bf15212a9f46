"""Video sources for the optical-flow PixPro variant (frame-pair views: densessl.data.frame_pairs).

A *video source* is a dataset of videos with this interface:
    len(source); source.num_frames(i); source.video_key(i) (a name for the flow cache);
    source.read_clip(i, frame_ids) -> {"frames": uint8 (T, 3, H, W), ...}
and, where the source knows the true motion, "flow_fw" / "flow_bw" (T-1, 2, H, W) in the clip
(frame k -> k+1 and k+1 -> k; conventions of densessl.data.flow).

Sources:
- `VideoFrames(root)`: `root/<video>/<frame>.jpg|png|...` (frames in natural sort order:
  frame2 before frame10), and optionally video files `root/<video>.mp4|avi|mov|mkv|webm`
  decoded with OpenCV, only the frames asked for, by index. Empty or unreadable input raises
  an error naming the folder or file.
- `MovingScenes` (densessl.data.moving_scenes): the built-in Fashion-Scenes whose items move
  (each item with its own smoothly varying velocity), on a static or slowly panning background, with the exact
  flow per frame pair (forward and backward), visibility masks and per-frame semantic maps,
  deterministic from (seed, split, index).

`densessl.data.frame_pairs.FramePairViews` wraps a source as the trainer's view dataset, keyed by (epoch, index) like
ViewDataset: each epoch draws a start frame t per video and `nframes` frames spaced by
`stride`; view 1 is a crop of frame t (view group 0), view 2 a crop of the last frame (view
group 1). Only the frames needed are decoded (the first and last; those between only for
exact flows and for estimated flows missing from the cache). It adds the chained forward flow
(first -> last frame) and the chained backward flow (last -> first frame), from the ground
truth, from a FlowModel (cached on disk), or zero
("none": frames without flow). `frame_pairs.collate_frame_pairs` batches them: the ViewDataset batch
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

from densessl.common.errors import ImageReadError
from densessl.config import require_extra
from densessl.data.image_io import DecodeError, decode_rgb
from densessl.data.moving_scenes import MovingScenes

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


class VideoReadError(ImageReadError):
    """A frame or video file could not be read (cli.main reports it as one line)."""


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
      (the FFmpeg that opencv-python wheels bundle). The frame count is the container's
      (CAP_PROP_FRAME_COUNT); only the requested frames are read, by index
      (`_read_video_frames`).
    `read_clip(i, ids)` decodes exactly the frames `ids`, nothing else.
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
        return resize_shorter(frame, self.size)

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


def resize_shorter(frame: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """The shorter side resized to `size` (bilinear, antialiased; aspect kept); None: unchanged."""
    if size is None:
        return frame
    h, w = frame.shape[-2:]
    s = size / min(h, w)
    return TF.resize(frame, [max(1, round(h * s)), max(1, round(w * s))], antialias=True)


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


# Frames up to this many past the current position are reached by grab() (decoded, not
# converted to RGB) rather than by a seek: a seek decodes again from the key frame before the
# target, which for long GOPs costs more than the few frames in between.
SEEK_GAP = 8


def _read_video_frames(path: Path, ids: list[int]) -> list[torch.Tensor]:
    """Frames `ids` (any order, repeats allowed) of a video file, by index: a seek to each
    wanted frame (OpenCV's CAP_PROP_POS_FRAMES decodes from the key frame before it, so the
    frame is the one a sequential read gives: checked on FFV1, MJPEG, MPEG-4 and Xvid files;
    tests/data/test_video.py checks FFV1, lossless, bit for bit),
    grab() over short gaps; frames between are never converted and none past the last is read."""
    cv2 = require_extra("cv2", "video", "reading video files")

    cap = cv2.VideoCapture(str(path))
    got = {}
    try:
        if not cap.isOpened():
            raise VideoReadError(f"cannot open video file {str(path)!r} with OpenCV")
        pos = 0  # index of the frame the next read() returns
        for k in sorted(set(ids)):
            if k < pos or k - pos > SEEK_GAP:
                cap.set(cv2.CAP_PROP_POS_FRAMES, k)
                pos = k
            while pos < k:
                if not cap.grab():
                    raise VideoReadError(f"cannot decode frame {pos} of video file {str(path)!r}")
                pos += 1
            ok, bgr = cap.read()
            if not ok:
                raise VideoReadError(f"cannot decode frame {k} of video file {str(path)!r}")
            pos += 1
            got[k] = torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1)))
    finally:
        cap.release()
    return [got[k] for k in ids]


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
    if data_cfg.dataset == "shards":  # a shard folder of video frames (densessl data shard --kind video_frames)
        from densessl.data.shards import ShardVideoFrames

        if not data_cfg.root:
            raise ValueError("data.dataset=shards needs data.root=<folder written by densessl data shard>")
        return ShardVideoFrames(data_cfg.root, size=data_cfg.size, items_per_video=video_cfg.items_per_video,
                                min_frames=video_cfg.min_frames)
    if data_cfg.dataset == "video_frames":
        if not data_cfg.root:
            raise ValueError("data.dataset=video_frames needs data.root=<folder of videos (frame folders or files)>")
        return VideoFrames(data_cfg.root, size=data_cfg.size, items_per_video=video_cfg.items_per_video,
                           min_frames=video_cfg.min_frames)
    raise ValueError(f"data.dataset={data_cfg.dataset!r} is not a video dataset; expected moving_scenes or video_frames")
