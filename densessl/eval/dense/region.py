"""Region probe: how well frozen stage features at a ground-truth box name its object.

No published protocol exists (SCRL argues for box-level features with fine-tuned detection);
this is densessl's design:

- Features: for every ground-truth box (boxes of the visible masks on Fashion-Scenes, VOC's
  Annotations objects, COCO's non-crowd instances), ``torchvision.ops.roi_align`` on each
  frozen stage map of the image with ``aligned=True`` (half-pixel correction: feature cell j
  covers image pixels [j * stride, (j + 1) * stride)), ``spatial_scale`` = map side / image
  side, ``region.output_size`` x ``output_size`` bins (2x2) with ``region.sampling_ratio``
  samples per bin, averaged over the bins: one vector per box and stage. A stage set such as
  ``c3+c4+c5`` concatenates the stages' vectors (each stage pooled at its own resolution).
- Classifiers, exactly the image-level probes of ``densessl eval linear`` / ``knn`` on these
  vectors (the config's top-level ``epochs``, ``lr``, ``weight_decay``, ``batch_size``, ``k``,
  ``temperature``): a logistic-regression probe (eval/linear.py: features standardised by the
  training boxes' statistics, SGD, cosine, last epoch) and a weighted cosine kNN (eval/knn.py;
  on a stage set, each stage's vector L2-normalised before concatenation, so the cosine is the
  mean of the stages' cosines), trained on the training split's boxes and scored on the
  validation split's boxes.
- Metrics: top-1 accuracy over the validation boxes and by object size, the box area
  (w x h, pixels of the probe's image size) binned as ``small`` < t1 <= ``medium`` < t2 <=
  ``large``. ``region.size_bins=terciles`` (default): t1, t2 the 1/3 and 2/3 quantiles of the
  TRAINING boxes' areas (equal-sized bins whatever the image size; Fashion-Scenes items are
  all "large" by COCO's rule at 64 px); ``coco``: t1 = 32^2, t2 = 96^2. The thresholds and
  the number of boxes per bin are reported.
"""
from __future__ import annotations

import torch
from torchvision.ops import roi_align

from densessl.eval.dense.config import parse_stage_set
from densessl.eval.dense.features import DenseSplit
from densessl.eval.knn import knn_predict
from densessl.eval.linear import train_linear_probe

Tensor = torch.Tensor
BINS = ("small", "medium", "large")


def roi_features(fmap: Tensor, boxes: list[Tensor], image_size: int, output_size: int = 2,
                 sampling_ratio: int = 2) -> Tensor:
    """(sum n_i, C): RoIAlign of each image's ``boxes`` (n_i, 4) xyxy image pixels on its map
    (N, C, h, w), ``output_size`` x ``output_size`` bins averaged."""
    if sum(len(b) for b in boxes) == 0:
        return fmap.new_zeros(0, fmap.shape[1], dtype=torch.float32)
    pooled = roi_align(fmap.float(), [b.float() for b in boxes], output_size=output_size,
                       spatial_scale=fmap.shape[-1] / image_size, sampling_ratio=sampling_ratio, aligned=True)
    return pooled.mean(dim=(2, 3))


def region_vectors(split: DenseSplit, stages: tuple[str, ...], output_size: int, sampling_ratio: int,
                   unit: bool = False, chunk: int = 256) -> Tensor:
    """(boxes, sum C): the stages' RoIAlign vectors of every box, concatenated; ``unit``: each
    stage's vector L2-normalised first."""
    size = split.labels.shape[-1]
    parts = []
    for start in range(0, len(split), chunk):
        boxes = split.boxes[start:start + chunk]
        vecs = [roi_features(split.feats[s][start:start + chunk], boxes, size, output_size, sampling_ratio)
                for s in stages]
        parts.append(torch.cat([torch.nn.functional.normalize(v, dim=1) if unit else v for v in vecs], 1))
    return torch.cat(parts)


def size_thresholds(train_areas: Tensor, mode: str) -> tuple[float, float]:
    if mode == "coco":
        return 32.0 ** 2, 96.0 ** 2
    q = torch.quantile(train_areas.double(), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    return float(q[0]), float(q[1])


def size_bin(areas: Tensor, t1: float, t2: float) -> Tensor:
    """0 small (< t1), 1 medium (< t2), 2 large."""
    return (areas >= t1).long() + (areas >= t2).long()


def _areas(split: DenseSplit) -> Tensor:
    b = torch.cat([x.reshape(-1, 4).float() for x in split.boxes]) if split.boxes else torch.zeros(0, 4)
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def _accuracy(pred: Tensor, target: Tensor, bins: Tensor) -> dict:
    correct = (pred.cpu() == target.cpu()).double()
    by = {name: (float(correct[bins == i].mean()) if (bins == i).any() else float("nan"))
          for i, name in enumerate(BINS)}
    return {"acc": float(correct.mean()), "acc_by_size": by}


def region_probe(train: DenseSplit, val: DenseSplit, stages: tuple[str, ...], cfg, bins_tr_te) -> dict:
    r = cfg.region
    xtr = region_vectors(train, stages, r.output_size, r.sampling_ratio)
    xte = region_vectors(val, stages, r.output_size, r.sampling_ratio)
    ytr, yte = torch.cat(train.classes), torch.cat(val.classes)
    n_obj = train.num_classes - 1
    mean, std = xtr.mean(0, keepdim=True), xtr.std(0, keepdim=True)
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    lin = train_linear_probe((xtr - mean) / std, ytr, (xte - mean) / std, yte, multilabel=False, epochs=cfg.epochs,
                             lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, seed=cfg.seed,
                             standardize=False, num_classes=n_obj)
    logits = ((xte - mean) / std) @ lin["weight"].T + lin["bias"]
    utr, ute = (region_vectors(x, stages, r.output_size, r.sampling_ratio, unit=True) for x in (train, val))
    knn = knn_predict(utr, ytr, ute, n_obj, k=min(cfg.k, len(xtr)), temperature=cfg.temperature,
                      chunk_size=cfg.chunk_size)
    return {"linear": {**_accuracy(logits.argmax(1), yte, bins_tr_te), "train_loss_last": lin["train_loss_last"]},
            "knn": _accuracy(knn, yte, bins_tr_te), "dim": xtr.shape[1]}


def run_region(train: DenseSplit, val: DenseSplit, cfg) -> dict:
    r = cfg.region
    n_tr, n_te = sum(len(b) for b in train.boxes), sum(len(b) for b in val.boxes)
    if n_tr == 0 or n_te == 0:
        return {"skipped": f"no ground-truth boxes ({n_tr} in train, {n_te} in val)"}
    t1, t2 = size_thresholds(_areas(train), r.size_bins)
    bins = size_bin(_areas(val), t1, t2)
    results = {name: region_probe(train, val, parse_stage_set(name), cfg, bins) for name in r.stages}
    settings = {"stages": list(r.stages), "roi_align": {"output_size": r.output_size, "sampling_ratio": r.sampling_ratio,
                                                        "aligned": True, "pool": "mean of the bins"},
                "stage_set": "pooled vectors concatenated", "size_bins": r.size_bins,
                "thresholds_px2": [t1, t2], "val_boxes_per_bin": {n: int((bins == i).sum()) for i, n in enumerate(BINS)},
                "train_boxes": n_tr, "val_boxes": n_te,
                "linear": {"probe": "eval/linear.py, standardised", "epochs": cfg.epochs, "lr": cfg.lr,
                           "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size, "metric": "last epoch"},
                "knn": {"k": cfg.k, "temperature": cfg.temperature, "stage_set": "per-stage L2-normalised, concatenated"},
                "seed": cfg.seed}
    acc = {name: {"linear": v["linear"]["acc"], "knn": v["knn"]["acc"]} for name, v in results.items()}
    return {"acc": acc, "results": results, "settings": settings}

