"""Overclustering of frozen patch features (Leopart's protocol; STEGO's cluster probe): no labels
in the clustering, labels only to score it.

Points: every cell of the validation images' stage map (or stage set, upsampled to the finest
stage and concatenated), standardised per dimension (mean 0, std 1 over the points; a
dimension with std < 1e-6 only centred), reduced by PCA to ``cluster.pca_dim`` (the top
eigenvectors of their covariance). k-means (k-means++ seeding, then Lloyd iterations until
no point changes cluster or ``cluster.iters``; an emptied cluster keeps its centre), one run
per seed 0..``cluster.seeds``-1. The cluster map is upsampled (nearest) to the label size and
compared with the labels (255 ignored) in a (classes x clusters) pixel-count matrix:

- K = number of classes (background included): one-to-one Hungarian matching that maximises
  the matched pixels (scipy.optimize.linear_sum_assignment);
- K >> classes (``cluster.overcluster_k``, default points / ``points_per_cluster`` -- Leopart's
  ratio, K=500 on VOC val's 1449 x 28 x 28 patches -- and at least twice the classes):
  many-to-one matching, each cluster to the class holding most of its pixels.

Each matched prediction is scored like a segmentation (mIoU, foreground mIoU, pixel accuracy);
the seeds are reported as mean, standard deviation (n-1), min, max and one by one.
Sources: Leopart ``sup_overcluster.py`` (PCA 50, K=500 and K=classes, 5 seeds); 32 here at 64 px.
"""
from __future__ import annotations

import math

import torch

from densessl.eval.dense.config import parse_stage_set
from densessl.eval.dense.data import IGNORE_INDEX
from densessl.eval.dense.features import DenseSplit, seg_scores

Tensor = torch.Tensor


def standardize_pca(x: Tensor, dim: int) -> Tensor:
    x = x.float()
    x = x - x.mean(0)
    std = x.std(0)
    x = x / torch.where(std < 1e-6, torch.ones_like(std), std)
    cov = (x.T @ x).double() / max(1, x.shape[0] - 1)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    return x @ vecs[:, -min(dim, x.shape[1]):].flip(1).float()


def kmeans(x: Tensor, k: int, seed: int, iters: int = 50) -> Tensor:
    """Cluster index (P,) of each point of ``x`` (P, D) (on x's device; the seeding draws from a
    CPU generator): k-means++ seeding, Lloyd iterations."""
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    k = min(k, n)
    sq = (x * x).sum(1)
    centres = [x[torch.randint(n, (1,), generator=gen).to(x.device)]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        c = x[torch.multinomial(probs.cpu(), 1, generator=gen).to(x.device)]
        centres.append(c)
        d2 = torch.minimum(d2, ((x - c) ** 2).sum(1))
    c = torch.cat(centres)
    assign = None
    for _ in range(max(1, iters)):
        new = (sq[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]).argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
    return assign.cpu()


def hungarian_mapping(counts: Tensor) -> Tensor:
    """(K,) class of each cluster from a (classes x K) count matrix, one-to-one, maximising the
    matched count; clusters left without a class (K > classes) get -1."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # pragma: no cover - scipy ships with scikit-learn
        raise ImportError("overclustering's Hungarian matching needs scipy (pip install scipy)") from e
    rows, cols = linear_sum_assignment(counts.double().numpy(), maximize=True)
    mapping = torch.full((counts.shape[1],), -1, dtype=torch.int64)
    mapping[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return mapping


def many_to_one_mapping(counts: Tensor) -> Tensor:
    """(K,) class of each cluster: the class with the most of its pixels (ties: lowest class)."""
    return counts.argmax(0)


def matched_confusion(counts: Tensor, mapping: Tensor) -> Tensor:
    """(classes x classes) confusion of the prediction ``mapping[cluster]`` (rows ground truth)."""
    if (mapping < 0).any():
        raise ValueError("every cluster needs a class: Hungarian matching here uses K = number of classes")
    c = counts.shape[0]
    return torch.zeros(c, c, dtype=torch.int64).index_add_(1, mapping, counts.long())


def cluster_counts(assign: Tensor, labels: Tensor, k: int, num_classes: int) -> Tensor:
    """(classes x K) pixel counts: ``assign`` (N, h, w) upsampled (nearest) to ``labels`` (N, H, W)."""
    up = torch.nn.functional.interpolate(assign[:, None].float(), size=labels.shape[-2:], mode="nearest")[:, 0]
    lab = labels.long().reshape(-1)
    up = up.long().reshape(-1)
    valid = lab != IGNORE_INDEX
    flat = torch.bincount(lab[valid] * k + up[valid], minlength=num_classes * k)
    return flat.reshape(num_classes, k)


def _summary(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "per_seed": values}


def overcluster_stage(val: DenseSplit, stages: tuple[str, ...], c, device="cpu") -> dict:
    maps = val.maps(stages)
    n, d, h, w = maps.shape
    x = standardize_pca(maps.flatten(2).transpose(1, 2).reshape(-1, d).to(device), c.pca_dim)
    over_k = c.overcluster_k or max(2 * val.num_classes, round(x.shape[0] / c.points_per_cluster))
    out = {"points": x.shape[0], "dim": d}
    for name, k, match in (("hungarian", val.num_classes, hungarian_mapping),
                           ("many_to_one", over_k, many_to_one_mapping)):
        runs = []
        for seed in range(c.seeds):
            assign = kmeans(x, k, seed, c.iters).reshape(n, h, w)
            counts = cluster_counts(assign, val.labels, k, val.num_classes)
            runs.append(seg_scores(matched_confusion(counts, match(counts)), val.class_names))
        out[name] = {"K": k, **{m: _summary([r[m] for r in runs]) for m in ("mIoU", "fg_mIoU", "pixel_acc")}}
    return out


def run_overcluster(val: DenseSplit, cfg, device="cpu") -> dict:
    c = cfg.cluster
    results = {name: overcluster_stage(val, parse_stage_set(name), c, device) for name in c.stages}
    settings = {"stages": list(c.stages), "points": "validation cells of the stage set", "standardise": True,
                "pca_dim": c.pca_dim, "kmeans": "k-means++ then Lloyd", "iters": c.iters, "seeds": list(range(c.seeds)),
                "overcluster_k": c.overcluster_k, "points_per_cluster": c.points_per_cluster,
                "upsampling": "cluster map nearest to label size", "val_images": len(val)}
    table = {name: {m: r[m]["mIoU"]["mean"] for m in ("hungarian", "many_to_one")} for name, r in results.items()}
    return {"mIoU": table, "results": results, "settings": settings}
