"""Correspondences between views, derived from the views' geometry records only.

Every view slot v of a batch carries `batch["box"][v]`, a (B, 4) tensor with the crop of the
view in its source image in normalised coordinates (x0, y0, x1, y1 in [0, 1], pixel edges:
x0 = left / W, x1 = (left + w) / W), and `batch["flip"][v]`, a (B,) bool tensor (the view was
mirrored horizontally after cropping and resizing). This module turns those records into
what the dense methods need:

- `cell_centres`: where each feature-map cell of a view comes from in the source image.
  The video variant (flow-warped positives) reuses it: convert the centres to pixels, move
  them by the flow, and call `positives_from_centres`.
- `pixpro_positive_mask`: PixPro's positive pixel pairs (specs, PixPro section 3.3).
- `crop_intersection`: the source region both crops see.
- `scrl_boxes`: SCRL's box pairs covering the same source region in two views (section 2.3).

Coordinates are normalised by the source width and height separately, as PixPro does, so a
distance is anisotropic when the source image is not square (specs, 3.3).
All functions are batched and run on the device of their inputs; `scrl_boxes` draws its
random boxes from a torch.Generator and is deterministic given it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F


def _grid(grid_hw) -> tuple[int, int]:
    h, w = (grid_hw, grid_hw) if isinstance(grid_hw, int) else grid_hw
    return int(h), int(w)


def bin_size(box: torch.Tensor, grid_hw) -> torch.Tensor:
    """(B, 2) width and height of one feature cell, in normalised source units (positive)."""
    h, w = _grid(grid_hw)
    return torch.stack([(box[:, 2] - box[:, 0]) / w, (box[:, 3] - box[:, 1]) / h], dim=-1)


def bin_diagonal(box: torch.Tensor, grid_hw) -> torch.Tensor:
    """(B,) length of a feature cell's diagonal, in normalised source units."""
    return bin_size(box, grid_hw).norm(dim=-1)


def cell_centres(box: torch.Tensor, flip: Optional[torch.Tensor], grid_hw) -> torch.Tensor:
    """(B, H*W, 2) source coordinates (x, y, normalised) of each feature cell's centre.

    Cells are in row-major order, matching `feature.flatten(2)`. Column c of a flipped view
    shows what column W-1-c of the unflipped crop shows, so its centre runs right to left from
    x1 (the same as PixPro's swap of x0 and x1).
    """
    h, w = _grid(grid_hw)
    box = box.float() if not box.is_floating_point() else box
    bw, bh = bin_size(box, (h, w)).unbind(-1)  # (B,)
    cols = torch.arange(w, device=box.device, dtype=box.dtype) + 0.5
    rows = torch.arange(h, device=box.device, dtype=box.dtype) + 0.5
    cx = box[:, 0:1] + cols[None] * bw[:, None]  # (B, W)
    if flip is not None:
        cx_flip = box[:, 2:3] - cols[None] * bw[:, None]
        cx = torch.where(flip.to(box.device).bool()[:, None], cx_flip, cx)
    cy = box[:, 1:2] + rows[None] * bh[:, None]  # (B, H)
    xs = cx[:, None, :].expand(-1, h, w)
    ys = cy[:, :, None].expand(-1, h, w)
    return torch.stack([xs, ys], dim=-1).reshape(box.shape[0], h * w, 2)


def positives_from_centres(c1: torch.Tensor, c2: torch.Tensor, diag1: torch.Tensor, diag2: torch.Tensor,
                           threshold: float = 0.7, valid1: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, N1, N2) bool: centre distance / max(diag1, diag2) < threshold (strict, as PixPro).

    c1 (B, N1, 2) and c2 (B, N2, 2) must be in the same units as the diagonals (normalised
    source units for PixPro, pixels for the video fork). `valid1` (B, N1) masks out cells of
    view 1 (e.g. where the optical flow failed its forward-backward check).
    """
    dist = (c1[:, :, None, :] - c2[:, None, :, :]).norm(dim=-1)  # exact, not cdist's matmul form
    scale = torch.maximum(diag1, diag2)[:, None, None]
    mask = dist / scale < threshold
    if valid1 is not None:
        mask = mask & valid1.bool()[:, :, None]
    return mask


CROP_COORDS = ("edges", "code")  # pixpro_positive_mask's crop normalisation (see code_crop_box)


def code_crop_box(box: torch.Tensor, source_size: torch.Tensor) -> torch.Tensor:
    """(B, 4) float64: PixPro code's crop coordinates [j/(W-1), i/(H-1), (j+w-1)/(W-1), (i+h-1)/(H-1)]
    from the geometry record's pixel edges [j/W, i/H, (j+w)/W, (i+h)/H]; source_size (B, 2) = (W, H).

    The code's crop is one pixel narrower (w - 1) in units of W - 1; a cell is positive on either
    side of the threshold by a hair, so the masks differ on a few entries (specs, PixPro 3.3)."""
    wh = source_size.to(device=box.device, dtype=torch.float64)
    scale = torch.cat([wh, wh], dim=1)  # (W, H, W, H)
    pixels = (box.double() * scale).round()  # j, i, j + w, i + h (integers in the record)
    last = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64, device=box.device)
    return (pixels - last) / (scale - 1)


def pixpro_positive_mask(box1: torch.Tensor, flip1: Optional[torch.Tensor], box2: torch.Tensor,
                         flip2: Optional[torch.Tensor], grid1, grid2, threshold: float = 0.7,
                         crop_coords: str = "edges", source_size: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, N1, N2) bool: PixPro's positive pairs between the cells of view 1 and view 2.

    A pair is positive when the distance between the two cell centres in the source image,
    divided by the larger of the two views' cell diagonals, is below `threshold` (strict <).
    Identical crops give the identity (adjacent square cells are 1/sqrt(2) > 0.7 apart).
    crop_coords="code" first converts both boxes with `code_crop_box` (needs `source_size`).
    """
    if crop_coords not in CROP_COORDS:
        raise ValueError(f"crop_coords must be one of {CROP_COORDS}, got {crop_coords!r}")
    if crop_coords == "code":
        if source_size is None:
            raise ValueError("crop_coords='code' needs source_size (B, 2) = (width, height) of the source images")
        box1, box2 = code_crop_box(box1, source_size), code_crop_box(box2, source_size)
    c1 = cell_centres(box1, flip1, grid1)
    c2 = cell_centres(box2, flip2, grid2)
    return positives_from_centres(c1, c2, bin_diagonal(box1, grid1), bin_diagonal(box2, grid2), threshold)


def crop_intersection(box1: torch.Tensor, box2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 4) intersection x0, y0, x1, y1 of two crops, and (B,) bool: it is non-empty."""
    lt = torch.maximum(box1[:, :2], box2[:, :2])
    rb = torch.minimum(box1[:, 2:], box2[:, 2:])
    valid = (lt < rb).all(dim=-1)
    return torch.cat([lt, rb], dim=-1), valid


# ------------------------------------------------------------------------------- SCRL boxes


class BoxPairs(NamedTuple):
    """Box pairs covering the same source region in view 1 and view 2.

    rois1, rois2: (N, 5) float32 rows [b, x1, y1, x2, y2] in each view's pixel coordinates
    (torchvision RoI format); both use the sample index b (a method that concatenates the two
    views into one 2B batch adds B to rois2[:, 0]). Rows are sample-major: `num_boxes` rows per
    valid sample, in batch order. valid: (B,) bool, the samples that have boxes.
    """
    rois1: torch.Tensor
    rois2: torch.Tensor
    valid: torch.Tensor


def _randint(lo, hi, u):
    """Integers uniform on [lo, hi] inclusive from uniforms u in [0, 1) (numpy float64, broadcast)."""
    span = np.maximum(hi - lo + 1, 1)
    return np.minimum(lo + np.floor(u * span), np.maximum(hi, lo))


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every a (B, T, 4) and every b (B, K, 4) box of the same sample: (B, T, K)."""
    lt = np.maximum(a[:, :, None, :2], b[:, None, :, :2])
    rb = np.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).prod(-1)[:, :, None]
    area_b = (b[..., 2:] - b[..., :2]).prod(-1)[:, None, :]
    return inter / np.maximum(area_a + area_b - inter, 1e-12)


def _view_sizes(view_size) -> tuple[int, int]:
    if isinstance(view_size, int):
        return view_size, view_size
    s1, s2 = view_size
    return int(s1), int(s2)


def scrl_boxes(box1: torch.Tensor, flip1: Optional[torch.Tensor], box2: torch.Tensor, flip2: Optional[torch.Tensor],
               view_size, num_boxes: int = 10, min_size: int = 32, iou_threshold: float = 0.5,
               max_tries: int = 50, grid: bool = True, generator: Optional[torch.Generator] = None) -> BoxPairs:
    """SCRL's box pairs (specs, section 2.3), on the CPU, deterministic given `generator`.

    view_size: the side of the (square) views in pixels, an int for both or (view 1, view 2).
    For each sample: take the intersection of the two crops; measure it in the pixels of the
    less-zoomed view (W' = round(width * min(S1/w1, S2/w2)), likewise H'); skip the sample when
    min_size >= W' or min_size >= H'. Otherwise draw `num_boxes` boxes of at least `min_size`
    such pixels: in grid mode split the intersection into div_w x div_h cells (div drawn in
    [1, W'//min_size]), pick a cell, a size inside it and a position inside it; in random mode a
    size in [min_size, W'-1] and a position anywhere. Box 0 is always kept; box i > 0 is kept at
    the first of up to `max_tries` draws whose IoU with every kept box of the sample is below
    `iou_threshold`, and after `max_tries` failures the last draw is kept anyway (the official
    code's behaviour: every valid sample gives exactly `num_boxes` boxes). Each box is then
    mapped into both views (mirrored in a flipped view) and clipped to the view.

    Tries are drawn a few at a time for all samples still without an acceptable box, and the
    first acceptable one is taken: the same distribution as drawing them one by one. The
    uniforms come from `generator` (torch.rand); the arithmetic is numpy float64
    (single-threaded, no per-op overhead). One deliberate change: a box is clipped to the
    intersection in source coordinates (W' is rounded, so a box can overhang it by half a
    pixel of the less-zoomed view); both views then see exactly the same source rectangle, and
    the IoU test compares clipped boxes.
    """
    S1, S2 = _view_sizes(view_size)
    b1 = box1.detach().cpu().double().numpy()
    b2 = box2.detach().cpu().double().numpy()
    B = b1.shape[0]
    f1 = np.zeros(B, dtype=bool) if flip1 is None else flip1.detach().cpu().bool().numpy()
    f2 = np.zeros(B, dtype=bool) if flip2 is None else flip2.detach().cpu().bool().numpy()
    L, T = np.maximum(b1[:, 0], b2[:, 0]), np.maximum(b1[:, 1], b2[:, 1])
    R, Bt = np.minimum(b1[:, 2], b2[:, 2]), np.minimum(b1[:, 3], b2[:, 3])
    # zoom of each view: view pixels per normalised source unit
    sw1, sh1 = S1 / (b1[:, 2] - b1[:, 0]), S1 / (b1[:, 3] - b1[:, 1])
    sw2, sh2 = S2 / (b2[:, 2] - b2[:, 0]), S2 / (b2[:, 3] - b2[:, 1])
    sw, sh = np.minimum(sw1, sw2), np.minimum(sh1, sh2)  # the less-zoomed view
    Wp = np.round((R - L) * sw)
    Hp = np.round((Bt - T) * sh)
    valid = (L < R) & (T < Bt) & (Wp > min_size) & (Hp > min_size)
    idx = np.flatnonzero(valid)
    nv = len(idx)
    if nv == 0 or num_boxes <= 0:
        empty = torch.zeros(0, 5)
        return BoxPairs(empty, empty.clone(), torch.from_numpy(valid))

    # work on the valid samples only, in intersection-scale pixels (W' x H')
    L, T, R, Bt, sw, sh, Wp, Hp = (t[idx][:, None] for t in (L, T, R, Bt, sw, sh, Wp, Hp))
    m = float(min_size)

    def draw(rows: np.ndarray, tries: int) -> np.ndarray:
        """(len(rows), tries, 4) candidate boxes of the samples `rows`, in source coordinates."""
        u = torch.rand((8 if grid else 4, len(rows), tries), generator=generator, dtype=torch.float64).numpy()
        l, t, r, b, zw, zh, W_, H_ = (a[rows] for a in (L, T, R, Bt, sw, sh, Wp, Hp))
        if grid:
            div_w = _randint(1.0, np.floor(W_ / m), u[0])
            div_h = _randint(1.0, np.floor(H_ / m), u[1])
            gw, gh = W_ / div_w, H_ / div_h
            gx = _randint(0.0, div_w - 1, u[2])
            gy = _randint(0.0, div_h - 1, u[3])
            bw = _randint(m, np.floor(gw), u[4])
            bh = _randint(m, np.floor(gh), u[5])
            bx = _randint(0.0, np.floor(gw - bw), u[6]) + np.floor(gx * gw)
            by = _randint(0.0, np.floor(gh - bh), u[7]) + np.floor(gy * gh)
        else:
            bw = _randint(m, W_ - 1, u[0])
            bh = _randint(m, H_ - 1, u[1])
            bx = _randint(0.0, W_ - bw - 1, u[2])
            by = _randint(0.0, H_ - bh - 1, u[3])
        # to source coordinates, clipped to the intersection
        x0 = np.clip(l + bx / zw, l, r)
        x1 = np.clip(l + (bx + bw) / zw, l, r)
        y0 = np.clip(t + by / zh, t, b)
        y1 = np.clip(t + (by + bh) / zh, t, b)
        return np.stack([x0, y0, x1, y1], axis=-1)

    all_rows = np.arange(nv)
    kept = np.empty((nv, num_boxes, 4))
    kept[:, 0] = draw(all_rows, 1)[:, 0]
    chunk = 4  # tries are drawn and tested a few at a time, for the samples still without a box
    for k in range(1, num_boxes):
        pending, done = all_rows, 0
        while len(pending):
            n_try = min(chunk, max_tries - done)
            cand = draw(pending, n_try)
            ok = _pairwise_iou(cand, kept[pending, :k]).max(-1) < iou_threshold  # IoU is the same in any view
            last = done + n_try == max_tries
            take = ok.any(1) | last
            pick = np.where(ok.any(1), ok.argmax(1), n_try - 1)[take]  # after max_tries: the last draw
            kept[pending[take], k] = cand[np.flatnonzero(take), pick]
            pending, done = pending[~take], done + n_try

    def to_view(box: np.ndarray, flip: np.ndarray, S: int) -> torch.Tensor:
        b = box[idx][:, None, :]
        sx, sy = S / (b[..., 2] - b[..., 0]), S / (b[..., 3] - b[..., 1])
        l, r = (kept[..., 0] - b[..., 0]) * sx, (kept[..., 2] - b[..., 0]) * sx
        t, btm = (kept[..., 1] - b[..., 1]) * sy, (kept[..., 3] - b[..., 1]) * sy
        fl = flip[idx][:, None]
        l, r = np.where(fl, S - r, l), np.where(fl, S - l, r)
        out = np.clip(np.stack([l, t, r, btm], axis=-1), 0, S)
        bidx = np.broadcast_to(idx[:, None, None].astype(np.float64), (nv, num_boxes, 1))
        return torch.from_numpy(np.concatenate([bidx, out], axis=-1).reshape(-1, 5)).float()

    return BoxPairs(to_view(b1, f1, S1), to_view(b2, f2, S2), torch.from_numpy(valid))


def boxes_to_source(rois: torch.Tensor, box: torch.Tensor, flip: Optional[torch.Tensor], view_size: int) -> torch.Tensor:
    """Inverse of the view mapping: (N, 5) RoI rows of one view -> (N, 4) normalised source boxes."""
    b = box[rois[:, 0].long()].to(rois.dtype)
    S = float(view_size)
    l, t, r, btm = rois[:, 1], rois[:, 2], rois[:, 3], rois[:, 4]
    if flip is not None:
        fl = flip[rois[:, 0].long()].bool()
        l, r = torch.where(fl, S - r, l), torch.where(fl, S - l, r)
    sx, sy = (b[:, 2] - b[:, 0]) / S, (b[:, 3] - b[:, 1]) / S
    return torch.stack([b[:, 0] + l * sx, b[:, 1] + t * sy, b[:, 0] + r * sx, b[:, 1] + btm * sy], dim=-1)


# ------------------------------------------------------------------------ flow-warped positives
# The optical-flow PixPro variant (specs, PixPro section 3.8): view 1 is a crop of frame t,
# view 2 a crop of frame t+k of the same video. Each view-1 cell centre is moved by the flow
# t -> t+k before the distance test against view 2's centres, and only cells where the flow
# passed its forward-backward check count. Flows follow densessl.data.flow's conventions:
# (B, 2, h, w), dx and dy in pixels of the flow's own grid, covering the whole source frame
# (h, w may be smaller than the frame: a flow at reduced resolution).

DISTANCE_UNITS = ("normalised", "pixels")


def sample_at_centres(field: torch.Tensor, centres: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """(B, N, C): `field` (B, C, h, w), covering the source image, read at `centres` (B, N, 2).

    Centres are normalised source coordinates (x, y in [0, 1], pixel edges, as the boxes); the
    field's pixel k covers [k/w, (k+1)/w], so its value sits at (k + 0.5)/w (grid_sample with
    align_corners=False). Bilinear or nearest; outside the image the border value is used.
    """
    grid = (2.0 * centres.float() - 1.0)[:, :, None, :]  # (B, N, 1, 2)
    out = F.grid_sample(field.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    return out[..., 0].transpose(1, 2)


def flow_warp_centres(centres: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """(B, N, 2) normalised source positions of `centres` moved by `flow` (bilinear)."""
    h, w = flow.shape[-2:]
    d = sample_at_centres(flow, centres)  # pixels of the flow grid
    return centres.float() + d / torch.tensor([float(w), float(h)], device=flow.device)


def flow_positive_mask(box1: torch.Tensor, flip1: Optional[torch.Tensor], box2: torch.Tensor,
                       flip2: Optional[torch.Tensor], grid1, grid2, flow: Optional[torch.Tensor] = None,
                       valid: Optional[torch.Tensor] = None, threshold: float = 0.7, units: str = "normalised",
                       source_size: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, N1, N2) bool: positives between view 1 (a crop of frame a) and view 2 (of frame b).

    View 1's cell centres are moved by `flow` (a -> b, sampled bilinearly at each centre) and
    compared with view 2's cell centres as in `pixpro_positive_mask`: distance / max of the two
    views' cell diagonals < threshold (strict). `valid` (B, h, w) bool, on the flow's grid,
    is read at view 1's (unmoved) centres with nearest sampling; cells where it is False have
    no positives (the forward-backward check failed or the point left the frame).
    units="normalised" (PixPro, the default): x and y normalised by the source width and height;
    units="pixels" (the optical-flow fork): both scaled to source pixels by `source_size` (B, 2)
    = (W, H) first, so distances and diagonals are isotropic on non-square frames. For square
    frames the two give the same mask. flow=None (or zero) gives `pixpro_positive_mask`.
    """
    if units not in DISTANCE_UNITS:
        raise ValueError(f"units must be one of {DISTANCE_UNITS}, got {units!r}")
    c1 = cell_centres(box1, flip1, grid1)
    c2 = cell_centres(box2, flip2, grid2)
    valid1 = None
    if valid is not None:
        valid1 = sample_at_centres(valid[:, None].float(), c1, mode="nearest")[..., 0] > 0.5
    moved = flow_warp_centres(c1, flow) if flow is not None else c1
    s1, s2 = bin_size(box1.float(), grid1), bin_size(box2.float(), grid2)
    if units == "pixels":
        if source_size is None:
            raise ValueError("units='pixels' needs source_size (B, 2) = (width, height) of the frames")
        scale = source_size.to(c1.device).float().view(-1, 1, 2)
        moved, c2 = moved * scale, c2 * scale
        s1, s2 = s1 * scale[:, 0], s2 * scale[:, 0]
    return positives_from_centres(moved, c2.to(moved.dtype), s1.norm(dim=-1), s2.norm(dim=-1), threshold, valid1)
