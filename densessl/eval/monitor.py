"""What the trainer logs about the backbone while it trains, besides the loss: the kNN monitor
and the online probe's per-epoch score. The trainer calls these and writes their records to
metrics.jsonl (and TensorBoard); the measuring lives here, with the other evaluation code."""
from __future__ import annotations

import torch

from densessl.common.distributed import all_reduce_mean
from densessl.config import DataConfig
from densessl.data.build import build_dataset
from densessl.eval.features import extract_features
from densessl.eval.knn import knn_accuracy
from densessl.eval.metrics import mean_average_precision


class KnnMonitor:
    """Weighted kNN (k=20, T=0.07) of a backbone on held-out single Fashion items: 2000 train,
    1000 val, built on first use. Only for runs on fashion_scenes (other data has no items)."""

    def __init__(self, data: DataConfig, device: torch.device, autocast_dtype: torch.dtype | None):
        self.data, self.device, self.autocast_dtype = data, device, autocast_dtype
        self._splits = None

    @property
    def applies(self) -> bool:
        return self.data.dataset == "fashion_scenes"

    def record(self, backbone) -> dict:
        if self._splits is None:
            self._splits = [build_dataset(self.data, split=s, single_item=True, num=n)
                            for s, n in (("train", 2000), ("val", 1000))]
        (xtr, ytr), (xte, yte) = [extract_features(backbone, ds, device=self.device, target_key="label",
                                                   autocast_dtype=self.autocast_dtype) for ds in self._splits]
        return {"knn_top1": knn_accuracy(xtr, ytr, xte, yte, num_classes=10)}


def probe_epoch_record(epoch: int, scores: torch.Tensor, targets: torch.Tensor) -> dict:
    """The online probe's score over one epoch's training batches: mAP for multi-hot targets
    (this rank's batches), top-1 for class indices (averaged over ranks: every rank calls this)."""
    if targets.ndim == 2:
        value, _ = mean_average_precision(scores.cpu(), targets.cpu())
        return {"epoch": epoch + 1, "online_probe_mAP": value}
    acc = (scores.argmax(1) == targets).float().mean()
    return {"epoch": epoch + 1, "online_probe_top1": float(all_reduce_mean(acc))}
