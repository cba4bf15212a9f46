"""Frame-pair views of a video source: the trainer's view dataset for the optical-flow PixPro
variant (sources: densessl.data.video; flows: densessl.data.flow)."""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from densessl.common.errors import ConfigError
from densessl.data import flow as flowlib
from densessl.data.video import VideoReadError
from densessl.data.views import ViewSampler, collate_views, expand_slots

# method.video.flow: exact (moving scenes), zero, or estimated by a densessl.data.flow model
FLOW_SOURCES = ("gt", "none", "dis", "dis-fast", "dis-ultrafast", "farneback", "raft_small", "raft_large")

class FramePairViews(Dataset):
    """The trainer's view dataset for video sources, indexed by (epoch, index) pairs.

    For item (epoch, i), all randomness comes from default_rng([seed, epoch, i]): the start
    frame t (uniform over the starts that fit), then the crops as ViewSampler draws them.
    Frames t, t + stride, ..., t + (nframes - 1) stride are drawn; view 1 = view group 0 on
    frame t, view 2 = view group 1 on the last frame (nframes = 1: both on frame t, plain
    PixPro on single frames).

    flow: "gt" (the source's exact flow; MovingScenes), "none" (zero flow: frames without
    correspondence by motion), or a FlowModel (estimated, cached in `cache` when given).
    Pairwise flows are chained (first -> last frame and last -> first frame). `flow_size`
    (None: the frame size) bounds the longer side of the flows: estimated flows are resized
    before they are cached and chained (a small cache, like the fork's 1/8-resolution files);
    exact flows are chained at frame size, then resized.
    Only the frames needed are read from the source (`read_ids`): the first and the last; the
    frames between only where the flow chain needs them (exact flows; estimated flows missing
    from the cache).
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
            raise ConfigError(f"method.video.flow=gt needs a source with ground-truth flow (data.dataset=moving_scenes); "
                              f"{type(source).__name__} has none: estimate it (method.video.flow=dis, farneback, or "
                              f"a learned model: raft_small, raft_large)")
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

    def use_device(self, device: str | torch.device) -> None:
        """Compute estimated flows on `device` (the trainer passes train.device's): a learned model
        (RAFT) runs there, OpenCV's stay on the CPU."""
        if not isinstance(self.flow, str):
            self.flow = self.flow.to(device)

    @property
    def worker_start_method(self) -> Optional[str]:
        """"spawn" when a flow model computes on CUDA: a forked data-loader worker cannot use CUDA
        once the parent has (the trainer passes this to its DataLoader)."""
        device = getattr(self.flow, "device", None)
        return "spawn" if device is not None and torch.device(device).type == "cuda" else None

    def read_ids(self, ids: list[int]) -> list[int]:
        """The frames of `ids` that are read up front: all of them for exact flows (the source
        derives them from every frame), else only the first and last (the views' frames);
        estimated flows read the frames between only for pairs missing from the cache (_flows)."""
        return ids if self.flow == "gt" and self.nframes > 1 else sorted({ids[0], ids[-1]})

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
        have = dict(zip(self.read_ids(ids), frames))  # frame id -> the frame read for the views

        def read(positions: list[int]) -> dict:  # the frames of pairs missing from the cache
            todo = [ids[k] for k in positions if ids[k] not in have]
            if todo:
                more = self.source.read_clip(i, todo)["frames"]
                if more.shape[-2:] != frames.shape[-2:]:
                    raise VideoReadError(f"frames of video {self.source.video_key(i)!r} differ in size: "
                                         f"{tuple(frames.shape[-2:])} and {tuple(more.shape[-2:])}")
                have.update(zip(todo, more))
            return {k: have[ids[k]] for k in positions}

        fw, bw = flowlib.cached_pairwise_flows(ids, (H, W), read, self.source.video_key(i), self.flow, self.cache,
                                               size)
        return flowlib.chain_flows(fw), flowlib.chain_flows(bw[::-1])  # last -> ... -> first

    def __getitem__(self, key):
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        ids = self.frame_ids(rng, i)
        clip = self.source.read_clip(i, self.read_ids(ids))
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
    """collate_views (with source_size (B,2)) plus flow (B,2,h,w) and flow_back (B,2,h,w)."""
    batch = collate_views(samples)
    for k in ("flow", "flow_back"):
        batch[k] = torch.stack([s[k] for s in samples])
    return batch


def build_frame_pairs(source, groups, seed: int, video_cfg) -> FramePairViews:
    """FramePairViews with the flow source named by the method's `video:` section."""
    flow = video_cfg.flow
    model = flow if flow in ("gt", "none") else flowlib.build_flow_model(flow, video_cfg.flow_weights)
    cache = flowlib.FlowCache(video_cfg.flow_cache) if video_cfg.flow_cache and model not in ("gt", "none") else None
    return FramePairViews(source, groups, seed, nframes=video_cfg.nframes, stride=video_cfg.stride, flow=model,
                          cache=cache, flow_size=video_cfg.flow_size)
