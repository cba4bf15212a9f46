"""Backbone exports (safetensors, torchvision, timm, detectron2) and loading densessl backbones.

Exports take a densessl backbone (from a densessl checkpoint or a densessl safetensors file):

- ``safetensors`` (default): the backbone state_dict with torchvision key names, plus metadata
  ``format=densessl-backbone-v1, arch, width``; works for every densessl backbone.
- ``torchvision``: the state_dict as a ``.pth`` (``torch.save``), without ``fc``. It loads
  strictly into ``torchvision.models.resnet50()`` whose ``fc`` is replaced by
  ``nn.Identity()`` (the usual feature extractor), or with ``strict=False`` and exactly
  ``fc.weight, fc.bias`` missing when a fresh classifier is wanted.
- ``timm``: the same keys (timm's ResNet uses torchvision's names); loads strictly into
  ``timm.create_model("resnet50", pretrained=False, num_classes=0)``.
- ``detectron2``: a pickle ``{"model": {name: numpy array}, "__author__": "densessl",
  "matching_heuristics": True}`` with MoCo's renaming rules (spec §0): keys outside ``layer*``
  get ``stem.``, ``layer1..4 -> res2..5``, ``bn1..3 -> conv1..3.norm``, ``downsample.0 ->
  shortcut``, ``downsample.1 -> shortcut.norm``. ``num_batches_tracked`` is left out: the
  keys are exactly those of detectron2's R-50 / R-18 backbone with its default FrozenBN
  (``conv*.weight`` and ``*.norm.{weight,bias,running_mean,running_var}``). Use it with
  ``INPUT.FORMAT RGB``, ``MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]``,
  ``MODEL.PIXEL_STD [58.395, 57.12, 57.375]``, ``MODEL.RESNETS.STRIDE_IN_1X1 False``
  (see :data:`DETECTRON2_CONFIG`).

``resnet18_small`` (3x3 stem, no max-pool, scaled widths) is not a torchvision architecture:
exporting it to torchvision/timm/detectron2 is refused with a clear error.
"""
from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from densessl.engine.checkpoint import CheckpointError

if TYPE_CHECKING:  # torchvision is imported only when a backbone is built
    from densessl.models.backbones import Backbone

SAFETENSORS_FORMAT = "densessl-backbone-v1"
EXPORT_FORMATS = ("safetensors", "torchvision", "timm", "detectron2")
TORCHVISION_ARCHS = ("resnet18", "resnet50")
DETECTRON2_CONFIG = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "MODEL.RESNETS.NORM": "SyncBN",
}


class InteropError(CheckpointError):
    """An export or import cannot be done; the message says which file, key or architecture."""


# ---------------------------------------------------------------- loading densessl backbones


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


def load_any_backbone(path: str | Path) -> Backbone:
    """A densessl checkpoint (``.pt``) or a safetensors backbone file."""
    from densessl.engine.checkpoint import load_backbone

    if str(path).endswith(".safetensors"):
        return load_safetensors_backbone(path)
    backbone, _ = load_backbone(path)
    return backbone


def build_strict(state: dict, arch: str, width: int | None, source) -> Backbone:
    """Build ``arch`` and load ``state`` strictly (missing ``num_batches_tracked`` tolerated)."""
    from densessl.models.backbones import build_backbone

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


# ---------------------------------------------------------------- exports


def _export_state(backbone: Backbone) -> OrderedDict:
    return OrderedDict((k, v.detach().cpu().contiguous()) for k, v in backbone.state_dict().items())


def _require_torchvision_arch(backbone: Backbone, fmt: str) -> None:
    arch, _ = backbone_arch(backbone)
    if arch not in TORCHVISION_ARCHS:
        raise InteropError(f"cannot export backbone {arch!r} to {fmt}: it is not a torchvision architecture "
                           f"({fmt} has {', '.join(TORCHVISION_ARCHS)}); export it to safetensors instead")


def detectron2_key(key: str) -> str | None:
    """detectron2 name of a torchvision ResNet key (MoCo's rules); None for num_batches_tracked."""
    if key.endswith("num_batches_tracked"):
        return None
    k = key
    if "layer" not in k:
        k = "stem." + k
    for t in (1, 2, 3, 4):
        k = k.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        k = k.replace(f"bn{t}", f"conv{t}.norm")
    k = k.replace("downsample.0", "shortcut")
    k = k.replace("downsample.1", "shortcut.norm")
    return k


def torchvision_key_from_detectron2(key: str) -> str:
    """Inverse of :func:`detectron2_key`."""
    k = key
    if k.startswith("stem."):
        k = k[len("stem."):]
    k = k.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    for t in (1, 2, 3):
        k = k.replace(f"conv{t}.norm", f"bn{t}")
    for t in (1, 2, 3, 4):
        k = k.replace(f"res{t + 1}", f"layer{t}")
    return k


def to_detectron2(state: dict) -> dict:
    """``{"model": {d2 key: numpy}, "__author__": "densessl", "matching_heuristics": True}``."""
    model = {}
    for k, v in state.items():
        k2 = detectron2_key(k)
        if k2 is not None:
            model[k2] = v.detach().cpu().numpy()
    return {"model": model, "__author__": "densessl", "matching_heuristics": True}


def export_backbone(backbone: Backbone, fmt: str, out: str | Path) -> Path:
    """Write ``backbone`` in format ``fmt`` (one of EXPORT_FORMATS) to ``out``; returns the path."""
    from densessl.engine.checkpoint import save_atomic

    if fmt not in EXPORT_FORMATS:
        raise InteropError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = _export_state(backbone)
    arch, width = backbone_arch(backbone)
    if fmt == "safetensors" or (fmt in ("torchvision", "timm") and out.suffix == ".safetensors"):
        from safetensors.torch import save_file

        if fmt != "safetensors":
            _require_torchvision_arch(backbone, fmt)
        save_file(dict(state), str(out), metadata={"format": SAFETENSORS_FORMAT, "arch": arch,
                                                   "width": "" if width is None else str(width)})
    elif fmt in ("torchvision", "timm"):
        _require_torchvision_arch(backbone, fmt)
        save_atomic(dict(state), out)
    else:
        _require_torchvision_arch(backbone, fmt)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_bytes(portable_pickle(to_detectron2(state)))
        tmp.replace(out)
    return out


def portable_pickle(obj) -> bytes:
    """Pickle (protocol 3) whose numpy references read under numpy 1.x as well as 2.x.

    numpy 2 pickles arrays as ``numpy._core.multiarray._reconstruct``, a module numpy < 1.26
    lacks; the GLOBAL opcodes are rewritten to ``numpy.core.multiarray`` (which numpy 2 still
    resolves). Protocol 3 has no frames and its memo refers to indices, not byte offsets, so
    changing an opcode's length is safe.
    """
    import pickletools

    data = pickle.dumps(obj, protocol=3)
    ops = list(pickletools.genops(data))
    out, last = [], 0
    for i, (op, arg, pos) in enumerate(ops):
        if op.name == "GLOBAL" and arg.startswith("numpy._core."):
            module, name = arg.split(" ", 1)
            end = ops[i + 1][2]
            out += [data[last:pos], b"c" + module.replace("numpy._core.", "numpy.core.", 1).encode() + b"\n"
                    + name.encode() + b"\n"]
            last = end
    out.append(data[last:])
    return b"".join(out)
