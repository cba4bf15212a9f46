"""``densessl eval dense|retrieval|linear-seg|overcluster|region CHECKPOINT|random [key=value ...]``.

One backbone (a checkpoint, or the random-init baseline, both through
``densessl.eval.backbone.load_backbone``), one dense feature extraction of the train and val splits
(only the stages the chosen probes use; overclustering alone reads only val), then each probe
on the cached maps. The metrics JSON (``out=``, default ``<run>/eval/<command>.json`` beside
the checkpoint) holds every setting next to the numbers.
"""
from __future__ import annotations

import time
from dataclasses import asdict

import torch
from torch.utils.data import Subset

from densessl.common.distributed import pick_device
from densessl.eval.backbone import load_backbone
from densessl.eval.dense.config import PROBES, DenseConfig, parse_stage_set
from densessl.eval.dense.data import dense_dataset
from densessl.eval.dense.features import DTYPES, extract_dense
from densessl.eval.dense.linear_seg import run_linear_seg
from densessl.eval.dense.overcluster import run_overcluster
from densessl.eval.dense.region import run_region
from densessl.eval.dense.retrieval import run_retrieval
from densessl.eval.features import recompute_bn_stats

SECTION = {"retrieval": "retrieval", "linear_seg": "seg", "overcluster": "cluster", "region": "region"}
COMMANDS = {"retrieval": "retrieval", "linear-seg": "linear_seg", "overcluster": "overcluster", "region": "region"}


def needed_stages(cfg: DenseConfig, probes) -> tuple[str, ...]:
    stages = {s for p in probes for name in getattr(cfg, SECTION[p]).stages for s in parse_stage_set(name)}
    return tuple(sorted(stages))


def evaluate_dense(spec: str, probes: list[str], cfg: DenseConfig, log=print) -> dict:
    """Run the dense ``probes`` on one backbone; returns the metrics dict."""
    t0 = time.perf_counter()
    backbone, desc = load_backbone(spec, cfg)
    device = pick_device(cfg.device)
    backbone = backbone.to(device)
    val_ds, classes = dense_dataset(cfg, "val")
    need_train = any(p != "overcluster" for p in probes) or cfg.bn_stats == "data"
    train_ds = dense_dataset(cfg, "train")[0] if need_train else None
    if cfg.bn_stats == "data":
        recompute_bn_stats(backbone, Subset(train_ds, range(min(cfg.bn_scenes, len(train_ds)))), device=device)
        desc += f", BN statistics recomputed on {min(cfg.bn_scenes, len(train_ds))} training images"
    elif cfg.bn_stats != "stored":
        raise ValueError(f"bn_stats must be 'stored' or 'data', got {cfg.bn_stats!r}")
    stages = needed_stages(cfg, probes)
    kw = dict(batch_size=cfg.extract_batch_size, num_workers=cfg.data.num_workers, store_dtype=DTYPES[cfg.store_dtype],
              autocast_dtype=torch.bfloat16 if cfg.precision == "bf16" else None)
    val = extract_dense(backbone, val_ds, classes, stages, device, **kw)
    train = extract_dense(backbone, train_ds, classes, stages, device, **kw) if train_ds is not None else None
    extract_s = time.perf_counter() - t0
    log(f"dense features {', '.join(f'{s} {tuple(val.feats[s].shape[1:])}' for s in stages)}: "
        f"{len(train) if train else 0} train / {len(val)} val images, {extract_s:.1f} s")
    result = {"backbone": desc, "model": asdict(cfg.model), "seed": cfg.seed, "random_init_seed": cfg.random_init_seed,
              "preset": cfg.preset, "features": {
                  "stages": {s: list(val.feats[s].shape[1:]) for s in stages}, "data": asdict(cfg.data),
                  "train_images": len(train) if train else 0, "val_images": len(val), "classes": list(classes),
                  "bn_stats": cfg.bn_stats, "precision": cfg.precision, "store_dtype": cfg.store_dtype,
                  "seconds": round(extract_s, 2)}}
    run = {"retrieval": lambda: run_retrieval(train, val, cfg, device),
           "linear_seg": lambda: run_linear_seg(train, val, cfg, device),
           "overcluster": lambda: run_overcluster(val, cfg, device),
           "region": lambda: run_region(train, val, cfg)}
    for p in probes:
        t = time.perf_counter()
        result[p] = run[p]()
        result[p]["seconds"] = round(time.perf_counter() - t, 2)
        log(f"{p}: {result[p]['seconds']:.1f} s")
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def summary_lines(result: dict) -> list[str]:
    lines = [f"{result['backbone']}"]
    if "retrieval" in result:
        for name, row in result["retrieval"]["mIoU"].items():
            lines.append(f"  retrieval    {name:<10} mIoU " + "  ".join(f"{f} {100 * v:5.1f}" for f, v in row.items()))
    if "linear_seg" in result:
        for name, v in result["linear_seg"]["results"].items():
            lines.append(f"  linear-seg   {name:<10} mIoU {100 * v['mIoU']:5.1f}  fg mIoU {100 * v['fg_mIoU']:5.1f}"
                         f"  (lr {v['lr']:g})")
    if "overcluster" in result:
        for name, v in result["overcluster"]["results"].items():
            h, m = v["hungarian"]["mIoU"], v["many_to_one"]["mIoU"]
            lines.append(f"  overcluster  {name:<10} K={v['hungarian']['K']} mIoU {100 * h['mean']:5.1f} "
                         f"+- {100 * h['std']:.1f}   K={v['many_to_one']['K']} mIoU {100 * m['mean']:5.1f} "
                         f"+- {100 * m['std']:.1f}")
    if "region" in result:
        if "skipped" in result["region"]:
            lines.append(f"  region       skipped: {result['region']['skipped']}")
        for name, v in result["region"].get("results", {}).items():
            by = v["linear"]["acc_by_size"]
            lines.append(f"  region       {name:<10} linear {100 * v['linear']['acc']:5.1f} (s/m/l "
                         + "/".join(f"{100 * by[b]:.1f}" for b in ("small", "medium", "large"))
                         + f")  knn {100 * v['knn']['acc']:5.1f}")
    return lines


__all__ = ["PROBES", "evaluate_dense", "summary_lines"]
