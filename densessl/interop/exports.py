"""Backbone exports (safetensors, torchvision, timm, detectron2).

Exports take a densessl backbone (from a densessl checkpoint or a densessl safetensors file, read
by densessl.eval.backbone):

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
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from densessl.common.checkpoint import SAFETENSORS_FORMAT
from densessl.common.errors import InteropError

if TYPE_CHECKING:  # torchvision is imported only when a backbone is built
    from densessl.models.backbones import Backbone

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


# ---------------------------------------------------------------- exports


def _export_state(backbone: Backbone) -> OrderedDict:
    return OrderedDict((k, v.detach().cpu().contiguous()) for k, v in backbone.state_dict().items())


def _require_torchvision_arch(backbone: Backbone, fmt: str) -> None:
    from densessl.eval.backbone import backbone_arch  # here, not at the top: keeps `densessl --help` light

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
    from densessl.common.checkpoint import save_atomic
    from densessl.eval.backbone import backbone_arch

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
