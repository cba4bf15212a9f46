"""Weighted k-nearest-neighbour classification on frozen features (InstDisc / DINO protocol).

Features are L2-normalised, so similarity is cosine. For each test sample the k most similar
training samples vote for their labels with weight exp(sim / T); the class with the largest
summed weight wins. Test samples are processed in chunks, so memory is O(chunk_size x N_train).

Numerics: within a test sample's row the weights are computed as exp((sim - max_sim) / T),
which multiplies all of them by the same constant and leaves the vote unchanged, but cannot
overflow for small T (T -> 0 gives the label of the single nearest neighbour). Exact vote ties
go to the lowest class index.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk_size: int = 256) -> Tensor:
    """Predicted labels (N_test,) int64 for `test_features` (N_test, D).

    `train_features` (N_train, D) with int labels `train_labels` (N_train,) in [0, num_classes).
    A k larger than N_train is clamped to N_train with a warning. Computation runs on the
    device of `train_features`; the result is returned on that device.
    """
    _validate(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)
    n_train = train_features.shape[0]
    if k > n_train:
        warnings.warn(f"knn: k={k} is larger than the {n_train} training samples; using k={n_train}",
                      stacklevel=2)
        k = n_train
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(device=device, dtype=torch.int64)
    preds = []
    for start in range(0, test_features.shape[0], chunk_size):
        test = F.normalize(test_features[start:start + chunk_size].to(device).float(), dim=1)
        sim, idx = (test @ train.T).topk(k, dim=1)  # (b, k), sorted descending
        weights = ((sim - sim[:, :1]) / temperature).exp()
        votes = torch.zeros(test.shape[0], num_classes, device=device, dtype=weights.dtype)
        votes.scatter_add_(1, labels[idx], weights)
        preds.append(votes.argmax(dim=1))
    if not preds:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat(preds)


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, chunk_size: int = 256) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of `knn_predict` against `test_labels` (N_test,)."""
    if test_labels.ndim != 1 or test_labels.shape[0] != test_features.shape[0]:
        raise ValueError(f"test_labels must be (N_test,) = ({test_features.shape[0]},), "
                         f"got {tuple(test_labels.shape)}")
    if test_labels.numel() == 0:
        raise ValueError("knn_accuracy: empty test set")
    pred = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)
    return float((pred.cpu() == test_labels.cpu().long()).double().mean())


def _validate(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size):
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got train {tuple(train_features.shape)} and "
                         f"test {tuple(test_features.shape)}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train and test features differ in dimension: {train_features.shape[1]} vs "
                         f"{test_features.shape[1]}")
    if train_features.shape[0] == 0:
        raise ValueError("knn: no training samples")
    if train_labels.ndim != 1 or train_labels.shape[0] != train_features.shape[0]:
        raise ValueError(f"train_labels must be (N_train,) = ({train_features.shape[0]},), "
                         f"got {tuple(train_labels.shape)}")
    if train_labels.is_floating_point() or train_labels.is_complex() or train_labels.dtype == torch.bool:
        raise ValueError(f"train_labels must be integer class indices, got dtype {train_labels.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    lo, hi = int(train_labels.min()), int(train_labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"train_labels must lie in [0, {num_classes}), found values in [{lo}, {hi}]")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
