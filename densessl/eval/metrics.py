"""Ranking metrics for multi-label evaluation: average precision and its mean over classes.

`average_precision` is the step-wise, non-interpolated AP of scikit-learn's
`average_precision_score`:

    AP = sum_n (R_n - R_{n-1}) * P_n

where n runs over the *distinct* score values in decreasing order (a threshold at each), and
P_n / R_n are the precision and recall of predicting positive every sample whose score is at
least that value. Tied scores therefore enter together, exactly as in scikit-learn, and the
result does not depend on how ties are ordered. (This is not VOC2007's 11-point interpolated AP.)
"""
from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def average_precision(scores: Tensor, targets: Tensor) -> float:
    """Average precision of `scores` (N,) against binary `targets` (N,) in {0, 1}.

    Equal to `sklearn.metrics.average_precision_score(targets, scores)`. Returns NaN when
    `targets` has no positive (AP is undefined there; scikit-learn warns and returns 0).
    """
    scores, targets = _as_1d(scores, "scores"), _as_1d(targets, "targets")
    if scores.shape != targets.shape:
        raise ValueError(f"scores and targets must have the same shape, got {tuple(scores.shape)} "
                         f"and {tuple(targets.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    y = targets.to(torch.float64)
    if not torch.all((y == 0) | (y == 1)):
        raise ValueError("targets must be binary (0 or 1)")
    if scores.numel() == 0 or y.sum() == 0:
        return float("nan")

    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], y[order]
    # Index of the last sample of each run of equal scores: one threshold per distinct value.
    last = torch.nonzero(s[1:] != s[:-1]).flatten()
    last = torch.cat([last, torch.tensor([s.numel() - 1])])
    tp = torch.cumsum(y, 0)[last]
    predicted = (last + 1).to(torch.float64)
    precision = tp / predicted
    recall = tp / tp[-1]
    recall_prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return float(((recall - recall_prev) * precision).sum())


def mean_average_precision(scores: Tensor, targets: Tensor, ignore: Tensor | None = None
                           ) -> tuple[float, list[float]]:
    """Mean AP over classes for multi-label `scores` (N, C) and binary `targets` (N, C).

    `ignore` is an optional bool mask (N, C): entries that are True are left out of their
    class's AP (neither positive nor negative), e.g. Pascal VOC's "difficult" labels.

    Returns (mAP, per_class). A class with no positive among its kept entries has no defined
    AP: its per_class entry is NaN and it is skipped from the mean; the number of skipped
    classes is `sum(math.isnan(a) for a in per_class)` (see `count_skipped`). Raises ValueError
    when every class is skipped.
    """
    if scores.ndim != 2 or targets.shape != scores.shape:
        raise ValueError(f"scores and targets must both be (N, C), got {tuple(scores.shape)} and "
                         f"{tuple(targets.shape)}")
    if ignore is not None:
        if ignore.shape != scores.shape:
            raise ValueError(f"ignore must have the shape of scores {tuple(scores.shape)}, "
                             f"got {tuple(ignore.shape)}")
        ignore = ignore.to(torch.bool)
    scores, targets = scores.detach().cpu(), targets.detach().cpu()
    per_class = []
    for c in range(scores.shape[1]):
        s, t = scores[:, c], targets[:, c]
        if ignore is not None:
            keep = ~ignore[:, c].cpu()
            s, t = s[keep], t[keep]
        per_class.append(average_precision(s, t))
    valid = [a for a in per_class if not math.isnan(a)]
    if not valid:
        raise ValueError(f"no class has a positive target among {scores.shape[0]} samples; mAP is undefined")
    return sum(valid) / len(valid), per_class


def count_skipped(per_class: list[float]) -> int:
    """Number of classes `mean_average_precision` skipped (no positives)."""
    return sum(math.isnan(a) for a in per_class)


def _as_1d(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x).detach().cpu()
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(x.shape)}")
    return x
