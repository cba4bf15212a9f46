"""The one backbone loader of every evaluation protocol, and the backbone files it reads.

``load_backbone(spec, cfg)`` takes a densessl checkpoint (``.pt``), a densessl ``.safetensors``
backbone (densessl's export, or any torchvision-named ResNet state_dict), or the word ``random``:
the eval config's architecture (``cfg.model``), randomly initialised from
``cfg.init_seed()`` (``random_init_seed``, else ``seed``). Every backbone then goes through the
same protocol code: ``random`` is no special case there. Exports (densessl.interop) read
backbones through ``load_backbone_file``.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from densessl.common.checkpoint import SAFETENSORS_FORMAT, backbone_state, load_checkpoint
from densessl.common.errors import CheckpointError, ConfigError, InteropError
from densessl.config import Config, EvalBackboneConfig, ModelConfig, config_from_dict
from densessl.models.backbones import Backbone, build_backbone


def load_backbone(spec: str, cfg: EvalBackboneConfig) -> tuple[Backbone, str]:
    """(backbone, description) for a checkpoint or safetensors path, or ``random``.

    ``cfg.model`` is then the loaded backbone's architecture (the protocols record it next to
    their numbers and build their heads for it)."""
    if spec == "random":
        init_seed = cfg.init_seed()
        torch.manual_seed(init_seed)
        try:
            backbone = build_backbone(cfg.model.backbone, cfg.model.width, cfg.model.zero_init_residual)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        return backbone, f"random-init {cfg.model.backbone} (seed {init_seed})"
    backbone = load_backbone_file(spec)
    cfg.model = ModelConfig(*backbone_arch(backbone))
    return backbone, spec


# ---------------------------------------------------------------- backbone files


def backbone_arch(backbone: Backbone) -> tuple[str, int | None]:
    """(arch name, width) of a densessl backbone (width only for *_small)."""
    name = backbone.name
    return name, (int(backbone.conv1.out_channels) if name.endswith("_small") else None)


def load_safetensors_backbone(path: str | Path) -> Backbone:
    """A densessl backbone from a safetensors file (densessl's export, or any torchvision-named
    ResNet state_dict: the architecture is then inferred from the keys)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:
        raise InteropError(f"{path}: cannot read safetensors ({type(e).__name__}: {str(e)[:200]})") from e
    if meta.get("format") == SAFETENSORS_FORMAT:
        width = int(meta["width"]) if meta.get("width") not in (None, "", "None") else None
        arch = meta.get("arch", "")
    else:
        arch, width = infer_arch(state, path)
    return build_strict(state, arch, width, path)


def load_backbone_file(path: str | Path) -> Backbone:
    """A densessl checkpoint (``.pt``) or a safetensors backbone file."""
    if str(path).endswith(".safetensors"):
        return load_safetensors_backbone(path)
    backbone, _ = load_checkpoint_backbone(path)
    return backbone


def load_checkpoint_backbone(path: str | Path) -> tuple[Backbone, Config]:
    """(backbone, training config) from a densessl checkpoint; strict: every key must match."""
    ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    backbone = build_backbone(cfg.model.backbone, cfg.model.width)
    state = backbone_state(ckpt["method"])
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: backbone keys do not match {cfg.model.backbone}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return backbone, cfg


def build_strict(state: dict, arch: str, width: int | None, source) -> Backbone:
    """Build ``arch`` and load ``state`` strictly (missing ``num_batches_tracked`` tolerated)."""
    try:
        backbone = build_backbone(arch, width)
    except ValueError as e:
        raise InteropError(f"{source}: {e}") from None
    expected = backbone.state_dict()
    state = dict(state)
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs {arch} {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise InteropError(f"{source}: keys do not match a densessl {arch} backbone: " + _mismatch(missing, unexpected, shapes))
    backbone.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    return backbone


def _mismatch(missing, unexpected, shapes=(), n: int = 8) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
            parts.append(f"{len(keys)} {label}: {', '.join(list(keys)[:n])}{more}")
    return "; ".join(parts)


def infer_arch(state: dict, source) -> tuple[str, int | None]:
    """(arch, width) of a torchvision-named ResNet state_dict: resnet50, resnet18 or resnet18_small."""
    if "conv1.weight" not in state:
        raise InteropError(f"{source}: no 'conv1.weight': not a torchvision-named ResNet state_dict "
                           f"(first keys: {', '.join(list(state)[:5])})")
    blocks = []
    for i in range(1, 5):
        idx = {int(m.group(1)) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))}
        blocks.append(max(idx) + 1 if idx else 0)
    bottleneck = "layer1.0.conv3.weight" in state
    stem = tuple(state["conv1.weight"].shape)
    if bottleneck and blocks == [3, 4, 6, 3] and stem == (64, 3, 7, 7):
        return "resnet50", None
    if not bottleneck and blocks == [2, 2, 2, 2] and stem == (64, 3, 7, 7):
        return "resnet18", None
    if not bottleneck and blocks == [2, 2, 2, 2] and stem[1:] == (3, 3, 3):
        return "resnet18_small", int(stem[0])
    kind = "Bottleneck" if bottleneck else "BasicBlock"
    raise InteropError(f"{source}: a ResNet with {kind} blocks {blocks} and stem {stem} is not a densessl "
                       "backbone (resnet18, resnet50, resnet18_small)")
