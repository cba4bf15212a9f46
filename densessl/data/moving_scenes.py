"""MovingScenes: Fashion-Scenes videos with exact flow, a video source for the optical-flow
PixPro variant (the source interface is in densessl.data.video), and its frames with their
semantic maps for segmentation probes."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from densessl.data.scenes import (MASK_THRESHOLD, NUM_CLASSES, OPACITY_GAIN, SHADE_MIN, _FashionCanvas,
                                  _pick_colour, make_background)


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
