"""The evaluation protocols behind `densessl eval`: one config, one function per protocol.

Each protocol takes a backbone (pretrained, or the random-init baseline built by the very
same code path) and returns a metrics dict. Features are extracted once per (backbone,
split) and cached in memory; settings are written next to every number.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from densessl.common.distributed import pick_device
from densessl.config import ConfigError, DataConfig, EvalBackboneConfig, apply_overrides, from_dict, to_dict
from densessl.data.build import build_dataset
from densessl.eval.backbone import load_backbone
from densessl.eval.features import extract_features, recompute_bn_stats
from densessl.eval.knn import knn_accuracy
from densessl.eval.linear import train_linear_probe


@dataclass
class EvalConfig(EvalBackboneConfig):  # model, seed, random_init_seed: shared by every protocol
    data: DataConfig = field(default_factory=DataConfig)
    num_train: int = 5000
    num_test: int = 2000
    k: int = 20
    temperature: float = 0.07
    chunk_size: int = 256
    epochs: int = 100
    lr: float = 0.01  # on standardised features; swept on Fashion-MNIST features (eval/linear.py)
    weight_decay: float = 0.0
    batch_size: int = 256
    precision: str = "fp32"  # fp32 | bf16 feature extraction
    # stored: BN running statistics as in the checkpoint (a random-init backbone: mean 0, var 1,
    # i.e. un-normalised); data: recomputed on `bn_scenes` training scenes first, weights unchanged
    bn_stats: str = "stored"
    bn_scenes: int = 1024
    val_fraction: float = 0.2  # imagefolder without train/ and val/ sub-folders: the validation share
    device: str = "auto"
    out: str | None = None  # metrics.json path (default: next to the checkpoint)


def eval_config(overrides: list[str]) -> EvalConfig:
    cfg = from_dict(EvalConfig, apply_overrides(to_dict(EvalConfig()), overrides))
    check_eval_data(cfg.data)
    return cfg


def check_eval_data(data: DataConfig) -> None:
    """Refuse the pretraining-only data keys rather than ignore them: evaluation always decodes
    on the loader workers."""
    if data.decode_on != "workers":
        raise ConfigError(f"data.decode_on={data.decode_on!r}: evaluation decodes images on the loader workers "
                          f"(data.decode_on is a pretraining key); remove the override")


class FeatureCache:
    """Features of one backbone on the train/test splits of the eval data, computed once."""

    def __init__(self, backbone, cfg: EvalConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.backbone = backbone.to(self.device)
        self._cache: dict = {}

    def get(self, single_item: bool, split: str):
        key = (single_item, split)
        if key not in self._cache:
            c = self.cfg
            n = c.num_train if split == "train" else c.num_test
            if c.data.dataset == "fashion_scenes":
                ds = build_dataset(c.data, split=split, single_item=single_item, num=n)
            elif c.data.dataset in ("imagefolder", "shards") and single_item:
                ds = labelled_split(c, split, n)
            else:
                protocol = "knn and linear" if single_item else "multilabel"
                raise ConfigError(
                    f"data.dataset={c.data.dataset}: {protocol} read fashion_scenes"
                    + (", or a labelled imagefolder / shards (data.root=<folder of class sub-folders>)" if single_item
                       else ", or voc / coco (data.dataset=voc|coco data.root=...)"))
            self.classes = getattr(ds, "classes", None)
            dtype = torch.bfloat16 if c.precision == "bf16" else None
            self._cache[key] = extract_features(self.backbone, ds, batch_size=256, device=self.device,
                                                target_key="label" if single_item else "labels",
                                                autocast_dtype=dtype)
        return self._cache[key]


def labelled_split(cfg: EvalConfig, split: str, num: int | None):
    """The `split` images of a labelled image folder (or shards of one) for kNN and linear.

    `data.root/train` and `data.root/val` when both exist (the ImageNet layout, class
    sub-folders in each); otherwise the one folder, split by a permutation seeded with
    `data.seed` into `val_fraction` validation images and the rest for training. At most `num`
    images of the split (num_train / num_test), a seeded random subset, so that a cap never keeps
    only the first classes of a folder sorted by class."""
    from pathlib import Path

    from torch.utils.data import Subset

    from densessl.config import DataConfig

    root = Path(cfg.data.root or "")
    own = (root / "train").is_dir() and (root / "val").is_dir()
    data = DataConfig(**{**asdict(cfg.data), "root": str(root / split) if own else str(root)})
    ds = build_dataset(data, split=split)
    if not hasattr(ds, "classes") or not getattr(ds, "labelled", True):
        raise ConfigError(f"data.root={data.root}: knn and linear need class sub-folders (labels); it has none")
    g = torch.Generator().manual_seed(cfg.data.seed)
    order = torch.randperm(len(ds), generator=g)
    if not own:
        n_val = max(1, round(cfg.val_fraction * len(ds)))
        order = order[:n_val] if split == "val" else order[n_val:]
    if num is not None:
        order = order[:num]
    subset = Subset(ds, sorted(order.tolist()))
    subset.classes = ds.classes
    return subset


def _num_classes(cache: FeatureCache, ytr: torch.Tensor) -> int:
    if cache.cfg.data.dataset == "fashion_scenes":
        return 10
    return len(cache.classes) if getattr(cache, "classes", None) else int(ytr.max()) + 1


def _data_name(cfg: EvalConfig) -> str:
    if cfg.data.dataset == "fashion_scenes":
        return "FashionItems (single item per image)"
    return f"{cfg.data.dataset} {cfg.data.root}"


def run_knn(cache: FeatureCache) -> dict:
    c = cache.cfg
    (xtr, ytr), (xte, yte) = cache.get(True, "train"), cache.get(True, "val")
    acc = knn_accuracy(xtr, ytr, xte, yte, num_classes=_num_classes(cache, ytr), k=c.k, temperature=c.temperature,
                       chunk_size=c.chunk_size)
    return {"knn_top1": acc, "settings": {"k": c.k, "temperature": c.temperature, "train": len(xtr), "test": len(xte),
                                          "data": _data_name(c)}}


def run_linear(cache: FeatureCache) -> dict:
    c = cache.cfg
    (xtr, ytr), (xte, yte) = cache.get(True, "train"), cache.get(True, "val")
    res = train_linear_probe(xtr, ytr, xte, yte, multilabel=False, epochs=c.epochs, lr=c.lr,
                             weight_decay=c.weight_decay, batch_size=c.batch_size, seed=c.seed,
                             num_classes=_num_classes(cache, ytr))
    return {"linear_top1": res["top1"], "settings": {**_settings(res), "data": _data_name(c)}}


def run_multilabel(cache: FeatureCache) -> dict:
    c = cache.cfg
    (xtr, ytr), (xte, yte) = cache.get(False, "train"), cache.get(False, "val")
    res = train_linear_probe(xtr, ytr, xte, yte, multilabel=True, epochs=c.epochs, lr=c.lr,
                             weight_decay=c.weight_decay, batch_size=c.batch_size, seed=c.seed)
    return {"multilabel_mAP": res["mAP"], "settings": {**_settings(res), "data": "FashionScenes (multi-label)"}}


def _settings(res: dict) -> dict:
    """The probe's settings and diagnostics (its weights stay out of metrics.json)."""
    return {k: v for k, v in res.items() if k not in ("top1", "mAP", "weight", "bias")}


PROTOCOLS = {"knn": run_knn, "linear": run_linear, "multilabel": run_multilabel}


def evaluate(spec: str, protocols: list[str], cfg: EvalConfig) -> dict:
    """Run protocols on one backbone; returns {"backbone": ..., protocol: metrics, ...}."""
    backbone, desc = load_backbone(spec, cfg)
    cache = FeatureCache(backbone, cfg)
    if cfg.bn_stats == "data":
        scenes = build_dataset(cfg.data, split="train", num=cfg.bn_scenes, with_masks=False)
        recompute_bn_stats(cache.backbone, scenes, device=cache.device)
        desc += f", BN statistics recomputed on {len(scenes)} training scenes"
    elif cfg.bn_stats != "stored":
        raise ValueError(f"bn_stats must be 'stored' or 'data', got {cfg.bn_stats!r}")
    result = {"backbone": desc, "model": asdict(cfg.model), "seed": cfg.seed}
    for p in protocols:
        t0 = time.perf_counter()
        result[p] = PROTOCOLS[p](cache)
        result[p]["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def default_out(spec: str, protocol: str, cfg: EvalConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    if spec == "random":
        init_seed = cfg.random_init_seed
        name = f"random-{cfg.model.backbone}" + ("" if init_seed is None else f"-seed{init_seed}")
        return Path("runs") / name / "eval" / f"{protocol}.json"
    p = Path(spec)
    run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return run_dir / "eval" / f"{protocol}.json"


def write_metrics(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
