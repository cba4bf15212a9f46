"""Dense retrieval ("Hummingbird"; Balazevic et al., NeurIPS 2023): label transfer, no training.

Memory: the L2-normalised patch features (cells of a stage map, or of several stages upsampled
to the finest, each L2-normalised, concatenated: their cosine is the mean of the stages'
cosines) of a fraction of the training images. Each memory patch
carries the class histogram of its label pixels (255 left out; a cell of only ignored pixels
is not stored). When an image has more cells than ``memory_size / images`` allows, the ones
kept are those whose classes are rarest in that image (a cell's score is the sum, over the
classes in it, of how many cells of the image hold that class; uniform noise in [0, 1)
multiplies the score; lowest first), as the open reimplementation
(vpariza/open-hummingbird-eval) does; ``sampling=uniform`` keeps a random subset instead.

Query: every cell of a validation image, L2-normalised; its ``k`` nearest memory patches by
cosine similarity (exact matrix product, chunked) vote with softmax(similarity / temperature)
weights on their histograms. The per-cell class distribution is upsampled bilinearly to the
label size, arg-maxed, and scored by mIoU against the labels, with no class matching (the open
code Hungarian-matches predictions; with a labelled memory the predicted ids are already
classes). Fractions are nested: the first ``ceil(f * N)`` images of one seeded permutation.

Settings (source / here): k = 30, temperature 0.02 (open code; the paper's unverified),
memory 1024 x 10^2..10^4 patches, training subsets 1/128..1, 2 augmented passes over the
training set (RandomResizedCrop + colour jitter) to fill the memory / no augmentation here:
the memory holds the plain images' patches.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from densessl.eval.dense.config import parse_stage_set
from densessl.eval.dense.data import IGNORE_INDEX
from densessl.eval.dense.features import DenseSplit, seg_scores, upsampled_confusion

Tensor = torch.Tensor


def patch_histograms(labels: Tensor, num_classes: int, grid: tuple[int, int], chunk: int = 256):
    """(hist (N, h*w, C) float32, valid (N, h*w) bool): per cell of a ``grid`` over the labels
    (N, H, W), the fraction of its non-ignored pixels in each class; ``valid`` where any is."""
    hists, valids = [], []
    for start in range(0, labels.shape[0], chunk):
        lab = labels[start:start + chunk].long()
        lab = torch.where(lab == IGNORE_INDEX, torch.full_like(lab, num_classes), lab)
        onehot = F.one_hot(lab, num_classes + 1)[..., :num_classes].permute(0, 3, 1, 2).float()
        counts = F.adaptive_avg_pool2d(onehot, grid).flatten(2).transpose(1, 2)  # (n, h*w, C)
        total = counts.sum(-1)
        valid = total > 1e-6
        hists.append(counts / total.clamp(min=1e-6).unsqueeze(-1))
        valids.append(valid)
    return torch.cat(hists), torch.cat(valids)


def sample_cells(hist: Tensor, valid: Tensor, per_image: int, sampling: str, gen: torch.Generator) -> Tensor:
    """(N, per_image) indices of the cells kept per image (rare-class cells first, or uniform);
    invalid cells only where an image has too few valid ones (the caller drops them)."""
    present = (hist > 0).float()  # (N, P, C)
    noise = torch.rand(valid.shape, generator=gen)
    if sampling == "rare":
        class_cells = present.sum(1, keepdim=True)  # (N, 1, C): cells of the image holding each class
        score = (present * class_cells).sum(-1) * noise
    else:
        score = noise
    score = torch.where(valid, score, torch.full_like(score, math.inf))
    return score.topk(per_image, dim=1, largest=False).indices


def knn_label_transfer(queries: Tensor, keys: Tensor, values: Tensor, k: int, temperature: float,
                       chunk_size: int = 256) -> Tensor:
    """(Q, C): for each query (Q, D), the softmax(cos / temperature)-weighted mean of the
    ``values`` (M, C) of its ``k`` most cosine-similar ``keys`` (M, D)."""
    keys = F.normalize(keys.float(), dim=1)
    k = min(k, keys.shape[0])
    out = []
    for start in range(0, queries.shape[0], chunk_size):
        q = F.normalize(queries[start:start + chunk_size].float(), dim=1)
        sim, idx = (q @ keys.T).topk(k, dim=1)
        weights = torch.softmax(sim / temperature, dim=1)
        out.append(torch.einsum("qk,qkc->qc", weights, values[idx]))
    return torch.cat(out) if out else values.new_zeros(0, values.shape[1])


def build_memory(train: DenseSplit, stages: tuple[str, ...], images: Tensor, memory_size: int, sampling: str,
                 gen: torch.Generator, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """(keys (M, D), values (M, C)) of the training ``images`` (indices) at stage set ``stages``."""
    keys, values = [], []
    per_image = None
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk]
        feats = train.maps(stages, part, unit=True)  # (n, D, h, w)
        n, d, h, w = feats.shape
        if per_image is None:
            per_image = min(h * w, max(1, memory_size // len(images)))
        hist, valid = patch_histograms(train.labels[part], train.num_classes, (h, w))
        feats = feats.flatten(2).transpose(1, 2)  # (n, h*w, D)
        if per_image < h * w:
            idx = sample_cells(hist, valid, per_image, sampling, gen)
            feats = feats.gather(1, idx[..., None].expand(-1, -1, d))
            hist = hist.gather(1, idx[..., None].expand(-1, -1, hist.shape[-1]))
            valid = valid.gather(1, idx)
        keys.append(feats[valid])
        values.append(hist[valid])
    return torch.cat(keys), torch.cat(values)


@torch.no_grad()
def retrieval_miou(train: DenseSplit, val: DenseSplit, stages: tuple[str, ...], fraction: float, cfg,
                   seed: int = 0, val_batch: int = 64, device="cpu") -> dict:
    """Scores of one (stage set, memory fraction) on the validation split; the similarity
    search runs on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=gen)
    images = order[:max(1, math.ceil(fraction * len(train)))].sort().values
    keys, values = build_memory(train, stages, images, cfg.memory_size, cfg.sampling, gen)
    keys, values = keys.to(device), values.to(device)
    cm = torch.zeros(val.num_classes, val.num_classes, dtype=torch.int64)
    for start in range(0, len(val), val_batch):
        q = val.maps(stages, slice(start, start + val_batch), unit=True)
        n, d, h, w = q.shape
        probs = knn_label_transfer(q.flatten(2).transpose(1, 2).reshape(-1, d).to(device), keys, values, cfg.k,
                                   cfg.temperature, cfg.chunk_size)
        probs = probs.cpu().reshape(n, h, w, -1).permute(0, 3, 1, 2)
        cm += upsampled_confusion(probs, val.labels[start:start + n], val.num_classes)
    out = seg_scores(cm, val.class_names)
    out.update(memory_images=len(images), memory_patches=keys.shape[0])
    return out


def run_retrieval(train: DenseSplit, val: DenseSplit, cfg, device="cpu") -> dict:
    """Every stage set x memory fraction of ``cfg.retrieval``; mIoU tables plus full results."""
    r = cfg.retrieval
    table, fg_table, results = {}, {}, {}
    for name in r.stages:
        stages = parse_stage_set(name)
        table[name], fg_table[name], results[name] = {}, {}, {}
        for f in r.fractions:
            key = _fraction_name(f)
            res = retrieval_miou(train, val, stages, f, r, seed=cfg.seed, device=device)
            table[name][key], fg_table[name][key], results[name][key] = res["mIoU"], res["fg_mIoU"], res
    settings = {"k": r.k, "temperature": r.temperature, "memory_size": r.memory_size, "fractions": list(r.fractions),
                "sampling": r.sampling, "stages": list(r.stages), "train_images": len(train), "val_images": len(val),
                "similarity": "cosine, exact (stage sets: mean of the stages' cosines)", "upsampling": "bilinear to label size", "matching": "none",
                "augmented_memory": False, "seed": cfg.seed}
    return {"mIoU": table, "fg_mIoU": fg_table, "results": results, "settings": settings}


def _fraction_name(f: float) -> str:
    if f == 1:
        return "1"
    inv = 1 / f
    return f"1/{round(inv)}" if abs(inv - round(inv)) < 1e-6 else f"{f:g}"
