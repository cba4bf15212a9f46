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
- `MovingScenes`: the built-in Fashion-Scenes whose items move (each item with its own
  smoothly varying velocity), on a static or slowly panning background, with the exact
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
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from densessl.config import require_extra
from densessl.data import flow as flowlib
from densessl.data.scenes import (MASK_THRESHOLD, NUM_CLASSES, OPACITY_GAIN, SHADE_MIN, _FashionCanvas,
                                  _pick_colour, make_background)
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
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises several types for corrupt files
        raise VideoReadError(f"cannot read frame {str(path)!r}: {e}") from None
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


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


# ------------------------------------------------------------------------ moving Fashion-Scenes


class MovingScenes(_FashionCanvas):
    """Fashion-Scenes videos: items move, the background is static or pans slowly.

    Video i is a pure function of (seed, split, i); train and val use the disjoint item pools
    of FashionScenes. A video: a background of side size + 2M (M = the largest pan offset),
    seen through a size x size window; `min_items..max_items` Fashion-MNIST items, tinted and
    blended as in FashionScenes, pasted back to front. Item k sits (top-left corner) at
        p_k(t) = p_k(0) + v_k t + a_k t^2 / 2     rounded to whole pixels,
    with speed |v_k| uniform in [min_speed, max_speed] px per frame in a uniform direction and
    |a_k| <= max_accel; the window moves by round(u (t - (T-1)/2)) with |u| up to `pan_speed`
    (with probability `pan_p`, else the background is static). Items may leave the frame.
    At t = 0 every item lies inside the frame and keeps at least `min_visible` of its pixels
    visible (a few placements are tried; the last one is kept otherwise).

    Positions are whole pixels, so the rendered frames are exact translations and the flow is
    exact: a pixel owned by item k (its mask, intensity > MASK_THRESHOLD, visible there) moves
    by p_k(t_b) - p_k(t_a); a background pixel by the window offset difference. Soft item edges
    (intensity below the threshold) count as background.

    `read_clip(i, frame_ids)` -> frames uint8 (T,3,S,S), semantic int64 (T,S,S) (0 background,
    class + 1 on visible item pixels), flow_fw / flow_bw float32 (T-1,2,S,S) between
    consecutive listed frames, visible_fw / visible_bw bool (T-1,S,S) (the pixel's point is
    inside the other frame and not hidden there: the exact occlusion mask), labels (10,)
    multi-hot of the video's items, classes and item_ids (n,). `__getitem__(i)` is the clip of
    all `num_frames` frames.
    """

    _kind = 2
    has_gt_flow = True

    def __init__(self, split: str = "train", num_videos: int = 10000, size: int = 64, num_frames: int = 16,
                 seed: int = 0, root: str | os.PathLike | None = None, min_items: int = 1, max_items: int = 4, *,
                 item_scale: tuple[float, float] = (0.35, 0.6), min_speed: float = 0.25, max_speed: float = 1.5,
                 max_accel: float = 0.05, pan_speed: float = 0.5, pan_p: float = 0.5, min_visible: float = 0.5,
                 max_tries: int = 30):
        super().__init__(split, num_videos, size, seed, root)
        if not 1 <= int(min_items) <= int(max_items):
            raise ValueError(f"need 1 <= min_items <= max_items, got {min_items}, {max_items}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if not 0.0 <= min_speed <= max_speed or max_accel < 0 or pan_speed < 0 or not 0 <= pan_p <= 1:
            raise ValueError(f"need 0 <= min_speed <= max_speed, max_accel >= 0, pan_speed >= 0, 0 <= pan_p <= 1; "
                             f"got {min_speed}, {max_speed}, {max_accel}, {pan_speed}, {pan_p}")
        lo, hi = float(item_scale[0]), float(item_scale[1])
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"item_scale must satisfy 0 < lo <= hi <= 1, got {item_scale}")
        self.num_frames_ = int(num_frames)
        self.min_items, self.max_items = int(min_items), int(max_items)
        self.item_scale = (lo, hi)
        self.min_speed, self.max_speed, self.max_accel = float(min_speed), float(max_speed), float(max_accel)
        self.pan_speed, self.pan_p = float(pan_speed), float(pan_p)
        self.min_visible, self.max_tries = float(min_visible), int(max_tries)
        self.margin = int(np.ceil(self.pan_speed * self.num_frames_ / 2.0)) + 1

    # -- the video's plan: everything random, drawn once from the video's rng

    def _plan(self, i: int) -> dict:
        i = self._index(i)
        rng = self._rng(i)
        S, M, T = self.size, self.margin, self.num_frames_
        big = make_background(rng, S + 2 * M)
        pan = np.zeros(2)
        if rng.random() < self.pan_p and self.pan_speed > 0:
            ang = rng.uniform(0, 2 * np.pi)
            pan = rng.uniform(0.5, 1.0) * self.pan_speed * np.array([np.cos(ang), np.sin(ang)])
        window0 = big[M:M + S, M:M + S]
        items = []
        vis: list[np.ndarray] = []  # visible masks at t=0 (full canvas)
        full_counts: list[int] = []
        min_side = max(4, int(round(0.2 * S)))
        n = int(rng.integers(self.min_items, self.max_items + 1))
        for _ in range(n):
            item = int(self.pool[rng.integers(len(self.pool))])
            side = min(max(int(round(rng.uniform(*self.item_scale) * S)), min_side), S)
            alpha = self._alpha(item, side)
            mask = alpha > MASK_THRESHOLD
            count = int(mask.sum())
            if count == 0:
                continue
            y = x = 0
            for _try in range(self.max_tries):
                y, x = int(rng.integers(0, S - side + 1)), int(rng.integers(0, S - side + 1))
                ok = True
                for v, f in zip(vis, full_counts):
                    left = int(v.sum()) - int((v[y:y + side, x:x + side] & mask).sum())
                    if left < max(1.0, self.min_visible * f):
                        ok = False
                        break
                if ok:
                    break
            for v in vis:
                v[y:y + side, x:x + side] &= ~mask
            m = np.zeros((S, S), bool)
            m[y:y + side, x:x + side] = mask
            vis.append(m)
            full_counts.append(count)
            speed = rng.uniform(self.min_speed, self.max_speed)
            ang = rng.uniform(0, 2 * np.pi)
            v0 = speed * np.array([np.cos(ang), np.sin(ang)])
            ang = rng.uniform(0, 2 * np.pi)
            acc = rng.uniform(0, self.max_accel) * np.array([np.cos(ang), np.sin(ang)])
            colour = _pick_colour(rng, window0[y:y + side, x:x + side])
            items.append({"id": item, "cls": int(self.data.labels[item]), "alpha": alpha, "mask": mask,
                          "colour": colour, "p0": np.array([x, y], float), "v": v0, "a": acc})
        return {"big": big, "pan": pan, "items": items, "T": T}

    def _offset(self, plan: dict, t: float) -> np.ndarray:
        """(x, y) top-left of the window in the big background at time t (whole pixels)."""
        return np.floor(self.margin + plan["pan"] * (t - (plan["T"] - 1) / 2.0) + 0.5).astype(np.int64)

    @staticmethod
    def _position(item: dict, t: float) -> np.ndarray:
        return np.floor(item["p0"] + item["v"] * t + 0.5 * item["a"] * t * t + 0.5).astype(np.int64)

    def _render(self, plan: dict, t: float) -> tuple[np.ndarray, np.ndarray]:
        """(canvas float32 (S,S,3), owner int64 (S,S): -1 background, k item k)."""
        S = self.size
        ox, oy = self._offset(plan, t)
        canvas = plan["big"][oy:oy + S, ox:ox + S].copy()
        owner = np.full((S, S), -1, np.int64)
        for k, it in enumerate(plan["items"]):
            x, y = self._position(it, t)
            s = it["alpha"].shape[0]
            y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + s, S), min(x + s, S)
            if y0 >= y1 or x0 >= x1:
                continue
            a = it["alpha"][y0 - y:y1 - y, x0 - x:x1 - x, None]
            opacity = np.minimum(a * OPACITY_GAIN, 1.0)
            region = canvas[y0:y1, x0:x1]
            region *= 1.0 - opacity
            region += opacity * (it["colour"] * (SHADE_MIN + (1.0 - SHADE_MIN) * a))
            owner[y0:y1, x0:x1][it["mask"][y0 - y:y1 - y, x0 - x:x1 - x]] = k
        return canvas, owner

    def _displacements(self, plan: dict, ta: float, tb: float) -> np.ndarray:
        """(n_items + 1, 2) float32 displacement a -> b of each item, and last the background."""
        d = [self._position(it, tb) - self._position(it, ta) for it in plan["items"]]
        d.append(self._offset(plan, ta) - self._offset(plan, tb))
        return np.asarray(d, np.float32).reshape(-1, 2)

    @staticmethod
    def _flow_and_visibility(owner_a, owner_b, disp) -> tuple[np.ndarray, np.ndarray]:
        S = owner_a.shape[0]
        flow = disp[owner_a].transpose(2, 0, 1)  # owner -1 indexes the background's last row
        ys, xs = np.mgrid[0:S, 0:S]
        xb = xs + flow[0].astype(np.int64)
        yb = ys + flow[1].astype(np.int64)
        inside = (xb >= 0) & (xb < S) & (yb >= 0) & (yb < S)
        visible = np.zeros((S, S), bool)
        visible[inside] = owner_b[yb[inside], xb[inside]] == owner_a[inside]
        return np.ascontiguousarray(flow), visible

    def num_frames(self, i: int) -> int:
        return self.num_frames_

    def video_key(self, i: int) -> str:
        return f"moving-scenes-s{self.seed}-{self.split}-{self.size}px-{self._index(i)}"

    def read_clip(self, i: int, frame_ids: Sequence[int]) -> dict:
        ids = [int(k) for k in frame_ids]
        if not ids or any(k < 0 or k >= self.num_frames_ for k in ids):
            raise IndexError(f"frames {ids} out of range for videos of {self.num_frames_} frames")
        plan = self._plan(i)
        rendered = [self._render(plan, t) for t in ids]
        frames = torch.stack([self._to_image(c) for c, _ in rendered])
        owners = [o for _, o in rendered]
        classes = np.asarray([it["cls"] for it in plan["items"]], np.int64)
        sem_lut = np.concatenate([classes + 1, [0]])  # owner -1 -> background 0
        S = self.size
        fw, bw, vis_fw, vis_bw = [], [], [], []
        for k in range(len(ids) - 1):
            disp = self._displacements(plan, ids[k], ids[k + 1])
            f, v = self._flow_and_visibility(owners[k], owners[k + 1], disp)
            b, vb = self._flow_and_visibility(owners[k + 1], owners[k], -disp)
            fw.append(f), bw.append(b), vis_fw.append(v), vis_bw.append(vb)
        labels = np.zeros(NUM_CLASSES, np.float32)
        labels[classes] = 1.0

        def stack(xs, shape, dtype):
            return torch.from_numpy(np.stack(xs) if xs else np.zeros((0,) + shape, dtype))

        return {
            "frames": frames,
            "semantic": torch.from_numpy(np.stack([sem_lut[o] for o in owners])),
            "flow_fw": stack(fw, (2, S, S), np.float32), "flow_bw": stack(bw, (2, S, S), np.float32),
            "visible_fw": stack(vis_fw, (S, S), bool), "visible_bw": stack(vis_bw, (S, S), bool),
            "labels": torch.from_numpy(labels),
            "classes": torch.from_numpy(classes),
            "item_ids": torch.as_tensor([it["id"] for it in plan["items"]], dtype=torch.int64),
        }

    def __getitem__(self, i) -> dict:
        return self.read_clip(i, range(self.num_frames_))

    def __repr__(self) -> str:
        return (f"MovingScenes(split={self.split!r}, num_videos={self.num}, size={self.size}, "
                f"num_frames={self.num_frames_}, speed={self.min_speed}..{self.max_speed}, pan={self.pan_speed}, "
                f"seed={self.seed})")


class MovingSceneFrames(Dataset):
    """Single frames of MovingScenes videos with their semantic maps, for segmentation probes.

    Item k is frame `(k % frames_per_video) * (num_frames // frames_per_video)` of video
    k // frames_per_video: {"image": uint8 (3,S,S), "semantic": int64 (S,S), "labels"}.
    """

    def __init__(self, videos: MovingScenes, frames_per_video: int = 1):
        if not 1 <= frames_per_video <= videos.num_frames_:
            raise ValueError(f"frames_per_video must be in [1, {videos.num_frames_}], got {frames_per_video}")
        self.videos, self.fpv = videos, int(frames_per_video)

    def __len__(self):
        return len(self.videos) * self.fpv

    def __getitem__(self, k):
        v, j = divmod(int(k), self.fpv)
        t = j * (self.videos.num_frames_ // self.fpv)
        clip = self.videos.read_clip(v, [t])
        return {"image": clip["frames"][0], "semantic": clip["semantic"][0], "labels": clip["labels"]}


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


def moving_scenes_segmentation(split: str, num: int, size: int = 64, seed: int = 0, root=None,
                               frames_per_video: int = 2, num_frames: int = 16, max_speed: float = 1.5,
                               pan_speed: float = 0.5):
    """(items, class names) for a segmentation probe on MovingScenes frames: `num` items
    {"image", "mask"} (mask: 0 background, class + 1), kept in memory, from
    ceil(num / frames_per_video) videos of the split; class names start with "background".
    The shape densessl.eval.transfer.build_task_dataset gives for task="segmentation"."""
    from densessl.data.fashion_mnist import CLASSES

    videos = MovingScenes(split=split, num_videos=-(-num // frames_per_video), size=size, num_frames=num_frames,
                          seed=seed, root=root, max_speed=max_speed, pan_speed=pan_speed)
    frames = MovingSceneFrames(videos, frames_per_video)
    items = []
    for k in range(num):
        s = frames[k]
        items.append({"image": s["image"], "mask": s["semantic"]})
    return items, ("background",) + tuple(CLASSES)
