"""PixPro on video with optical-flow correspondences (the `rioyokotalab/PixPro-with-OpticalFlow`
variant of PixPro; specs, PixPro section 3.8).

View 1 is a crop of frame t, view 2 a crop of frame t + (nframes - 1) * stride of the same
video (densessl.data.frame_pairs.FramePairViews). Positives (densessl.data.geometry.flow_positive_mask):
each view-1 C5 cell centre, in source-frame coordinates, is moved by the chained forward flow
t -> t+k and compared with view 2's cell centres; distance / max of the two views' cell
diagonals < `pos_threshold` (strict), and only where the forward-backward check of the flow
holds at that cell (`flow_mask`). The reverse term moves view 2's centres by the chained
backward flow t+k -> t, with its own check. Networks, PPM, EMA (before the target pass, once
per step) and the loss are PixPro's (densessl.methods.pixpro_core):
    L = L_12(mask12) + L_21(mask21),  mask21 from the backward flow (not mask12 transposed).

Units (`distance_units`): "normalised" (default, PixPro's: x and y divided by the frame's
width and height) or "pixels" (the fork's: isotropic on non-square frames). Both give the same
mask on square frames. Forward-backward check (`flow_mask_units`): "pixels" (UnFlow's
|f + b|^2 <= a1 (|f|^2 + |b|^2) + a2 with a2 in px^2 of the frame, whatever the flow's
resolution) or "fork" (the code's [-1, 1] units with
a2 / sqrt(H^2 + W^2)).

The batch carries "flow" and "flow_back" (B, 2, h, w) and "source_size" (B, 2); without them
(an image dataset) the method is plain PixPro (zero flow, every cell valid).
The `video:` section configures the frame-pair data (see VideoConfig); `view_dataset`
builds it for the trainer (densessl pretrain pixpro-video-scenes).

Distributed: nothing is gathered across ranks (as PixPro).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from densessl.data.geometry import DISTANCE_UNITS, flow_positive_mask
from densessl.methods import register
from densessl.methods.pixpro_core import PixProConfig, PixProCore


@dataclass
class VideoConfig:
    """Frame-pair data for the video variant (read by the view dataset, not by the losses)."""
    nframes: int = 2  # frames spanned: view 1 on frame t, view 2 on frame t + (nframes-1)*stride (1: single frame)
    stride: int = 1  # frames between consecutive sampled frames (the fork: 10 fps frames, stride 1)
    flow: str = "gt"  # gt (moving_scenes' exact flow) | none (zero) | dis | dis-fast | farneback | raft_small | raft_large
    flow_weights: Optional[str] = None  # raft_*: the user's weights file (nothing is downloaded)
    flow_cache: Optional[str] = None  # folder for estimated flows (.npy per frame pair); null: no cache
    flow_size: Optional[int] = None  # longer side of the flows in the batch (the fork: 1/8 of the frame); null: frame size
    length: int = 16  # moving_scenes: frames per video
    max_speed: float = 1.5  # moving_scenes: item speed bound, px per frame
    pan_speed: float = 0.5  # moving_scenes: background pan speed bound, px per frame
    items_per_video: int = 1  # video_frames: dataset items (clips drawn) per video per epoch
    min_frames: int = 0  # video_frames: leave out (and count) videos shorter than this


@dataclass
class PixProVideoConfig(PixProConfig):
    name: str = "pixpro_video"
    distance_units: str = "normalised"  # normalised (PixPro) | pixels (the fork)
    flow_mask: bool = True  # positives only where the forward-backward check holds (the fork: on)
    flow_alpha1: float = 0.01  # check: |f + b|^2 <= alpha1 (|f|^2 + |b|^2) + alpha2
    flow_alpha2: float = 0.5
    flow_mask_units: str = "pixels"  # pixels (UnFlow) | fork ([-1, 1] units, alpha2 / sqrt(H^2 + W^2))
    video: VideoConfig = field(default_factory=VideoConfig)

    def __post_init__(self):
        from densessl.config import ConfigError
        from densessl.data.flow import MASK_UNITS
        from densessl.data.frame_pairs import FLOW_SOURCES

        super().__post_init__()
        if self.crop_coords != "edges":
            raise ConfigError(f"key 'method.crop_coords' applies to method.name=pixpro only (got {self.crop_coords!r}); "
                              f"the video variant's positives take method.distance_units")
        if isinstance(self.video, dict):
            from densessl.config import from_dict

            self.video = from_dict(VideoConfig, self.video, "method.video")
        if self.distance_units not in DISTANCE_UNITS:
            raise ConfigError(f"key 'method.distance_units' expects one of {', '.join(DISTANCE_UNITS)}, "
                              f"got {self.distance_units!r}")
        if self.flow_mask_units not in MASK_UNITS:
            raise ConfigError(f"key 'method.flow_mask_units' expects one of {', '.join(MASK_UNITS)}, "
                              f"got {self.flow_mask_units!r}")
        v = self.video
        if v.nframes < 1 or v.stride < 1 or v.length < 1:
            raise ConfigError(f"keys 'method.video.nframes', 'stride', 'length' must be >= 1, got "
                              f"{v.nframes}, {v.stride}, {v.length}")
        if v.flow not in FLOW_SOURCES:
            raise ConfigError(f"key 'method.video.flow' expects one of {', '.join(FLOW_SOURCES)}, got {v.flow!r}")
        if v.flow.startswith("raft") and not v.flow_weights:
            raise ConfigError(f"method.video.flow={v.flow} needs method.video.flow_weights=<weights file> "
                              f"(densessl downloads nothing)")


def video_positive_masks(batch: dict, grid1, grid2, threshold: float = 0.7, units: str = "normalised",
                         use_mask: bool = True, alpha1: float = 0.01, alpha2: float = 0.5,
                         mask_units: str = "pixels") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(mask12 (B, N1, N2), mask21 (B, N2, N1), statistics) from a frame-pair batch.

    mask12: view-1 centres moved by batch["flow"] (first -> last frame), valid where its
    forward-backward check holds; mask21: view-2 centres moved by batch["flow_back"], with the
    check of the backward flow. Without flows in the batch: PixPro's mask and its transpose.
    """
    from densessl.data.flow import fb_consistency_mask

    box, flip = batch["box"], batch.get("flip") or [None, None]
    fw, bw = batch.get("flow"), batch.get("flow_back")
    size = batch.get("source_size")
    if units == "pixels" and size is None:
        raise ValueError("distance_units='pixels' needs batch['source_size'] (the frames' width and height)")
    valid_fw = valid_bw = None
    stats = {}
    if fw is not None and use_mask:
        valid_fw = fb_consistency_mask(fw, bw, alpha1, alpha2, mask_units, size)
        valid_bw = fb_consistency_mask(bw, fw, alpha1, alpha2, mask_units, size)
        stats["flow_valid_frac"] = valid_fw.float().mean()
    mask12 = flow_positive_mask(box[0], flip[0], box[1], flip[1], grid1, grid2, fw, valid_fw, threshold, units, size)
    mask21 = flow_positive_mask(box[1], flip[1], box[0], flip[0], grid2, grid1, bw, valid_bw, threshold, units, size)
    if fw is not None:
        stats["flow_magnitude"] = fw.float().norm(dim=1).mean()
    return mask12, mask21, stats


@register("pixpro_video", PixProVideoConfig)
class PixProVideo(PixProCore):
    """PixPro with flow-warped positives; the networks and losses are PixPro's."""

    def positive_masks(self, batch, grid1, grid2):
        cfg = self.cfg
        with torch.no_grad():
            mask12, mask21, stats = video_positive_masks(batch, grid1, grid2, cfg.pos_threshold, cfg.distance_units,
                                                         cfg.flow_mask, cfg.flow_alpha1, cfg.flow_alpha2,
                                                         cfg.flow_mask_units)
        stats["positives_per_image_back"] = mask21.sum((1, 2)).float().mean()
        return mask12, mask21, stats

    # ------------------------------------------------------------------ data hooks

    def view_dataset(self, dataset, cfg):
        """Frame pairs of the video source the trainer built (densessl.data.video), as frame pairs (densessl.data.frame_pairs), and their collate."""
        from densessl.data.frame_pairs import build_frame_pairs, collate_frame_pairs

        return build_frame_pairs(dataset, cfg.views, cfg.train.seed, self.cfg.video), collate_frame_pairs
