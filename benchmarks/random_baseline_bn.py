"""How much of the random-init baseline's kNN comes from its untouched BN statistics?

A random-init backbone evaluated in eval mode uses BN running statistics of mean 0 and variance 1,
i.e. it runs un-normalised. A trained backbone carries data statistics. This script evaluates
weighted kNN (k=20, T=0.07, 2000 train / 1000 val single Fashion items) for a random-init
backbone and for a checkpoint, each as stored and after recomputing its BN statistics on 1024
training scenes (cumulative average, no weight change).

python benchmarks/random_baseline_bn.py runs/demo/checkpoints/last.pt
"""
import sys

import torch

from densessl.data.augment import normalize
from densessl.data.scenes import FashionItems, FashionScenes
from densessl.eval.backbone import load_checkpoint_backbone
from densessl.eval.knn import knn_accuracy
from densessl.models.backbones import build_backbone


def stack(ds, key):
    return normalize(torch.stack([ds[i]["image"] for i in range(len(ds))])), (
        torch.stack([ds[i][key] for i in range(len(ds))]) if key else None)


@torch.no_grad()
def knn(backbone, xtr, ytr, xte, yte):
    backbone.eval()
    ftr = torch.cat([backbone.pool(xtr[i:i + 250]) for i in range(0, len(xtr), 250)])
    fte = torch.cat([backbone.pool(xte[i:i + 250]) for i in range(0, len(xte), 250)])
    return knn_accuracy(ftr, ytr, fte, yte, 10)


@torch.no_grad()
def recompute_bn(backbone, x):
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
    backbone.train()
    for i in range(0, len(x), 128):
        backbone.pool(x[i:i + 128])


def main(checkpoint):
    xtr, ytr = stack(FashionItems("train", 2000), "label")
    xte, yte = stack(FashionItems("val", 1000), "label")
    xsc, _ = stack(FashionScenes("train", 1024, with_masks=False), None)
    torch.manual_seed(0)
    random_bb = build_backbone("resnet18_small", 32)
    rows = [("random init", random_bb), (checkpoint, load_checkpoint_backbone(checkpoint)[0])]
    print("| backbone | kNN, stored BN statistics | kNN, BN statistics recomputed on scenes |")
    print("|---|---:|---:|")
    for name, bb in rows:
        stored = knn(bb, xtr, ytr, xte, yte)
        recompute_bn(bb, xsc)
        print(f"| {name} | {100 * stored:.1f} | {100 * knn(bb, xtr, ytr, xte, yte):.1f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/checkpoints/last.pt")
