"""Optical flow: estimation, an on-disk cache, chaining, forward-backward consistency.

Conventions (every function here and in densessl.data.video and densessl.data.frame_pairs):
- a flow is a float32 tensor (2, H, W), or batched (B, 2, H, W): channel 0 is dx, channel 1
  is dy, in pixels of the flow's own grid. flow[:, y, x] moves the point seen at pixel (x, y)
  of frame a to (x + dx, y + dy) in frame b. Pixel (x, y) is the pixel's centre; positions
  run from 0 to W-1 across the image (torch's align_corners=False sampling of pixel centres).
- a frame is a uint8 tensor (3, H, W) RGB, as the datasets give images.

Estimation (`FlowModel`: a callable (frame_a, frame_b) -> flow):
- `OpenCVFlow("dis" | "farneback")`, the default: classical, no weights, CPU.
- `TorchFlow`: a learned model the user supplies with its weights (no downloads), e.g. `torchvision_raft(
  "raft_small", "/path/weights.pth")` for torchvision's RAFT (the optical-flow fork used RAFT-small).
- `FlowCache`: flows computed once and kept as .npy files keyed by (model, video, frame a,
  frame b); `pairwise_flows` fills and reads it.

Geometry of flows:
- `chain_flows`: t -> t+1 -> ... -> t+n as f(x) = f_01(x) + f_12(x + f_01(x)) + ..., each next
  flow sampled bilinearly at the advected position (as the fork's concat_flow).
- `fb_consistency_mask`: the forward-backward check (UnFlow's, as the fork): valid where the
  advected position stays inside the frame and
      |f(x) + b(x + f(x))|^2 <= alpha1 (|f(x)|^2 + |b(x + f(x))|^2) + alpha2.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

MASK_UNITS = ("pixels", "fork")


# ------------------------------------------------------------------------ sampling and geometry


def _batched(flow: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if flow.ndim == 3:
        return flow[None], True
    if flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"a flow must have shape (2, H, W) or (B, 2, H, W), got {tuple(flow.shape)}")
    return flow, False


def pixel_grid(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(2, h, w) pixel-centre coordinates: [0] = x (column), [1] = y (row)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype),
                            indexing="ij")
    return torch.stack([xs, ys])


def sample_pixels(field: torch.Tensor, pos: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample `field` (B, C, H, W) at pixel positions `pos` (B, 2, h, w) (x, y; pixel centres).

    Bilinear (or nearest) with border padding: a position outside the frame takes the value
    of the nearest border pixel (callers mark such positions invalid where that matters).
    The interpolation runs in pixel coordinates, so a whole-pixel position returns the pixel's
    value exactly; grid_sample's round trip through [-1, 1] coordinates does not (1/W is not a
    float32 number: chained exact flows were off by ~1e-6 px). Same values as grid_sample with
    align_corners=False and border padding otherwise.
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    B, C, H, W = field.shape
    x = pos[:, 0].to(field.dtype).clamp(0, W - 1)
    y = pos[:, 1].to(field.dtype).clamp(0, H - 1)
    flat = field.reshape(B, C, H * W)

    def at(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        index = (yi * W + xi).reshape(B, 1, -1).expand(B, C, -1)
        return flat.gather(2, index).reshape(B, C, *x.shape[1:])

    if mode == "nearest":
        return at(y.round().long(), x.round().long())
    x0, y0 = x.floor(), y.floor()
    wx, wy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=W - 1), (y0 + 1).clamp(max=H - 1)
    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def warp_back(field: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """`field` of frame b seen through `flow` a->b: out(x) = field(x + flow(x)); (B, C, H, W)."""
    flow, single = _batched(flow)
    field = field[None] if single else field
    pos = pixel_grid(*flow.shape[-2:], device=flow.device, dtype=flow.dtype)[None] + flow
    out = sample_pixels(field, pos, mode)
    return out[0] if single else out


def chain_flows(flows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Compose consecutive flows f_01, f_12, ... into f_0n (same shape as each input).

    f_0n(x) = f_01(x) + f_1n(x + f_01(x)) evaluated left to right: the running flow advects
    the pixel grid and the next flow is sampled bilinearly there (border padding). Points that
    leave the frame keep a border value; `fb_consistency_mask` marks them invalid.
    """
    if not flows:
        raise ValueError("chain_flows needs at least one flow")
    total, single = _batched(flows[0])
    total = total.float()
    grid = pixel_grid(*total.shape[-2:], device=total.device)[None]
    for f in flows[1:]:
        f, _ = _batched(f)
        if f.shape != total.shape:
            raise ValueError(f"flows to chain must share a shape, got {tuple(total.shape)} and {tuple(f.shape)}")
        total = total + sample_pixels(f.float(), grid + total)
    return total[0] if single else total


def inside_frame(flow: torch.Tensor) -> torch.Tensor:
    """(…, H, W) bool: x + flow(x) lies within the frame's pixel centres [0, W-1] x [0, H-1]."""
    flow, single = _batched(flow)
    H, W = flow.shape[-2:]
    pos = pixel_grid(H, W, device=flow.device, dtype=flow.dtype)[None] + flow
    ok = (pos[:, 0] >= 0) & (pos[:, 0] <= W - 1) & (pos[:, 1] >= 0) & (pos[:, 1] <= H - 1)
    return ok[0] if single else ok


def fb_consistency_mask(fw: torch.Tensor, bw: torch.Tensor, alpha1: float = 0.01, alpha2: float = 0.5,
                        units: str = "pixels", frame_size: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(…, H, W) bool: where the forward flow a->b is trusted.

    `bw` is the flow b->a on frame b's grid. Valid iff x + fw(x) is inside the frame and
        |fw(x) + bw(x + fw(x))|^2 <= alpha1 * (|fw(x)|^2 + |bw(x + fw(x))|^2) + alpha2.
    units="pixels": alpha2 in squared pixels of the frame (UnFlow's 0.01 / 0.5). A flow at a
    reduced resolution is measured in frame pixels too: with `frame_size` (B, 2) = (W, H) of the
    frames, dx and dy are scaled by W / w and H / h of the flow's grid (w, h) first, so a 1/8
    flow is held to the same 0.5 px^2 as a full-resolution one (in grid pixels it would be
    allowed 32 px^2). Without `frame_size`, the flow's grid is the frame.
    units="fork": the optical-flow PixPro fork's units: flows rescaled to [-1, 1] image
    coordinates (dx * 2/(W-1), dy * 2/(H-1)) and the constant term alpha2 / sqrt(H^2 + W^2)
    (mixed units, kept as the code has them; far more lenient than 0.5 px^2 on large frames).
    H and W there are the frame's: `frame_size` when the flow is at a reduced resolution (the
    fork upsampled its 1/8 flows first); default the flow's own grid.
    """
    if units not in MASK_UNITS:
        raise ValueError(f"units must be one of {MASK_UNITS}, got {units!r}")
    fw, single = _batched(fw)
    bw, _ = _batched(bw)
    fw, bw = fw.float(), bw.float()
    bw_at = warp_back(bw, fw)
    H, W = fw.shape[-2:]
    if units == "fork":
        scale = torch.tensor([2.0 / max(W - 1, 1), 2.0 / max(H - 1, 1)], device=fw.device).view(1, 2, 1, 1)
        f, b = fw * scale, bw_at * scale
        if frame_size is None:
            const = alpha2 / float(np.hypot(H, W))
        else:
            const = (alpha2 / frame_size.to(fw.device).float().norm(dim=-1)).view(-1, 1, 1)
    elif frame_size is None:
        f, b, const = fw, bw_at, alpha2
    else:  # grid pixels -> frame pixels
        scale = frame_size.to(fw.device).float() / torch.tensor([float(W), float(H)], device=fw.device)
        scale = scale.view(-1, 2, 1, 1)
        f, b, const = fw * scale, bw_at * scale, alpha2
    err = (f + b).pow(2).sum(1)
    bound = alpha1 * (f.pow(2).sum(1) + b.pow(2).sum(1)) + const
    ok = (err <= bound) & inside_frame(fw)
    return ok[0] if single else ok


def resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Flow resampled (bilinear, align_corners=False) to `size` (h, w), values rescaled."""
    flow, single = _batched(flow)
    h, w = size
    H, W = flow.shape[-2:]
    if (h, w) == (H, W):
        return flow[0] if single else flow
    out = F.interpolate(flow.float(), size=(h, w), mode="bilinear", align_corners=False)
    out = out * torch.tensor([w / W, h / H], device=flow.device).view(1, 2, 1, 1)
    return out[0] if single else out


def flow_size_for(height: int, width: int, longest: Optional[int]) -> tuple[int, int]:
    """(h, w) with the longer side at most `longest` (aspect kept); the frame size if None."""
    if longest is None or max(height, width) <= longest:
        return height, width
    s = longest / max(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def end_point_error(flow: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """Mean Euclidean distance between two flows (over `mask` where given)."""
    epe = (flow.float() - target.float()).norm(dim=-3)
    if mask is not None:
        epe = epe[mask.bool()]
    return float(epe.mean()) if epe.numel() else float("nan")


# ------------------------------------------------------------------------ estimation


class FlowModel:
    """Something that estimates the flow between two frames.

    Subclasses implement `__call__(frame_a, frame_b) -> flow`: frames uint8 (3, H, W) RGB,
    flow float32 (2, H, W) a->b in pixels (see the module docstring). `name` identifies the
    model and its settings in the flow cache: change it when the weights or settings change.
    `device`: where it computes; `to(device)` asks it to compute there (a CPU-only model such
    as OpenCV's keeps the CPU).
    """

    name: str = "flow"
    device = torch.device("cpu")

    def __call__(self, frame_a: torch.Tensor, frame_b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device: str | torch.device) -> "FlowModel":
        return self


def _check_frame(frame: torch.Tensor) -> np.ndarray:
    if not torch.is_tensor(frame) or frame.ndim != 3 or frame.shape[0] != 3 or frame.dtype != torch.uint8:
        raise ValueError(f"a frame must be a uint8 tensor (3, H, W), got "
                         f"{getattr(frame, 'dtype', type(frame))} {tuple(getattr(frame, 'shape', ()))}")
    return np.ascontiguousarray(frame.permute(1, 2, 0).cpu().numpy())


class OpenCVFlow(FlowModel):
    """OpenCV's DIS (default, preset "medium") or Farneback flow on grayscale frames.

    DIS presets: ultrafast | fast | medium. Farneback uses OpenCV's usual parameters
    (pyramid 0.5, 3 levels, window 15, 3 iterations, poly_n 5, sigma 1.2) unless given.
    OpenCV runs single-threaded here (cv2.setNumThreads(1)): flows are computed in data-loader
    workers, which are the parallelism.
    """

    PRESETS = {"ultrafast": 0, "fast": 1, "medium": 2}

    def __init__(self, method: str = "dis", preset: str = "medium", farneback: Optional[dict] = None):
        from densessl.config import require_extra

        cv2 = require_extra("cv2", "video", "OpenCV optical flow")

        if method not in ("dis", "farneback"):
            raise ValueError(f"OpenCV flow method must be 'dis' or 'farneback', got {method!r}")
        if method == "dis" and preset not in self.PRESETS:
            raise ValueError(f"DIS preset must be one of {sorted(self.PRESETS)}, got {preset!r}")
        cv2.setNumThreads(1)
        self.method, self.preset = method, preset
        self.farneback = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
        self.farneback.update(farneback or {})
        self._dis = None
        self.name = (f"opencv-dis-{preset}" if method == "dis"
                     else "opencv-farneback-" + "-".join(f"{k}{v}" for k, v in sorted(self.farneback.items())))

    def __getstate__(self):  # the DIS object cannot be pickled into workers; rebuild it there
        state = self.__dict__.copy()
        state["_dis"] = None
        return state

    def __call__(self, frame_a, frame_b):
        import cv2

        a = cv2.cvtColor(_check_frame(frame_a), cv2.COLOR_RGB2GRAY)
        b = cv2.cvtColor(_check_frame(frame_b), cv2.COLOR_RGB2GRAY)
        if a.shape != b.shape:
            raise ValueError(f"frames differ in size: {a.shape} and {b.shape}")
        if self.method == "dis":
            if self._dis is None:
                self._dis = cv2.DISOpticalFlow_create(self.PRESETS[self.preset])
            flow = self._dis.calc(a, b, None)
        else:
            flow = cv2.calcOpticalFlowFarneback(a, b, None, **self.farneback)
        return torch.from_numpy(np.ascontiguousarray(flow.transpose(2, 0, 1))).float()


def _minus_one_to_one(x: torch.Tensor) -> torch.Tensor:  # RAFT's input range; a function, so it pickles
    return x.float() / 127.5 - 1.0


def _last_output(out):  # torchvision's RAFT returns the list of its refinements: the last is the flow
    return out[-1] if isinstance(out, (list, tuple)) else out


class TorchFlow(FlowModel):
    """A learned flow model: `module(img_a, img_b)` on float batches (1, 3, H, W).

    `preprocess` maps a uint8 frame batch to the module's input (default: [-1, 1], RAFT's);
    `postprocess` maps its output to a flow (1, 2, H, W) (default: the last element when the
    output is a list, as torchvision's RAFT returns its iterations). Frames are padded (edge
    replicate) to a multiple of `pad_to` and the flow cropped back. Weights are the user's:
    nothing is downloaded.
    `device`: where the module runs (`to(device)` changes it; the trainer passes train.device's).
    The module is moved there on its first call, in the process that calls it: a data-loader
    worker receives CPU weights (see __getstate__), and CUDA is only touched where flows are
    computed (workers need the spawn start method then: FramePairViews.worker_start_method).
    """

    def __init__(self, module: torch.nn.Module, name: str, device: str | torch.device = "cpu", pad_to: int = 8,
                 preprocess: Optional[Callable] = None, postprocess: Optional[Callable] = None):
        self.module = module.eval()
        self.name, self.device, self.pad_to = name, torch.device(device), pad_to
        self._placed = False  # module on self.device yet
        self.preprocess = preprocess or _minus_one_to_one
        self.postprocess = postprocess or _last_output

    def to(self, device: str | torch.device) -> "TorchFlow":
        self.device, self._placed = torch.device(device), False
        return self

    def __getstate__(self):  # pickled into data-loader workers: send CPU weights, each moves them itself
        self.module.to("cpu")
        self._placed = False
        return self.__dict__.copy()

    @torch.no_grad()
    def __call__(self, frame_a, frame_b):
        _check_frame(frame_a), _check_frame(frame_b)
        if not self._placed:
            self.module.to(self.device)
            self._placed = True
        H, W = frame_a.shape[-2:]
        ph, pw = (-H) % self.pad_to, (-W) % self.pad_to
        x = torch.stack([frame_a, frame_b]).to(self.device)
        x = self.preprocess(x)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        flow = self.postprocess(self.module(x[:1], x[1:]))
        return flow[0, :, :H, :W].float().cpu()


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """A state_dict from a .safetensors file or a torch file read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"flow model weights {str(path)!r} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def torchvision_raft(arch: str, weights: str | os.PathLike | None, device: str | torch.device = "cpu",
                     num_flow_updates: int = 12) -> TorchFlow:
    """torchvision's RAFT ("raft_small" or "raft_large") with the user's weights file, run on `device`.

    weights=None keeps the random initialisation (only for tests). The file is a state_dict
    of torchvision's architecture (e.g. a torchvision checkpoint saved to disk beforehand).
    """
    from torchvision.models import optical_flow

    if arch not in ("raft_small", "raft_large"):
        raise ValueError(f"arch must be raft_small or raft_large, got {arch!r}")
    model = getattr(optical_flow, arch)(weights=None, progress=False)
    tag = "random"
    if weights is not None:
        model.load_state_dict(load_state_dict_file(weights))
        tag = hashlib.sha1(str(Path(weights).resolve()).encode()).hexdigest()[:10]

    return TorchFlow(_Raft(model, num_flow_updates), name=f"{arch}-{tag}-it{num_flow_updates}", device=device)


class _Raft(torch.nn.Module):  # module level, so the model pickles into data-loader workers
    def __init__(self, net: torch.nn.Module, num_flow_updates: int):
        super().__init__()
        self.net, self.num_flow_updates = net, num_flow_updates

    def forward(self, a, b):
        return self.net(a, b, num_flow_updates=self.num_flow_updates)


def build_flow_model(name: str, weights: Optional[str] = None, device: str | torch.device = "cpu") -> FlowModel:
    """By name: dis | dis-fast | dis-ultrafast | farneback | raft_small | raft_large (+ weights).
    `device`: where a learned model runs (OpenCV's run on the CPU)."""
    if name in ("dis", "dis-medium"):
        return OpenCVFlow("dis", "medium")
    if name in ("dis-fast", "dis-ultrafast"):
        return OpenCVFlow("dis", name.split("-", 1)[1])
    if name == "farneback":
        return OpenCVFlow("farneback")
    if name in ("raft_small", "raft_large"):
        if not weights:
            raise ValueError(f"flow model {name} needs its weights file (flow_weights=/path/to/{name}.pth); "
                             f"densessl downloads nothing")
        return torchvision_raft(name, weights, device)
    raise ValueError(f"unknown flow model {name!r}; expected dis, dis-fast, dis-ultrafast, farneback, "
                     f"raft_small or raft_large")


# ------------------------------------------------------------------------ cache


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(part) -> str:
    s = str(part)
    clean = _SAFE.sub("_", s).strip("._") or "_"
    if clean != s or len(clean) > 80:  # keep distinct keys distinct after cleaning
        clean = clean[:60] + "-" + hashlib.sha1(s.encode()).hexdigest()[:10]
    return clean


class FlowCache:
    """Flows on disk: root/<model>/<video>/<frame_a>__<frame_b>.npy (float32 or float16).

    Writes are atomic (a temporary file in the same folder, then rename), so parallel
    data-loader workers and killed runs never leave a partial file behind. A file that cannot
    be read, or has the wrong shape, is recomputed and rewritten.
    """

    def __init__(self, root: str | os.PathLike, dtype: str = "float32"):
        if dtype not in ("float32", "float16"):
            raise ValueError(f"cache dtype must be float32 or float16, got {dtype!r}")
        self.root, self.dtype = Path(root), dtype

    def path(self, model: str, video, frame_a, frame_b) -> Path:
        return self.root / _safe(model) / _safe(video) / f"{_safe(frame_a)}__{_safe(frame_b)}.npy"

    def get(self, model: str, video, frame_a, frame_b, shape=None) -> Optional[torch.Tensor]:
        p = self.path(model, video, frame_a, frame_b)
        if not p.is_file():
            return None
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if arr.ndim != 3 or arr.shape[0] != 2 or (shape is not None and tuple(arr.shape[1:]) != tuple(shape)):
            return None
        return torch.from_numpy(arr.astype(np.float32))

    def put(self, model: str, video, frame_a, frame_b, flow: torch.Tensor) -> Path:
        p = self.path(model, video, frame_a, frame_b)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, flow.detach().cpu().numpy().astype(self.dtype), allow_pickle=False)
            os.replace(tmp, p)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return p


def pairwise_flows(frames: torch.Tensor, frame_ids: Sequence, video, model: FlowModel,
                   cache: Optional[FlowCache] = None, size: Optional[tuple[int, int]] = None
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Forward flows frames[k] -> frames[k+1] and backward flows frames[k+1] -> frames[k].

    frames: uint8 (T, 3, H, W); frame_ids name the frames in the cache (with `video`).
    `size` (h, w): each flow is resized to it (`resize_flow`) before it is cached and returned
    (a 1/8-resolution cache, as the fork's, is 64x smaller). Returns two lists of T-1 flows
    (2, h, w), in frame order.
    """
    if len(frames) != len(frame_ids):
        raise ValueError(f"{len(frames)} frames but {len(frame_ids)} frame ids")
    return cached_pairwise_flows(frame_ids, tuple(frames.shape[-2:]), lambda positions: {k: frames[k] for k in positions},
                                 video, model, cache, size)


def cached_pairwise_flows(frame_ids: Sequence, frame_shape: tuple[int, int], read: Callable, video,
                          model: FlowModel, cache: Optional[FlowCache] = None,
                          size: Optional[tuple[int, int]] = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`pairwise_flows` that reads only the frames it has to: the cache is looked up first, then
    `read(positions)` (positions: indices into frame_ids, sorted) is called once with the frames
    of the missing pairs, and must return {position: uint8 frame (3, H, W)}. When every flow is
    cached, `read` is not called: decoding frames is what costs on real video.
    `frame_shape` (H, W): the frames' size (the caller has read the first and last frames).
    """
    frame_shape = tuple(frame_shape)
    shape = tuple(size) if size is not None else frame_shape
    key = model.name if shape == frame_shape else f"{model.name}@{shape[0]}x{shape[1]}"
    pairs = [(k, k + 1) for k in range(len(frame_ids) - 1)] + [(k + 1, k) for k in range(len(frame_ids) - 1)]
    flows = {}
    if cache is not None:
        for a, b in pairs:
            hit = cache.get(key, video, frame_ids[a], frame_ids[b], shape)
            if hit is not None:
                flows[a, b] = hit
    missing = [p for p in pairs if p not in flows]
    frames = read(sorted({k for p in missing for k in p})) if missing else {}
    for a, b in missing:
        flow = model(frames[a], frames[b]).float()
        if tuple(flow.shape) != (2,) + frame_shape:
            raise ValueError(f"flow model {model.name} returned shape {tuple(flow.shape)}, "
                             f"expected {(2,) + frame_shape}")
        flow = resize_flow(flow, shape)
        if cache is not None:
            cache.put(key, video, frame_ids[a], frame_ids[b], flow)
        flows[a, b] = flow
    n = len(frame_ids) - 1
    return [flows[k, k + 1] for k in range(n)], [flows[k + 1, k] for k in range(n)]
