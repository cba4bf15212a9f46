"""Imports (:func:`import_official`) read the checkpoint layouts of the official code of BYOL
(SCRL's trainer), MoCo v2, SwAV, DenseCL, PixPro, SCRL, SS-PRL, GAELLE and CGH, plus plain
torchvision state_dicts, densessl safetensors and detectron2 pickles, into a densessl
backbone. Rules per layout are in :data:`LAYOUTS`. Loading is strict: after the layout's rules,
every backbone key must be present with the right shape and every remaining key must be a
known head key of that layout; otherwise :class:`InteropError` lists the missing / unexpected
keys (``drop=`` adds explicit patterns for unknown heads). The only tolerated gap is
``num_batches_tracked`` (absent from older checkpoints; set to 0). Files are read with
``torch.load(weights_only=True)``; detectron2 ``.pkl`` files with an unpickler that only
admits numpy arrays and plain containers, so nothing in a foreign file can run code.
"""
from __future__ import annotations

import argparse
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from densessl.common.errors import InteropError
from densessl.interop.exports import _export_state, export_backbone, torchvision_key_from_detectron2

if TYPE_CHECKING:  # torchvision is imported only when a backbone is built
    from densessl.models.backbones import Backbone


# ---------------------------------------------------------------- reading foreign files


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays/scalars and plain containers; any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
        ("builtins", "set"), ("builtins", "frozenset"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays and plain "
                                         "containers are allowed")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def read_file(path: str | Path):
    """The object in a checkpoint file, read without running code."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise InteropError(f"{path}: cannot read safetensors ({type(e).__name__}: {str(e)[:200]})") from e
    if path.suffix == ".pkl":
        try:
            with open(path, "rb") as f:
                return _NumpyOnlyUnpickler(f, encoding="latin1").load()
        except Exception as e:
            raise InteropError(f"{path}: cannot read pickle ({type(e).__name__}: {str(e)[:300]})") from e
    try:
        # argparse.Namespace (the run's arguments, saved by e.g. PixPro as 'opt') is a plain
        # attribute bag; every other non-tensor global is still refused.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InteropError(f"{path}: cannot read checkpoint with torch.load(weights_only=True) "
                           f"({type(e).__name__}: {str(e)[:300]})") from e


# ---------------------------------------------------------------- official layouts


@dataclass(frozen=True)
class Layout:
    """How to find the online backbone in an official checkpoint.

    containers: top-level keys tried in order for the state_dict (None: the object itself).
    prefixes: prefixes of the online backbone's keys, tried in order; the first one that some
      key starts with is used, the keys under it are the candidates, everything outside it
      (momentum encoder, queues, other networks) is ignored and reported.
    heads: regexes (matched at the start of a candidate key, after the prefix) of head keys
      that are dropped and reported; any other candidate must be a backbone key.
    index_map: Sequential-index renaming (SCRL): {"0": "conv1", ...} for the first component.
    """
    description: str
    containers: tuple = (None,)
    prefixes: tuple = ("",)
    heads: tuple = ()
    index_map: dict = field(default_factory=dict)
    source: str = "torch"  # torch | detectron2


_SWAV_HEADS = (r"projection_head\.", r"prototypes\.")
_SCRL_INDEX = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}

LAYOUTS: dict[str, Layout] = {
    "torchvision": Layout("a torchvision ResNet state_dict (optionally under 'state_dict'/'model', optional "
                          "'module.' prefix); fc dropped",
                          containers=(None, "state_dict", "model"), prefixes=("module.", ""), heads=(r"fc\.",)),
    "densessl": Layout("a densessl safetensors backbone", containers=(None,)),
    "detectron2": Layout("a detectron2 pickle written with MoCo's renaming rules ({'model': {...}}); "
                         "stem.fc.* (e.g. CGH's MLP) dropped", containers=("model", None), heads=(r"stem\.fc\.",),
                         source="detectron2"),
    "moco": Layout("MoCo v2 (facebookresearch/moco): 'state_dict' -> 'module.encoder_q.'; the MLP fc.* dropped",
                   containers=("state_dict", None), prefixes=("module.encoder_q.", "encoder_q."), heads=(r"fc\.",)),
    "densecl": Layout("DenseCL (OpenSelfSup/mmselfsup): 'state_dict' -> 'backbone.' (or 'encoder_q.0.'; "
                      "already-extracted weights have no prefix)",
                      containers=("state_dict", None),
                      prefixes=("backbone.", "module.backbone.", "encoder_q.0.", "module.encoder_q.0.", ""),
                      heads=(r"fc\.",)),
    "pixpro": Layout("PixPro (zdaxie/PixPro): 'model' -> 'module.encoder.' (not encoder_k)",
                     containers=("model", None), prefixes=("module.encoder.", "encoder."), heads=(r"fc\.",)),
    "cgh": Layout("CGH (zaczgao/Cross-Context_Learning): 'net' -> 'module.encoder_q.' or 'encoder_q.'; "
                  "the MLP fc.* dropped",
                  containers=("net", None), prefixes=("module.encoder_q.", "encoder_q."), heads=(r"fc\.",)),
    "swav": Layout("SwAV (facebookresearch/swav): optional 'state_dict', 'module.' prefix; projection_head.* "
                   "and prototypes.* dropped",
                   containers=("state_dict", None), prefixes=("module.", ""), heads=_SWAV_HEADS),
    "ssprl": Layout("SS-PRL (SwAV fork): 'module.' prefix; projection_head, prototypes/ptypes, l_pro_head<s>, "
                    "local_ptypes<s>, l2g_ptypes<s> dropped",
                    containers=("state_dict", None), prefixes=("module.", ""),
                    heads=_SWAV_HEADS + (r"ptypes\.", r"l_pro_head\d*\.", r"local_ptypes\d*\.", r"l2g_ptypes\d*\.")),
    "gaelle": Layout("GAELLE (SwAV fork): 'module.' prefix; projection_head, local heads, prototypes, "
                     "local_prototypes, l2g_prototypes dropped",
                     containers=("state_dict", None), prefixes=("module.", ""),
                     heads=_SWAV_HEADS + (r"local_projection_head\.", r"local_head\.", r"local_prototypes\.",
                                          r"l2g_prototypes\.")),
    "scrl": Layout("SCRL (kakaobrain/scrl): the online network's '*_state_dict'; backbone = "
                   "Sequential(resnet children) with index keys encoder.0 -> conv1, encoder.1 -> bn1, "
                   "encoder.4..7 -> layer1..4",
                   containers=("online_network_state_dict", "online_state_dict", "online_net_state_dict",
                               "model_state_dict", "state_dict", None),
                   prefixes=("module.backbone.encoder.", "backbone.encoder.", "module.encoder.", "encoder."),
                   index_map=_SCRL_INDEX),
}
LAYOUTS["byol"] = Layout("BYOL as trained by SCRL's code (scrl.enabled=False): the SCRL layout; the official "
                         "JAX/haiku pickles are not read (they unpickle Python objects)",
                         containers=LAYOUTS["scrl"].containers, prefixes=LAYOUTS["scrl"].prefixes,
                         index_map=_SCRL_INDEX)


@dataclass
class ImportReport:
    layout: str
    arch: str
    container: str | None
    prefix: str
    loaded: int
    dropped: list
    ignored: dict  # top-level name -> count of keys outside the prefix
    filled: list  # num_batches_tracked keys set to 0

    def summary(self) -> str:
        s = (f"layout {self.layout}: {self.loaded} backbone tensors ({self.arch}) from "
             f"{self.container or 'the top level'}{(' under ' + repr(self.prefix)) if self.prefix else ''}")
        if self.dropped:
            s += f"; dropped {len(self.dropped)} head keys ({', '.join(sorted({k.split('.')[0] for k in self.dropped}))})"
        if self.ignored:
            s += "; ignored keys outside the prefix: " + ", ".join(f"{k} ({n})" for k, n in self.ignored.items())
        if self.filled:
            s += f"; {len(self.filled)} num_batches_tracked absent (set to 0)"
        return s


def _is_state(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in obj.values())


def _pick_container(obj, layout: Layout, path, name: str):
    if not isinstance(obj, dict):
        raise InteropError(f"{path}: expected a dict, got {type(obj).__name__}")
    if layout.index_map and layout.containers and None in layout.containers:
        # SCRL: any '*_state_dict' entry of the online network if the usual names are absent
        for c in layout.containers:
            if c is not None and isinstance(obj.get(c), dict):
                return c, obj[c]
        online = [k for k in obj if isinstance(k, str) and k.endswith("_state_dict") and "online" in k
                  and isinstance(obj[k], dict)]
        if len(online) == 1:
            return online[0], obj[online[0]]
    for c in layout.containers:
        if c is None:
            if _is_state(obj):
                return None, obj
        elif isinstance(obj.get(c), dict):
            return c, obj[c]
    top = ", ".join(map(str, list(obj)[:10]))
    want = ", ".join(repr(c) for c in layout.containers if c is not None) or "a plain state_dict"
    raise InteropError(f"{path}: layout {name!r} expects {want}; the file's top-level keys are: {top}")


def _to_tensor(v) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v


def extract_backbone_state(obj, layout_name: str, path="checkpoint", drop: tuple = ()) -> tuple[dict, ImportReport]:
    """The torchvision-named backbone state of an official checkpoint object (see LAYOUTS)."""
    if layout_name not in LAYOUTS:
        raise InteropError(f"unknown layout {layout_name!r}; expected one of {', '.join(sorted(LAYOUTS))}")
    layout = LAYOUTS[layout_name]
    container, state = _pick_container(obj, layout, path, layout_name)
    keys = [k for k in state if isinstance(k, str)]
    prefix = next((p for p in layout.prefixes if any(k.startswith(p) for k in keys)), None)
    if prefix is None:
        top = Counter(k.split(".")[0] for k in keys)
        raise InteropError(f"{path}: layout {layout_name!r}: no key starts with "
                           f"{' or '.join(repr(p) for p in layout.prefixes)} (in {container or 'top level'}; "
                           f"key groups: {', '.join(f'{k} ({n})' for k, n in top.most_common(8))}); "
                           f"is this another layout? ({', '.join(sorted(LAYOUTS))})")
    ignored = Counter(k.split(".")[0] for k in keys if not k.startswith(prefix))
    heads = [re.compile(h) for h in layout.heads + tuple(drop)]
    out, dropped, bad_index = {}, [], []
    for k in keys:
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix):]
        if any(h.match(rest) for h in heads):
            dropped.append(rest)
            continue
        if layout.source == "detectron2":
            rest = torchvision_key_from_detectron2(rest)
        if layout.index_map:
            first, _, tail = rest.partition(".")
            if first not in layout.index_map:
                bad_index.append(prefix + rest)
                continue
            rest = f"{layout.index_map[first]}.{tail}"
        out[rest] = _to_tensor(state[k])
    if bad_index:
        raise InteropError(f"{path}: layout {layout_name!r}: {len(bad_index)} unexpected Sequential indices "
                           f"(expected {', '.join(prefix + i for i in layout.index_map)}): "
                           f"{', '.join(bad_index[:8])}")
    report = ImportReport(layout_name, "", container, prefix, len(out), dropped, dict(ignored), [])
    return out, report


def import_official(path: str | Path, layout: str, arch: str = "auto", drop: tuple = ()
                    ) -> tuple[Backbone, ImportReport]:
    """A densessl backbone from an official checkpoint of the given layout (see LAYOUTS).

    ``arch="auto"`` infers resnet18/resnet50 from the keys. ``drop``: extra regexes of head
    keys (matched after the prefix) to leave out, for heads this module does not know.
    """
    from densessl.eval.backbone import build_strict, infer_arch, load_safetensors_backbone  # builds torchvision

    path = Path(path)
    if layout == "densessl":
        backbone = load_safetensors_backbone(path)
        n = len(backbone.state_dict())
        return backbone, ImportReport("densessl", backbone.name, None, "", n, [], {}, [])
    obj = read_file(path)
    state, report = extract_backbone_state(obj, layout, path, drop)
    if arch == "auto":
        arch, width = infer_arch(state, f"{path} (layout {layout})")
    else:
        width = None
    backbone = build_strict(state, arch, width, f"{path} (layout {layout})")
    report.filled = [k for k in backbone.state_dict() if k.endswith("num_batches_tracked") and k not in state]
    report.arch = arch
    return backbone, report


def save_imported(backbone: Backbone, out: str | Path, source: str = "") -> Path:
    """Write an imported backbone: ``.safetensors`` (densessl export) or a densessl checkpoint
    (``.pt``: ``densessl eval ...`` and ``densessl.eval.backbone.load_backbone`` read it)."""
    from densessl.common.checkpoint import FORMAT, save_atomic
    from densessl.config import Config, ModelConfig, to_dict
    from densessl.eval.backbone import backbone_arch

    out = Path(out)
    if out.suffix == ".safetensors":
        return export_backbone(backbone, "safetensors", out)
    arch, width = backbone_arch(backbone)
    cfg = Config(model=ModelConfig(backbone=arch, width=width), run_dir=str(out.parent))
    save_atomic({"format": FORMAT, "config": to_dict(cfg), "step": 0, "imported_from": str(source),
                 "method": {f"backbone.{k}": v for k, v in _export_state(backbone).items()}}, out)
    return out
