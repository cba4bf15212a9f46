"""``densessl data flows ROOT --cache DIR``: optical flow of every frame pair of a folder of
videos, computed once into the flow cache that training reads (``method.video.flow_cache``).

Parallel jobs split the videos with ``--shard k/n``; RAFT runs on ``--device`` (CUDA when
present) with the user's weights file (``--weights``; nothing is downloaded).
"""
from __future__ import annotations

from typing import Optional

import torch

from densessl.data import flow as flowlib
from densessl.data.video import VideoFrames


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
        frame_shape = None  # (H, W): read from the video's first frame, once
        for phase in range(min(stride, max(n - stride, 0))):  # frames phase, phase + stride, ... form one chain
            ids = list(range(phase, n, stride))
            for s in range(0, len(ids) - 1, chunk - 1):
                part = ids[s:s + chunk]
                if frame_shape is None:
                    frame_shape = tuple(source.read_clip(i, [0])["frames"].shape[-2:])
                size = flowlib.flow_size_for(*frame_shape, flow_size)

                def read(positions, part=part):  # only the frames of pairs the cache lacks (a rerun reads none)
                    frames = source.read_clip(i, [part[k] for k in positions])["frames"]
                    return dict(zip(positions, frames))

                fw, bw = flowlib.cached_pairwise_flows(part, frame_shape, read, key, model, cache, size)
                done += len(fw) + len(bw)
        if log is not None:
            log(f"video {v + 1}/{n_videos} {key}: {n} frames")
    return done


def run_flows(args) -> int:
    k, n = _shard(args.shard)
    source = VideoFrames(args.root, size=args.size)
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    model = flowlib.build_flow_model(args.flow, args.weights, device)
    cache = flowlib.FlowCache(args.cache, "float16" if args.float16 else "float32")
    total = precompute_flows(source, model, cache, args.stride, args.flow_size, (k, n))
    print(f"{total} flows in {args.cache}")
    return 0


def _shard(text: str) -> tuple[int, int]:
    from densessl.config import ConfigError

    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected k/n, e.g. 0/4 (this job's share of the videos)") from None
    if not 0 <= k < n:
        raise ConfigError(f"--shard {text!r}: expected 0 <= k < n")
    return k, n


def add_flows_command(subparsers) -> None:
    p = subparsers.add_parser("flows", help="precompute optical flow for a folder of videos into a flow cache",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="folder of videos (frame folders or video files)")
    p.add_argument("--cache", required=True, help="the flow cache folder (method.video.flow_cache)")
    p.add_argument("--flow", default="dis", help="dis | dis-fast | dis-ultrafast | farneback | raft_small | raft_large")
    p.add_argument("--weights", default=None, help="raft_*: the weights file")
    p.add_argument("--stride", type=int, default=1, help="method.video.stride")
    p.add_argument("--flow-size", type=int, default=None, help="method.video.flow_size")
    p.add_argument("--size", type=int, default=None, help="data.size (frames' shorter side), as in training")
    p.add_argument("--shard", default="0/1", help="k/n: this job's share of the videos")
    p.add_argument("--float16", action="store_true", help="store flows as float16")
    p.add_argument("--device", default="auto", help="raft_*: where the model runs (auto: cuda when present)")
    p.set_defaults(func=run_flows)
