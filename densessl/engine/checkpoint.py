"""Checkpoints: atomic writes, safe loading, and backbones from checkpoints.

A checkpoint holds everything needed to continue exactly: model (online, target, heads),
optimiser, grad scaler, online probe, step, RNG state and the resolved config. The data order
and the augmentation parameters are functions of (seed, epoch, index, step), so the step
alone positions the data stream. Files are read with torch.load(weights_only=True): a
foreign file can never run code.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "densessl-checkpoint-v1"


class CheckpointError(ValueError):
    pass


def save_atomic(obj, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:300]}") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a densessl checkpoint (missing format={FORMAT!r}); "
                              "official checkpoints of other codebases are read by the importers")
    return obj


def backbone_state(method_state: dict) -> dict:
    """The online backbone's weights, with torchvision key names."""
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in method_state.items() if k.startswith(prefix)}


def load_backbone(path: str | Path):
    """(backbone, config) from a densessl checkpoint; strict: every key must match."""
    from densessl.config import config_from_dict
    from densessl.models.backbones import build_backbone

    ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    backbone = build_backbone(cfg.model.backbone, cfg.model.width)
    state = backbone_state(ckpt["method"])
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: backbone keys do not match {cfg.model.backbone}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return backbone, cfg
