"""Photometric augmentation, batched on the device with per-sample random parameters."""
from __future__ import annotations

import torch

from densessl.data.views import expand_slots

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) or float in [0,1] -> float32 normalised with ImageNet statistics."""
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------- batched photometric ops
# Each op takes float images in [0, 1], shape (B,3,H,W), and per-sample parameters (B,).
# They follow torchvision.transforms.v2.functional's definitions (tested against it).


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


_GRAY = (0.2989, 0.587, 0.114)


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def adjust_brightness(x, factor):
    return (x * _per_sample(factor)).clamp_(0, 1)


def adjust_contrast(x, factor):
    mean = rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(factor)
    return (x * f).add_((1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x, factor):
    f = _per_sample(factor)
    return (x * f).add_((1 - f) * rgb_to_gray(x)).clamp_(0, 1)


def adjust_hue(x, shift):
    """Rotate hue by `shift` (fraction of a turn, in [-0.5, 0.5]) in HSV, as torchvision.

    RGB -> (h, s, v) -> RGB with the closed form c_n = v - v s clamp(min(k, 4 - k), 0, 1),
    k = (n + 6h) mod 6 for n = 5, 3, 1: the same values as the piecewise HSV formulas.
    """
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    r, g, b = x.unbind(1)
    cr = maxc - minc
    flat = cr == 0
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    crd = torch.where(flat, torch.ones_like(cr), cr)
    h = torch.where(maxc == r, (g - b) / crd, torch.where(maxc == g, 2.0 + (b - r) / crd, 4.0 + (r - g) / crd))
    h = torch.where(flat, torch.zeros_like(h), h)  # in sextants
    h = torch.remainder(h + 6.0 * shift.view(-1, 1, 1), 6.0)
    vs = maxc * s
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + h, 6.0)
        channels.append(maxc - vs * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(channels, dim=1)


def solarize(x, apply):
    return torch.where(_per_sample(apply) & (x >= 0.5), 1.0 - x, x)


def gaussian_blur(x, sigma, kernel_size: int):
    """Separable Gaussian blur with a per-sample sigma; reflect padding as torchvision."""
    B, C, H, W = x.shape
    half = (kernel_size - 1) * 0.5
    pos = torch.linspace(-half, half, kernel_size, device=x.device)
    k = torch.exp(-0.5 * (pos.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # (B*C, K)
    pad = kernel_size // 2
    y = torch.nn.functional.pad(x.reshape(1, B * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.view(B * C, 1, 1, kernel_size), groups=B * C)
    y = torch.nn.functional.conv2d(y, k.view(B * C, 1, kernel_size, 1), groups=B * C)
    return y.view(B, C, H, W)


# SCRL's resize blur (BLUR_METHOD='resized'): one of these down-scale factors per sample
RESIZE_BLUR_FACTORS = (1.1, 1.2, 1.5)


def resize_blur(x: torch.Tensor, factor: float) -> torch.Tensor:
    """SCRL's blur: down-scale by `factor` (int(side / factor) px, antialiased, as PIL), then back
    up to the input size, both bicubic; clamped to [0, 1] (bicubic overshoots)."""
    H, W = x.shape[-2:]
    small = torch.nn.functional.interpolate(x, size=(int(H / factor), int(W / factor)), mode="bicubic",
                                            align_corners=False, antialias=True)
    return torch.nn.functional.interpolate(small, size=(H, W), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)


def sample_photometric_params(cfg, n: int, generator: torch.Generator) -> dict:
    """Per-sample random parameters for one view group (drawn on the CPU, reproducibly)."""
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    b, c, s, h = cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue
    lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
    hi = torch.tensor([1 + b, 1 + c, 1 + s, h])
    params = {
        "jitter": u(n) < cfg.jitter_p,
        "factors": lo + (hi - lo) * u(n, 4),
        "order": u(n, 4).argsort(dim=1),  # torchvision applies the four ops in random order
        "gray": u(n) < cfg.gray_p,
        "blur": u(n) < cfg.blur_p,
        "sigma": cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * u(n),
        "solarize": u(n) < cfg.solarize_p,
    }
    if cfg.blur_kind == "resize":  # drawn last: the Gaussian default draws exactly as before
        params["resize_factor"] = torch.randint(len(RESIZE_BLUR_FACTORS), (n,), generator=generator)
    return params


def _on_selected(x: torch.Tensor, sel: torch.Tensor, fn, *params: torch.Tensor) -> torch.Tensor:
    """x with fn(x, *params) applied to the samples where `sel` is true.

    On a GPU every sample is computed and the selected ones kept (no host sync). On a CPU, where
    these memory-bound ops are the cost, only the selected samples are gathered and computed.
    """
    if x.is_cuda:
        return torch.where(_per_sample(sel), fn(x, *params), x)
    idx = sel.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return fn(x, *params)
    return x.index_copy_(0, idx, fn(x.index_select(0, idx), *(q.index_select(0, idx) for q in params)))


def apply_photometric(x: torch.Tensor, p: dict, cfg) -> torch.Tensor:
    """Colour jitter (random order) -> grayscale -> blur -> solarize, as BYOL's pipeline.

    Works in place on `x` (float in [0, 1]) where it can: pass a tensor the caller owns."""
    p = {k: v.to(x.device, non_blocking=True) for k, v in p.items()}
    jitter, factors = p["jitter"], p["factors"]
    if cfg.jitter_p > 0:
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        strengths = (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
        for pos in range(4):  # each jittered sample gets each op once, at its own position
            for idx, (fn, strength) in enumerate(zip(ops, strengths)):
                if strength > 0:
                    x = _on_selected(x, jitter & (p["order"][:, pos] == idx), fn, factors[:, idx])
    if cfg.gray_p > 0:
        x = _on_selected(x, p["gray"], lambda y: rgb_to_gray(y).expand_as(y).contiguous())
    if cfg.blur_p > 0 and cfg.blur_kind == "resize":
        for i, factor in enumerate(RESIZE_BLUR_FACTORS):
            x = _on_selected(x, p["blur"] & (p["resize_factor"] == i), lambda y: resize_blur(y, factor))
    elif cfg.blur_p > 0:
        k = max(3, int(round(cfg.blur_kernel_frac * x.shape[-1])) | 1)
        x = _on_selected(x, p["blur"], lambda y, sigma: gaussian_blur(y, sigma, k), p["sigma"])
    if cfg.solarize_p > 0:
        x = solarize(x, p["solarize"])
    return x


def augment_batch(views: list[torch.Tensor], groups, seed: int, step: int, device, rank: int = 0,
                  world_size: int = 1, channels_last: bool = True) -> list[torch.Tensor]:
    """uint8 views (one tensor per view slot) -> augmented, normalised float views on `device`.

    Parameters are drawn for the whole global batch from a generator seeded by (seed, step,
    slot) and each rank takes its slice, so 1 process and N processes see the same images.
    """
    slots = expand_slots(groups)
    out = []
    for slot, (v, cfg) in enumerate(zip(views, slots)):
        n = v.shape[0]
        gen = torch.Generator().manual_seed(hash((seed, step, slot)) & 0x7FFFFFFF)
        params = sample_photometric_params(cfg, n * world_size, gen)
        params = {k: t[rank * n:(rank + 1) * n] for k, t in params.items()}
        x = v.to(device, non_blocking=True).float().div_(255.0)
        x = normalize(apply_photometric(x, params, cfg))
        out.append(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    return out
